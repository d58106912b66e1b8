"""Measured and predicted peak memory and step time of one training layout (shared by plan_accuracy
and memory_strategies).

Measured: a worker process (one, or two under torchrun) builds the real trainer
(`regimen.trainer.Trainer`: the model wrapped as training wraps it, regimen's optimizer and
micro-batching) and runs real steps. The peak that counts is the training step's: a first,
throwaway run of the same strategy pays the one-off costs (torch's kernels compiled and cached
for these shapes, such as oneDNN's JIT, code pages, gloo's connections) and is deleted (with
glibc's defaults, a tiny model of the strategy instead: the heap would keep a full-size run's
freed memory); the resident set (VmRSS) is then read (the baseline: Python, torch, the corpus,
those caches), the model, its wrapper and its optimizer are built again and a first step
creates the optimizer's state; the peak-RSS counter (VmHWM) is then restarted
(/proc/self/clear_refs, so one-off peaks of building and sharding the model do not count) and
`steps` more steps run. Measured peak = VmHWM - baseline: parameters, gradients, optimizer
state, activations, communication buffers and whatever the allocator keeps. With
`MALLOC_MMAP_THRESHOLD_=65536` (the `isolate` flag) glibc gives every block of 64 KiB or more its
own mapping and returns it when freed, so the resident set follows the live tensors and not the
heap's history; without it the figure is what a default process holds. Under torchrun the
largest rank is reported.

Predicted: `regimen.plan.Planner` for the same strategy and layout, the peak without the
runtime part of its "rest" (the process baseline and allocator allowance), since the
measurement excludes the baseline.

    python -m benchmarks.step_memory '{"overrides": ["model.n_layer=2"], "steps": 2}'   # one worker, prints JSON
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, run_worker, to_json

MiB = 2**20
# A GPT family: (n_layer, n_head, d_model); about 12 * n_layer * d_model^2 parameters in the blocks.
GPTS = {
    "1M": (4, 4, 128),
    "10M": (6, 6, 384),
    "30M": (8, 8, 512),
    "100M": (12, 12, 768),
}


def gpt(size: str, context: int = 256) -> list[str]:
    """Overrides for a GPT of the family."""
    n_layer, n_head, d_model = GPTS[size]
    return [f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.d_model={d_model}", f"model.context={context}"]


def _status(key: str) -> int:
    found = re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())
    assert found is not None, f"/proc/self/status has no {key}"
    return int(found.group(1)) * 1024


def worker(overrides: list[str], steps: int, isolate: bool, seconds: float = 0.0) -> dict[str, Any]:
    """One rank: the measurement of the module docstring; rank 0 returns the largest rank's figures.

    `seconds` > 0: at least `steps` timed steps and about `seconds` of them, as `regimen plan
    --calibrate` times its steps (`regimen.calibrate.timed_steps`).
    """
    import torch
    import torch.distributed as dist

    from regimen.calibrate import timed_steps
    from regimen.data import load_source
    from regimen.launch import keep_until_exit
    from regimen.models import build_model, count_parameters
    from regimen.strategy import Strategy
    from regimen.task import Task, cross_entropy
    from regimen.trainer import Trainer

    s = Strategy.load(None, [*overrides, "observe.progress=none", "train.device=cpu"]).resolve()
    data = load_source(s.data, s.model.context)
    # One-off costs first: torch's kernels compiled and cached for these shapes (oneDNN's JIT),
    # code pages, gloo's connections. They belong to the process, like its libraries, not to a
    # step. With `isolate` (freed blocks go back to the OS) a throwaway run of the same strategy
    # pays them; with glibc's defaults its freed memory would stay in the heap and count, so a
    # tiny model of the same strategy runs instead.
    shape = [] if isolate else ["model.n_layer=1", "model.d_model=32", "model.n_head=2"]
    first = Strategy.load(None, [*overrides, *shape, "observe.progress=none", "train.device=cpu"]).resolve()
    throwaway = Trainer(first, Task(build_model(first.model, vocab_size=data.vocab_size), data, loss=cross_entropy))
    for _ in range(2):
        throwaway.train_step()
    throwaway.dist.barrier()
    del throwaway
    gc.collect()
    baseline, file_before = _status("VmRSS"), _status("RssFile")
    torch.manual_seed(s.train.seed)
    model = build_model(s.model, vocab_size=data.vocab_size)
    n_params = count_parameters(model)
    trainer = Trainer(s, Task(model, data, loss=cross_entropy))
    if not isolate:
        from regimen import host_memory

        host_memory.keep_freed_memory()  # what `Trainer.fit` does on a CPU: no page faults once warm
    trainer.train_step()  # creates the optimizer's state
    Path("/proc/self/clear_refs").write_text("5")  # the peak of the steps below only
    times = timed_steps(trainer, steps, seconds)  # as `regimen plan --calibrate` times its steps (`steps` when `seconds` is 0)
    mine = torch.tensor(
        [_status("VmHWM") - baseline, _status("VmHWM"), statistics.median(times), _status("RssFile") - file_before], dtype=torch.float64
    )
    if dist.is_initialized():
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        # Not destroyed: gloo's threads may still release the last collective's tensors; the
        # worker ends as `regimen train`'s do (regimen.launch: a SIGABRT at exit otherwise).
        keep_until_exit(trainer)
    peak, hwm, step_s, file_growth = mine.tolist()
    return {
        "peak": peak,
        "hwm": hwm,
        "baseline": baseline,
        "step_s": step_s,
        "n_params": n_params,
        "micro": trainer.strategy.batch.micro,
        "file": file_growth,
    }


def measure(
    overrides: list[str], nproc: int, steps: int = 2, isolate: bool = True, threads: int = 1, timeout: float = 3600, seconds: float = 0.0
) -> dict[str, Any]:
    """Run `worker` in its own process (or two under torchrun); its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if isolate:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    payload = json.dumps({"overrides": overrides, "steps": steps, "isolate": isolate, "seconds": seconds})
    if nproc == 1:
        cmd = [sys.executable, "-m", "benchmarks.step_memory", payload]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += ["-m", "benchmarks.step_memory", payload]
    return run_worker(cmd, timeout=timeout, env=env)


def planner(overrides: list[str], nproc: int) -> Any:
    """A `regimen.plan.Planner` for the strategy on `nproc` CPU processes of this machine."""
    from regimen.plan import Planner, resolve_target
    from regimen.strategy import Strategy

    s = Strategy.load(None, [*overrides, "train.device=cpu"]).resolve()
    return Planner(s, resolve_target("cpu", nproc, 1024.0))


def predict_peak(p: Any) -> tuple[float, Any]:
    """(predicted training peak in bytes without the runtime part, the footprint) of the given layout."""
    from regimen import estimate

    layout = p.given_layout()
    fp = estimate.footprint(p.trace(layout.checkpointing), layout, p.share, p.runtime(), True, p.strategy.parallel.fsdp_bf16)
    return fp.peak - fp.runtime, fp


if __name__ == "__main__":
    from regimen.launch import end_worker

    args = json.loads(sys.argv[1])
    result = worker(args["overrides"], int(args["steps"]), bool(args.get("isolate", True)), float(args.get("seconds", 0.0)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(to_json(result), flush=True)
    end_worker(0)
