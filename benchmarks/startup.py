"""Start-up: how fast `regimen --help` answers, and where the time to the first training step goes.

`regimen --help` must not import torch (the CLI imports what a subcommand needs when it runs);
its wall time is compared with the bare interpreter's (`python -c pass`) and with
`python -c "import torch"`, each a fresh process, median of several. The target is under 0.5 s.

Time to the first step: a fresh process does what `regimen train` (no arguments: the default
strategy) does before its first optimizer step, in order, and times each part: import torch,
import regimen's trainer, read the strategy, load the corpus (`stdlib`), build the model, build
the trainer (optimizer, schedules), the first `train_step`. torch's lazy import of
torch._dynamo, which the first torch optimizer triggers, is a row of its own; the second
`train_step` is timed too, for what a step costs once everything is warm. Each part is shown as
a share of the time to the first step (from interpreter start, as the parent process sees it).

    python -m benchmarks --only startup [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Table, cli, python_command, rerun_command, run_worker, threads, to_json

TARGET_HELP = 0.5  # seconds


def wall(cmd: list[str], repeats: int) -> float:
    """Median wall time of a command, in seconds (output discarded; it must exit 0)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def regimen_command() -> list[str]:
    """The `regimen` console script beside this interpreter, else `python -m regimen`."""
    script = Path(sys.executable).parent / "regimen"
    return [str(script)] if script.exists() else [sys.executable, "-m", "regimen"]


def help_imports_torch() -> bool:
    """Whether the `--help` path imports torch (it must not)."""
    code = (
        "import sys\nfrom regimen.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('\\n' + str('torch' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


def worker() -> dict[str, Any]:
    """The parts of `regimen train` before its first step, timed in order in this process."""
    parts: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        parts[name] = now - mark
        mark = now

    import torch

    lap("import torch")
    torch.set_num_threads(threads())
    from regimen.data import load_source
    from regimen.models import build_model
    from regimen.strategy import Strategy
    from regimen.task import Task, cross_entropy
    from regimen.trainer import Trainer

    lap("import regimen (trainer, task, data)")
    strategy = Strategy.load(None, ["observe.progress=none", "train.device=cpu"]).resolve()
    lap("read and resolve the strategy")
    data = load_source(strategy.data, strategy.model.context)
    lap("load the corpus (stdlib)")
    torch.manual_seed(strategy.train.seed)  # build_task, split in two to time the parts
    task = Task(build_model(strategy.model, vocab_size=data.vocab_size), data, loss=cross_entropy)
    lap("build the model")
    # torch.optim.Optimizer.__init__ imports torch._dynamo on first use (it is wrapped in
    # torch._disable_dynamo): every torch optimizer pays it once, so it is its own row.
    import torch._dynamo

    lap("import torch._dynamo (paid by the first torch optimizer)")
    trainer = Trainer(strategy, task)
    trainer.model.train()
    lap("build the trainer (optimizer, schedules)")
    trainer.train_step()
    lap("first train_step")
    trainer.train_step()
    lap("second train_step (warm, for comparison)")
    return {"parts": parts}


def run(quick: bool) -> list[Table]:
    """The --help table and the time-to-first-step table."""
    repeats = 3 if quick else 7
    python = wall([sys.executable, "-c", "pass"], repeats)
    torch_import = wall([sys.executable, "-c", "import torch"], repeats)
    helps = wall([*regimen_command(), "--help"], repeats)
    imports_torch = help_imports_torch()
    help_table = Table(
        "Start-up: `regimen --help`",
        ["command", "seconds", "x python -c pass"],
        [
            ["python -c pass", python, 1.0],
            ["regimen --help", helps, helps / python],
            ['python -c "import torch"', torch_import, torch_import / python],
        ],
        rerun_command("startup", quick),
        [
            f"Median of {repeats} fresh processes each.",
            f"regimen --help: {helps:.2f} s (target < {TARGET_HELP} s): "
            + ("met" if helps < TARGET_HELP else "**not met**")
            + ("; **torch is imported on the --help path**." if imports_torch else "; torch is not imported on that path."),
        ],
        {"seconds": ".3f", "x python -c pass": ".1f"},
    )
    runs = []
    for _ in range(max(1, repeats // 2)):
        start = time.perf_counter()
        result = run_worker(python_command("startup", "--worker"))
        total = time.perf_counter() - start
        result["interpreter"] = total - sum(result["parts"].values())  # start-up and exit, as the parent sees them
        runs.append(result)
    names = list(runs[0]["parts"])
    median = {n: statistics.median(r["parts"][n] for r in runs) for n in names}
    interpreter = statistics.median(r["interpreter"] for r in runs)
    to_first = interpreter + sum(v for n, v in median.items() if not n.startswith("second"))
    rows: list[list[Any]] = [["interpreter start and exit (as the parent sees them)", interpreter, interpreter / to_first]]
    rows += [[n, v, v / to_first] for n, v in median.items()]
    rows.append(["time to the first step", to_first, 1.0])
    first, second = median["first train_step"], median["second train_step (warm, for comparison)"]
    first_table = Table(
        "Start-up: time to the first training step of `regimen train`",
        ["part", "seconds", "share of time to first step"],
        rows,
        rerun_command("startup", quick),
        [
            f"Default strategy (GPT 4 x 128, batch 32, stdlib), {threads()} torch threads; median of {len(runs)} fresh processes.",
            f"First step / warm step = {first / second:.1f}x (allocations, optimizer state, first-call dispatch).",
        ],
        {"seconds": ".3f", "share of time to first step": ".0%"},
    )
    return [help_table, first_table]


def main() -> None:
    if "--worker" in sys.argv:
        print(to_json(worker()))
        return
    cli(run, __doc__)


if __name__ == "__main__":
    main()
