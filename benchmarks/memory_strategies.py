"""What the memory strategies buy: peak memory and step time, and the largest GPT that trains here.

A GPT family of width 128k and depth 2k (k = 1, 2, ...; context 256, global batch 8 in one
micro-batch per rank, AdamW, float32) has about 0.4M x k^3 parameters: 85M at k = 6, 680M at
k = 12, 1.6B at k = 16. The strategies: plain (one process), activation checkpointing by block
and selective (one process), FSDP2 over 2 processes, with block checkpointing, and with CPU
offload.

(a) The largest GPT that trains on this machine with each strategy: the largest k whose peak,
as `regimen plan` predicts it (the whole process: its baseline, the tensors, the rest), fits the
memory available (split between the processes on one machine); then that GPT is trained for
real (2 steps after the first, `benchmarks.step_memory`, default malloc) and its measured peak
resident set is compared with the memory: the prediction is only a search; the run decides.
On a CPU nothing runs out of memory at the limit, so "trains" means its measured peak stays
within the memory.

(b) On the largest GPT plain training fits: each strategy's measured peak per process and step
time, against plain. Offload on a CPU keeps the shards where they already are (host memory is
the device's): it should change neither. Timing: run it on a quiet machine.

    python -m benchmarks.memory_strategies --quick            # pretend the machine has 1.5 GiB (a few minutes)
    python -m benchmarks.memory_strategies                    # this machine's available memory (long: the largest GPTs)
    BENCH_MEMORY_GIB=8 python -m benchmarks.memory_strategies  # pretend the machine has 8 GiB
"""

from __future__ import annotations

import os
import sys
from typing import Any

from benchmarks.common import Table, cli, threads
from benchmarks.plan_accuracy import corpus_source
from benchmarks.step_memory import MiB, measure

GiB = 2**30
STRATEGIES: list[tuple[str, int, list[str]]] = [
    ("plain", 1, ["parallel.mode=none"]),
    ("checkpointing (block)", 1, ["parallel.mode=none", "parallel.activation_checkpointing=block"]),
    ("checkpointing (selective)", 1, ["parallel.mode=none", "parallel.activation_checkpointing=selective"]),
    ("FSDP2 x2", 2, ["parallel.mode=fsdp"]),
    ("FSDP2 x2 + checkpointing (block)", 2, ["parallel.mode=fsdp", "parallel.activation_checkpointing=block"]),
    ("FSDP2 x2 + CPU offload", 2, ["parallel.mode=fsdp", "parallel.cpu_offload=true"]),
]


def family(k: int) -> list[str]:
    """The k-th GPT of the family, as overrides."""
    return [f"model.n_layer={2 * k}", f"model.n_head={2 * k}", f"model.d_model={128 * k}", "model.context=256"]


def base(k: int, extra: list[str]) -> list[str]:
    return [*family(k), corpus_source(), "optimizer.name=adamw", "batch.size=8", *extra]


def predicted_peak(k: int, n: int, extra: list[str], machine_memory: float, baseline: float) -> tuple[float, int]:
    """(the planner's whole-process peak per device, parameters) of the k-th GPT under a strategy.

    The process's own part is a training worker's measured `baseline` (not this process's, which
    has grown with the benchmark); the allocator's share is the planner's (default malloc).
    """
    from regimen import estimate
    from regimen.micro import allocator_fraction
    from regimen.plan import Planner, resolve_target
    from regimen.strategy import Strategy

    s = Strategy.load(None, [*base(k, extra), "train.device=cpu"]).resolve()
    p = Planner(s, resolve_target("cpu", n, machine_memory / n / GiB))
    layout = p.given_layout()
    trace = p.trace(layout.checkpointing)
    runtime = estimate.Runtime(baseline, allocator_fraction("cpu"), "a worker's baseline and glibc's heap")
    fp = estimate.footprint(trace, layout, p.share, runtime, True)
    return fp.peak, trace.state.param_bytes // 4


def largest(n: int, extra: list[str], machine_memory: float, baseline: float, k_max: int = 24) -> tuple[int, float, int]:
    """(k, predicted peak, parameters) of the largest GPT of the family predicted to fit, or k = 0."""
    found = (0, 0.0, 0)
    for k in range(1, k_max + 1):
        peak, n_params = predicted_peak(k, n, extra, machine_memory, baseline)
        print(f"  {extra} k={k}: {n_params / 1e6:.0f}M parameters, predicted {peak / MiB:.0f} MiB per process", file=sys.stderr)
        if peak > machine_memory / n:
            break
        found = (k, peak, n_params)
    return found


