"""`regimen plan --calibrate`: real training steps on this machine, for the planner to correct itself.

Two measurements, both of the strategy's own model and data at a fixed global batch (the
largest the plan holds), both the median of a few steps after a first one that creates the
optimizer's state and warms the kernels:

- `one_rank`: one rank's work alone, in this process: the layout without a parallel mode, a
  rank's share of the batch and, where N ranks share this CPU, a rank's share of its threads.
  It is what the planner's compute model predicts; it also measures the memory a rank holds.
- `processes`: the layout as it would train, N processes started with torchrun on this machine
  (CPU ranks share the host; GPU ranks need N devices here). What a parallel mode costs beyond
  a rank's compute (its collectives under load, the wrappers' own work per unit and per
  micro-batch) is in this figure and in no model.

Example:
    >>> from regimen.strategy import Strategy
    >>> s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "batch.size=8", "train.device=cpu"])
    >>> times = one_rank(s, Layout("none", 1, "none", False, 8), share=8, threads=1, steps=2)
    >>> times["step_s"] > 0 and times["tensor_peak"] > 0
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from regimen.errors import UserError
from regimen.estimate import Layout
from regimen.strategy import Strategy

if TYPE_CHECKING:
    from regimen.trainer import Trainer

STEPS = 6  # timed steps per measurement (after one untimed): their median


def at_batch(strategy: Strategy, layout: Layout, batch: int) -> Strategy:
    """`strategy` with `layout`'s parallel mode, checkpointing, offload and micro-batch, at a fixed global `batch`.

    >>> s = at_batch(Strategy.load(None, ["batch.schedule=ramp", "batch.start=2", "batch.span=10"]), Layout("ddp", 2, "block", False, 4), 8)
    >>> (s.batch.schedule, s.batch.size, s.batch.micro, s.parallel.mode, s.parallel.activation_checkpointing)
    ('fixed', 8, 4, 'ddp', 'block')
    """
    tree = strategy.to_dict()
    # A batch schedule would measure its first steps' sizes, not the one the plan prices.
    tree["batch"] = {"schedule": "fixed", "size": batch, "micro": min(layout.micro, max(1, batch // layout.devices))}
    tree["parallel"] = {
        **tree.get("parallel", {}),
        "mode": layout.mode,
        "activation_checkpointing": layout.checkpointing,
        "cpu_offload": layout.offload,
    }
    tree.setdefault("observe", {})["progress"] = "none"
    return Strategy.from_dict(tree)


def one_rank(strategy: Strategy, layout: Layout, share: int, threads: int, steps: int = STEPS) -> dict[str, float]:
    """One rank's step alone in this process (`layout` without its parallel mode, `share` samples, `threads` threads).

    Returns the median step in seconds, the peak of the tensors a step holds (parameters,
    optimizer state, gradients, activations), and the rest: the process's peak resident set
    beyond those tensors (Python, torch, the data, the allocator's slack).
    """
    from regimen.devices import torch_threads
    from regimen.task import build_task
    from regimen.trace import Recorder
    from regimen.trainer import Trainer

    alone = Layout("none", 1, layout.checkpointing, False, layout.micro)
    s = at_batch(strategy, alone, share)
    with torch_threads(threads):
        trainer = Trainer(s, build_task(s))
        _as_fit_runs(trainer)
        _reset_peak_resident()
        trainer.train_step()  # creates the optimizer's state
        times = _timed_steps(trainer, steps)
        recorder = Recorder()
        recorder.hold(trainer.model.parameters(), "params")
        recorder.hold([v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)], "optimizer")
        with recorder:
            trainer.train_step()
    tensor_peak = float(recorder.peak_total)
    return {"step_s": statistics.median(times), "tensor_peak": tensor_peak, "rest": max(_peak_resident() - tensor_peak, 0.0)}


def processes(strategy: Strategy, layout: Layout, batch: int, threads: int, steps: int = STEPS) -> float:
    """The median step in seconds of `layout` trained by its `layout.devices` processes here (the slowest rank's).

    torchrun starts them on this machine (loopback rendezvous); each runs `threads` intra-op
    threads. A rank that fails raises a UserError with the last lines it wrote.
    """
    from regimen.launch import torchrun

    s = at_batch(strategy, layout, batch)
    with tempfile.TemporaryDirectory(prefix="regimen-calibrate-") as tmp:
        work = Path(tmp)
        s.save(work / "strategy.toml")
        log = work / "output.txt"
        with log.open("w") as out:
            code = torchrun(
                ["--standalone", f"--nproc-per-node={layout.devices}", "-m", "regimen.calibrate", str(work), str(threads), str(steps)],
                output=out,
            )
        medians = [json.loads(p.read_text())["step_s"] for p in sorted(work.glob("rank-*.json"))]
        if code != 0 or len(medians) != layout.devices:
            tail = " | ".join(line.strip() for line in log.read_text(errors="replace").splitlines()[-3:] if line.strip())
            raise UserError(f"--calibrate: {layout.label()} on {layout.devices} processes here failed (exit {code}): {tail}")
    return max(medians)


def _as_fit_runs(trainer: Trainer) -> None:
    """The process's malloc set as `Trainer.fit` sets it: on a CPU, freed memory kept (no page faults once warm)."""
    from regimen import host_memory

    if trainer.device.type == "cpu":
        host_memory.keep_freed_memory()


def _timed_steps(trainer: Trainer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return times


def _worker(work: Path, threads: int, steps: int) -> int:
    """One rank of `processes`: a warm step, `steps` timed ones, its median into `work/rank-K.json`."""
    from regimen.launch import keep_until_exit
    from regimen.task import build_task
    from regimen.trainer import Trainer

    torch.set_num_threads(threads)
    s = Strategy.load(work / "strategy.toml")
    trainer = Trainer(s, build_task(s))
    keep_until_exit(trainer)  # its process group lives until the worker ends (regimen.launch)
    _as_fit_runs(trainer)
    trainer.train_step()
    median = statistics.median(_timed_steps(trainer, steps))
    report = work / f"rank-{int(os.environ.get('RANK', '0')):05d}.json"
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step_s": median}))
    os.replace(tmp, report)  # the launcher reads a whole figure or none
    return 0


def _reset_peak_resident() -> None:
    with contextlib.suppress(OSError):  # Linux: restart the peak-RSS count (VmHWM) from now
        Path("/proc/self/clear_refs").write_text("5")


def _peak_resident() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 0.0


if __name__ == "__main__":
    from regimen.launch import end_worker, exit_code_of

    end_worker(exit_code_of(lambda: _worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
