"""What the `regimen tune` benchmarks share: the four tasks, and how to run a search, a full run and a grid.

The tasks, sized for a 2-core CPU (a full run takes seconds to a minute with one thread):

- `gpt`: the byte-level GPT on the standard library (2 layers, d_model 64, context 64, batch 16,
  Muon + WSD as the default task), 1,000 steps (the default space needs a first rung of 20 steps);
- `mlp`: the MLP on the synthetic 10-class Gaussian mixture (hidden 128, batch 32, AdamW +
  cosine), 1,500 steps;
- `mlp-1pass`: the same MLP on 60,000 samples, so its 48,000 are 0.9 epoch (the `mlp` task
  trains 4.4 epochs of 10,800 and overfits: its loss at the full budget ranks LRs unlike any
  shorter rung);
- `cnn`: the conv net on the 16x16 shapes (examples/cnn_shapes.toml), 600 steps.

`--quick` halves every budget and searches a small space (two families, two LRs each, eta 2,
CONFIG not among the candidates):
a smoke test of the benchmark itself; its numbers mean little.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

TASKS: dict[str, list[str]] = {
    "gpt": [
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=4",
        "model.context=64",
        "batch.size=16",
        "train.steps=1000",
        "train.eval_every=100",
        "train.eval_samples=256",
    ],
    "mlp": [
        "model.name=mlp",
        "model.hidden=[128]",
        "data.source=synthetic",
        "optimizer.name=adamw",
        "optimizer.lr=3e-3",
        "optimizer.weight_decay=0.01",
        "optimizer.betas=[0.9, 0.999]",
        "lr.schedule=cosine",
        "lr.min_lr=0.0",
        "batch.size=32",
        "train.steps=1500",
        "train.eval_every=250",
        "train.eval_samples=0",
    ],
    "cnn": ["examples/cnn_shapes.toml"],
}
TASKS["mlp-1pass"] = [*TASKS["mlp"], "data.num_samples=60000"]
STEPS = {"gpt": 1000, "mlp": 1500, "mlp-1pass": 1500, "cnn": 600}


QUICK_SPACE = """
[search]
families = ["adamw-wsd", "adamw-cosine"]
lr_points = 2
eta = 2
config = false   # five candidates would not fit 3x at this size
"""


def task_args(name: str, quick: bool, out: Path, space: bool = True) -> list[str]:
    """CONFIG and overrides of a task (the default task for gpt); --quick halves the steps and narrows the space."""
    args = list(TASKS[name])
    args.append(f"train.steps={STEPS[name] // (2 if quick else 1)}")
    if quick and space:
        out.mkdir(parents=True, exist_ok=True)
        (out / "quick_space.toml").write_text(QUICK_SPACE)
        args += ["--space", str(out / "quick_space.toml")]
    return args


def env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def regimen(*args: str, threads: int = 1, check: bool = True) -> tuple[subprocess.CompletedProcess[str], float]:
    """`python -m regimen ARGS` from the repository root; (the process, its wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "regimen", *args], cwd=ROOT, env=env(threads), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise RuntimeError(f"regimen {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc, seconds


def open_search(out: Path) -> Any:
    """The finished search in `out`, read back through its own study (nothing trains)."""
    from regimen.search.engine import Budget, Search
    from regimen.search.space import Space
    from regimen.strategy import Strategy

    spec = json.loads((out / "search.json").read_text())
    from regimen.search.space import Family

    space = Space(
        tuple(Family(f["name"], f["fixed"], f["grid"]) for f in spec["space"]["families"]),
        spec["space"]["lr_points"],
        spec["space"]["lr_spread"],
        spec["space"]["eta"],
        spec["space"].get("batch", "probe"),
    )
    search = Search(Strategy.from_dict(spec["base"]), space, Budget(**spec["budget"]), out, executor=None, world=spec["world"])  # type: ignore[arg-type]
    search.open()
    return search


def tune_result(out: Path) -> dict[str, Any]:
    """The winner, its loss at the full budget, and the samples the whole search trained."""
    from regimen.search.result import outcomes

    search = open_search(out)
    results, winner, phases = outcomes(search)
    assert winner is not None
    loss = next(o.losses[-1] for o in results if o.candidate.name == winner.name)
    return {"search": search, "winner": winner.name, "loss": loss, "samples": sum(phases.values()), "phases": phases}


def full_run(strategy: Any, run_dir: Path) -> float:
    """Train `strategy` for its whole budget in `run_dir` (in this process); its final validation loss."""
    from regimen.rundir import read_summary
    from regimen.runner import run_training

    if (read_summary(run_dir) or {}).get("status") != "finished":
        run_training(strategy.replace({"observe.report": False, "observe.progress": "none"}), run_dir, resume="auto", quiet=True)
    summary = read_summary(run_dir) or {}
    return float(summary["final_val_loss"])