def largest_table(machine_memory: float, quick: bool) -> tuple[Table, int]:
    rows: list[list[Any]] = []
    plain_k = 0
    baseline = measure(base(1, ["parallel.mode=none"]), 1, steps=1, isolate=False)["baseline"]
    for name, n, extra in STRATEGIES:
        k, predicted, n_params = largest(n, extra, machine_memory, baseline)
        if name == "plain":
            plain_k = k
        if k == 0:
            rows.append([name, None, None, None, None, None, "nothing fits"])
            continue
        limit = machine_memory / n
        run = measure(base(k, extra), n, steps=1 if quick else 2, isolate=False, threads=max(1, threads() // n))
        isolated = measure(base(k, extra), n, steps=1 if quick else 2, isolate=True, threads=max(1, threads() // n))
        trains = "yes" if run["hwm"] <= limit else ("with the mmap threshold" if isolated["hwm"] <= limit else "**no**")
        rows.append([name, n_params / 1e6, predicted / MiB, run["hwm"] / MiB, isolated["hwm"] / MiB, limit / MiB, trains])
    return (
        Table(
            title=f"The largest GPT that trains with each strategy in {machine_memory / GiB:.1f} GiB (CPU)",
            columns=["strategy", "params M", "predicted MiB", "measured MiB", "measured, mmap threshold MiB", "memory MiB", "trains"],
            rows=rows,
            command="python -m benchmarks.memory_strategies" + (" --quick" if quick else ""),
            fmt={
                "params M": ".0f",
                "predicted MiB": ".0f",
                "measured MiB": ".0f",
                "measured, mmap threshold MiB": ".0f",
                "memory MiB": ".0f",
            },
            notes=[
                "GPT family: depth 2k, width 128k, context 256, global batch 8 in one micro-batch per rank, AdamW, float32.",
                "Largest: the largest k whose predicted whole-process peak (regimen plan's model, with a training process's "
                "measured baseline) fits; then trained for real and its measured peak resident set (VmHWM after the first step, "
                "whole process) compared with the memory, with glibc's defaults and with MALLOC_MMAP_THRESHOLD_=65536.",
                "Memory is per process: two processes share the machine's memory, each gets half.",
            ],
        ),
        plain_k,
    )


def buy_table(k: int, quick: bool) -> Table:
    rows: list[list[Any]] = []
    ref: dict[str, float] = {}
    for name, n, extra in STRATEGIES:
        memory = measure(base(k, extra), n, steps=2, isolate=True, threads=max(1, threads() // n))
        timed = measure(base(k, extra), n, steps=2 if quick else 5, isolate=False, threads=max(1, threads() // n))
        run = {"peak": memory["peak"], "step_s": timed["step_s"]}
        if name == "plain":
            ref = run
        rows.append([name, run["peak"] / MiB, run["peak"] / ref["peak"], run["step_s"] * 1e3, run["step_s"] / ref["step_s"]])
    n_params = 12 * (2 * k) * (128 * k) ** 2
    return Table(
        title=f"What each strategy costs and saves on the largest GPT plain training fits (k = {k}, {n_params / 1e6:.0f}M parameters)",
        columns=["strategy", "training peak MiB per process", "x plain", "step ms", "x plain time"],
        rows=rows,
        command="python -m benchmarks.memory_strategies" + (" --quick" if quick else ""),
        fmt={"training peak MiB per process": ".0f", "x plain": ".2f", "step ms": ".0f", "x plain time": ".2f"},
        notes=[
            "Training peak: what a step adds to the process (benchmarks.step_memory: VmHWM over the steps after the first minus "
            "the resident set before the model, MALLOC_MMAP_THRESHOLD_=65536), the largest rank. Step: the median, default "
            "malloc, in a separate run. Two processes share the cores (half the threads each).",
            "CPU offload on a CPU moves nothing (host memory is the device's): same memory, a little more copying.",
        ],
    )


def run(quick: bool) -> list[Table]:
    """Both tables (the protocol of `python -m benchmarks`); `--quick` pretends the machine has 1.5 GiB."""
    from regimen.devices import host_memory_available

    memory = float(os.environ.get("BENCH_MEMORY_GIB", "0")) * GiB or (1.5 * GiB if quick else float(host_memory_available()))
    largest_t, k = largest_table(memory, quick)
    tables = [largest_t]
    if k > 0:
        tables.append(buy_table(k, quick))
    return tables


if __name__ == "__main__":
    cli(run, __doc__)
