"""`regimen plan --calibrate`: real training steps on this machine, for the planner to correct itself.

Two measurements, both of the strategy's own model and data at a fixed global batch (the
largest the plan holds), both in new processes set up as `Trainer.fit` sets a CPU's (freed
memory kept), both the median of at least 6 steps and about 3 s of them (`timed_steps`) after a
first one that creates the optimizer's state and warms the kernels:

- `one_rank`: one rank's work alone, in a process of its own: the layout without a parallel mode, a
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
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from regimen.errors import UserError
from regimen.estimate import Layout
from regimen.strategy import Strategy

if TYPE_CHECKING:
    from regimen.trainer import Trainer

STEPS = 6  # timed steps per measurement at least (after one untimed): their median ...
SECONDS = 3.0  # ... and about this long in all: a 1M GPT's CPU step moves by +-5% from one to the next
MAX_STEPS = 40


def at_batch(strategy: Strategy, layout: Layout, batch: int) -> Strategy:
    """`strategy` with `layout`'s parallel mode, checkpointing, offload and micro-batch, at a fixed global `batch`.

    >>> s = at_batch(Strategy.load(None, ["batch.schedule=ramp", "batch.start=2", "batch.span=10"]), Layout("ddp", 2, "block", False, 4), 8)
    >>> (s.batch.schedule, s.batch.size, s.batch.micro, s.parallel.mode, s.parallel.activation_checkpointing)
    ('fixed', 8, 4, 'ddp', 'block')
    """
    tree = strategy.to_dict()
    # A batch schedule would measure its first steps' sizes, not the one the plan prices.
    tree["batch"] = {"schedule": "fixed", "size": batch}
    tree.setdefault("observe", {})["progress"] = "none"
    return replace(layout, micro=min(layout.micro, max(1, batch // layout.devices))).applied_to(Strategy.from_dict(tree))


def one_rank(strategy: Strategy, layout: Layout, share: int, threads: int, steps: int = STEPS) -> dict[str, float]:
    """One rank's step alone (`layout` without its parallel mode, `share` samples, `threads` threads) in a new process.

    Returns the median step in seconds, the peak of the tensors a step holds (parameters,
    optimizer state, gradients, activations), and the rest: the process's peak resident set
    beyond those tensors (Python, torch, the data, the allocator's slack). A process of its own,
    as `regimen train` has: the planning process's heap, after timing ops in it, is not a
    training process's.
    """
    alone = Layout("none", 1, layout.checkpointing, False, layout.micro)
    (figures,) = _run(at_batch(strategy, alone, share), alone, threads, steps)
    return figures


def processes(strategy: Strategy, layout: Layout, batch: int, threads: int, steps: int = STEPS) -> float:
    """The median step in seconds of `layout` trained by its `layout.devices` processes here (the slowest rank's).

    torchrun starts them on this machine (loopback rendezvous); each runs `threads` intra-op
    threads.
    """
    return max(figures["step_s"] for figures in _run(at_batch(strategy, layout, batch), layout, threads, steps))


def _run(strategy: Strategy, layout: Layout, threads: int, steps: int) -> list[dict[str, float]]:
    """Each rank's figures from `_worker`, in processes of their own; a failure raises a UserError with its last lines."""
    from regimen.launch import ERROR_DIR_ENV, first_user_error, torchrun

    with tempfile.TemporaryDirectory(prefix="regimen-calibrate-") as tmp:
        work = Path(tmp)
        strategy.save(work / "strategy.toml")
        log = work / "output.txt"
        worker = ["-m", "regimen.calibrate", str(work), str(threads), str(steps)]
        with log.open("w") as out:
            if layout.devices > 1:
                code = torchrun(["--standalone", f"--nproc-per-node={layout.devices}", *worker], output=out)
            else:
                (work / "errors").mkdir()
                env = {**os.environ, ERROR_DIR_ENV: str(work / "errors")}
                code = subprocess.call([sys.executable, *worker], env=env, stdout=out, stderr=subprocess.STDOUT)
                line = first_user_error(work / "errors")
                if code != 0 and line is not None:
                    raise UserError(line)
        figures = [json.loads(p.read_text()) for p in sorted(work.glob("rank-*.json"))]
        if code != 0 or len(figures) != layout.devices:
            tail = " | ".join(line.strip() for line in log.read_text(errors="replace").splitlines()[-3:] if line.strip())
            where = "one process" if layout.devices == 1 else f"{layout.devices} processes"
            raise UserError(f"--calibrate: {layout.label()} on {where} here failed (exit {code}): {tail}")
    return figures


def _worker(work: Path, threads: int, steps: int) -> int:
    """One rank: a warm step, then `timed_steps`; their median (alone: and the memory) into `work/rank-K.json`."""
    from regimen.launch import keep_until_exit
    from regimen.task import build_task
    from regimen.trace import Recorder
    from regimen.trainer import Trainer

    torch.set_num_threads(threads)
    s = Strategy.load(work / "strategy.toml")
    trainer = Trainer(s, build_task(s))
    keep_until_exit(trainer)  # its process group lives until the worker ends (regimen.launch)
    if trainer.device.type == "cpu":
        from regimen import host_memory

        host_memory.keep_freed_memory()  # as `Trainer.fit` runs on a CPU: no page faults once warm
    _reset_peak_resident()
    trainer.train_step()  # creates the optimizer's state
    figures = {"step_s": statistics.median(timed_steps(trainer, steps))}
    if not trainer.dist.enabled:
        recorder = Recorder()
        recorder.hold(trainer.model.parameters(), "params")
        recorder.hold([v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)], "optimizer")
        with recorder:
            trainer.train_step()
        figures["tensor_peak"] = float(recorder.peak_total)
        # Everything the process held at its peak beyond the training tensors: Python, torch, the data, the allocator.
        figures["rest"] = max(_peak_resident() - figures["tensor_peak"], 0.0)
    report = work / f"rank-{int(os.environ.get('RANK', '0')):05d}.json"
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures))
    os.replace(tmp, report)  # the launcher reads whole figures or none
    return 0


def timed_steps(trainer: Trainer, steps: int = STEPS, seconds: float = SECONDS) -> list[float]:
    """Seconds of each of at least `steps` training steps, and about `seconds` of them (`MAX_STEPS` at most).

    The count comes from the first step's time, the smallest over ranks: every rank runs the
    same steps (each ends in a collective).
    """
    times = [_timed_step(trainer)]
    wanted = min(MAX_STEPS, max(steps, math.ceil(seconds / max(times[0], 1e-6))))
    # On the step's device: NCCL reduces only device tensors.
    count = int(trainer.dist.all_reduce_min(torch.tensor([float(wanted)], device=trainer.device)).item())
    times += [_timed_step(trainer) for _ in range(count - 1)]
    return times


def _timed_step(trainer: Trainer) -> float:
    start = time.perf_counter()
    trainer.train_step()
    return time.perf_counter() - start


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
