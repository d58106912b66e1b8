"""How good are `regimen plan`'s predictions? Memory and step time, predicted against measured.

(a) Memory. For a matrix of configurations (GPT 1M to 100M parameters, context 256, global batch
8 in one micro-batch per rank; AdamW, Muon, Adafactor, Lion, schedule-free AdamW; 1 process, 2
processes DDP, 2 processes FSDP2; activation checkpointing none and block) the planner's
predicted peak per device (parameters, gradients, optimizer state, activations, communication
buffers; the process's own baseline excluded) against the peak measured by `step_memory`
(VmHWM over two steps minus the resident set before the model was built, after a throwaway run
of the same strategy; glibc's mmap threshold at 64 KiB so the resident set follows the live
tensors; the largest rank). Goal: within 10% on
every row. Beside it, on the same rows, DeepSpeed's estimator formula for the model states
(ZeRO-2 `4P + 16P/N` bytes for 1 process and DDP, ZeRO-3 `4 x largest layer + 18P/N` for
FSDP; P parameters, N devices; mixed-precision Adam, no activations) and the rule of thumb
"Adam is 4x the model" (16 bytes per parameter, divided by N under FSDP).
Adafactor does not run under FSDP2 (it reads norms on the host): those rows are left out.

(b) Time. The same rows (without the isolating malloc setting; freed memory kept for reuse, as
`Trainer.fit` does on a CPU): the planner's predicted step time against the median measured
step, goal within 15%; then "after --calibrate": the same plan's rows after its calibration
(`Planner.calibrate`, what `regimen plan --calibrate` does: one rank's step alone corrects the
compute, each parallel mode trained by its processes corrects that mode's rows), goal within
5%. Timing: run it on a quiet machine.

(c) `batch.micro = "auto"`: for a GPT of 30M parameters (10M with --quick) and a device memory M
(`parallel.memory_gib`), the micro-batch auto chooses, and the largest micro-batch whose
measured peak resident set (default malloc, the whole process) stays within M, found by
bisection over the divisors of the batch. Goal: auto's choice fits, and is at least 80% of the
largest that does. On a CPU nothing runs out of memory at M: "fits" is the measured peak.

    python -m benchmarks.plan_accuracy --quick --part memory    # 1M and 10M, AdamW and Muon (a few minutes)
    python -m benchmarks.plan_accuracy --part memory            # the whole memory matrix (about an hour and a half)
    python -m benchmarks.plan_accuracy --part memory --sizes 30M 100M --optimizers adamw muon   # 24 rows, 17 minutes
    python -m benchmarks.plan_accuracy --part time              # timing: on a quiet machine only
    python -m benchmarks.plan_accuracy --part auto
    python -m benchmarks --only plan_accuracy --write           # all parts into BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from benchmarks.common import Table, cli, threads
from benchmarks.step_memory import GPTS, MiB, gpt, measure, planner, predict_peak
from regimen.calibrate import SECONDS, STEPS
from regimen.registry import OPTIMIZERS as REGISTRY

OPTIMIZERS = ("adamw", "muon", "adafactor", "lion", "schedulefree_adamw")
LAYOUTS = (("none", 1), ("ddp", 2), ("fsdp", 2))
CHECKPOINTING = ("none", "block")
MEMORY_GOAL, TIME_GOAL, CALIBRATED_GOAL, AUTO_GOAL = 0.10, 0.15, 0.05, 0.80


def corpus_source() -> str:
    """A small text corpus (the standard library's first files): loads at once."""
    import sysconfig
    import tempfile
    from pathlib import Path

    path = Path(tempfile.gettempdir()) / "regimen-bench-plan-corpus.txt"
    if not path.exists():
        src = Path(sysconfig.get_paths()["stdlib"])
        path.write_bytes(b"".join(p.read_bytes() for p in sorted(src.glob("*.py"))[:80])[: 2 * MiB])
    return f"data.source=text:{path}"


def overrides(size: str, optimizer: str, mode: str, ckpt: str, extra: list[str] | None = None) -> list[str]:
    lr = ["lr.schedule=constant"] if optimizer.startswith("schedulefree") else []
    return [
        *gpt(size),
        corpus_source(),
        f"optimizer.name={optimizer}",
        *lr,
        "batch.size=8",
        f"parallel.mode={mode}",
        f"parallel.activation_checkpointing={ckpt}",
        *(extra or []),
    ]


def matrix(quick: bool) -> list[tuple[str, str, str, int, str]]:
    sizes: tuple[str, ...] = ("1M", "10M") if quick else tuple(GPTS)
    optimizers: tuple[str, ...] = ("adamw", "muon") if quick else OPTIMIZERS
    # --sizes / --optimizers: a part of the matrix (the whole one takes about an hour and a half).
    sizes = tuple(os.environ["BENCH_PLAN_SIZES"].split(",")) if os.environ.get("BENCH_PLAN_SIZES") else sizes
    optimizers = tuple(os.environ["BENCH_PLAN_OPTIMIZERS"].split(",")) if os.environ.get("BENCH_PLAN_OPTIMIZERS") else optimizers
    return [
        (size, opt, mode, n, ckpt)
        for size in sizes
        for opt in optimizers
        for mode, n in LAYOUTS
        for ckpt in CHECKPOINTING
        if not (mode == "fsdp" and not REGISTRY[opt].meta.get("fsdp", True))  # refused under FSDP2 (regimen.registry)
    ]


def deepspeed_bytes(n_params: int, largest_layer: int, mode: str, n: int) -> float:
    """DeepSpeed's estimator for model states per GPU, without offload (ZeRO-2 / ZeRO-3)."""
    if mode == "fsdp":
        return 4 * largest_layer + 18 * n_params / n
    return 4 * n_params + 16 * n_params / n


def rule_of_thumb_bytes(n_params: int, mode: str, n: int) -> float:
    """ "Adam is 4x the model": 4 x (4 bytes per fp32 parameter), sharded N ways under FSDP."""
    return 16 * n_params / (n if mode == "fsdp" else 1)


def largest_layer(p: Any) -> int:
    """The largest module's own parameters (DeepSpeed's `largest_layer_params`)."""
    from torch import nn

    from regimen.trace import fake_mode

    model: nn.Module = p.make_model(fake_mode())
    return max(sum(q.numel() for q in m.parameters(recurse=False)) for m in model.modules())


def _error(predicted: float, measured: float) -> float:
    return predicted / measured - 1.0


def memory_table(quick: bool) -> Table:
    rows, worst = [], 0.0
    for size, opt, mode, n, ckpt in matrix(quick):
        args = overrides(size, opt, mode, ckpt)
        p = planner(args, n)
        predicted, _ = predict_peak(p)
        measured = measure(args, n, steps=2, isolate=True, threads=1)
        n_params = measured["n_params"]
        ds = deepspeed_bytes(n_params, largest_layer(p), mode, n)
        rule = rule_of_thumb_bytes(n_params, mode, n)
        err = _error(predicted, measured["peak"])
        worst = max(worst, abs(err))
        label = f"{size} {opt} {mode if n == 1 else f'{mode} x{n}'}" + (f" ckpt={ckpt}" if ckpt != "none" else "")
        rows.append(
            [
                label,
                n_params / 1e6,
                measured["peak"] / MiB,
                predicted / MiB,
                err * 100,
                _error(ds, measured["peak"]) * 100,
                _error(rule, measured["peak"]) * 100,
            ]
        )
        print(f"  {label}: measured {measured['peak'] / MiB:.1f} MiB, predicted {predicted / MiB:.1f} MiB ({err:+.1%})", file=sys.stderr)
    met = "met" if worst <= MEMORY_GOAL else "**not met**"
    return Table(
        title="Memory: predicted against measured peak per device (CPU)",
        columns=["configuration", "params M", "measured MiB", "regimen MiB", "regimen err %", "DeepSpeed err %", "4x rule err %"],
        rows=rows,
        command="python -m benchmarks.plan_accuracy --part memory" + (" --quick" if quick else ""),
        fmt={
            "params M": ".2f",
            "measured MiB": ".1f",
            "regimen MiB": ".1f",
            "regimen err %": "+.1f",
            "DeepSpeed err %": "+.0f",
            "4x rule err %": "+.0f",
        },
        notes=[
            "Measured: VmHWM over two steps after the first (which creates the optimizer state) minus the resident set before "
            "the model was built, after a throwaway run of the same strategy had paid the one-off costs (kernels compiled for "
            "these shapes, gloo's connections); MALLOC_MMAP_THRESHOLD_=65536; the largest rank; global batch 8 in one "
            "micro-batch per rank, context 256, float32, 1 thread per process.",
            "regimen: parameters, gradients and optimizer state counted from the real implementation, activations traced on "
            "fake tensors, DDP's buckets and FSDP's gathered blocks modelled; the runtime part of `rest` left out.",
            "DeepSpeed: its estimator's formula for model states (mixed-precision Adam, no activations); 4x rule: 16 bytes "
            "per parameter. Errors are predicted / measured - 1.",
            f"Worst regimen error {worst:.1%}: goal <= {MEMORY_GOAL:.0%} on every row {met}.",
            "CUDA: unmeasured (no GPU on this machine).",
        ],
    )


def time_table(quick: bool) -> Table:
    from regimen.estimate import Layout

    rows: list[list[Any]] = []
    errors, calibrated_errors, repeats = [], [], []
    groups: dict[tuple[str, str, int], list[tuple[str, str]]] = {}
    for size, opt, mode, n, ckpt in matrix(quick):
        groups.setdefault((size, opt, n), []).append((mode, ckpt))
    for (size, opt, n), entries in groups.items():
        # One plan per model and device count, as `regimen plan --devices N --calibrate` makes it:
        # every row's prediction before and after its calibration.
        p = planner(overrides(size, opt, "none" if n == 1 else "ddp", "none"), n)
        plan = p.plan()
        layouts = {(mode, ckpt): Layout(mode, n, ckpt, False, p.share) for mode, ckpt in entries}
        predicted = {key: p.step(layout, p.share).total for key, layout in layouts.items()}
        p.calibrate(plan)
        ran = {layout.label() for layout in p.calibrated["layouts"]}  # one rank alone, and each mode's processes
        calibrated = {key: p.step(layout, p.share).total for key, layout in layouts.items()}
        for mode, ckpt in entries:
            args = overrides(size, opt, mode, ckpt)
            # As many steps as a calibration times (at least 6, about 3 s of them): a 1M step moves by +-5% from one to the next.
            measured = measure(args, n, steps=STEPS, isolate=False, threads=max(1, threads() // n), seconds=SECONDS)["step_s"]
            err, cal_err = _error(predicted[mode, ckpt], measured), _error(calibrated[mode, ckpt], measured)
            errors.append(abs(err))
            calibrated_errors.append(abs(cal_err))
            label = layouts[mode, ckpt].label()
            if label in ran:  # calibrated, its prediction is the calibration's measurement: two runs of one configuration
                repeats.append(cal_err)
            label = f"{size} {opt} {label}" + (" (calibration)" if label in ran else "")
            rows.append([label, measured * 1e3, predicted[mode, ckpt] * 1e3, err * 100, cal_err * 100])
    worst, worst_cal = max(errors, default=0.0), max(calibrated_errors, default=0.0)
    return Table(
        title="Time: predicted against measured step time (CPU)",
        columns=["configuration", "measured ms", "predicted ms", "error %", "after --calibrate %"],
        rows=rows,
        command="python -m benchmarks.plan_accuracy --part time" + (" --quick" if quick else ""),
        fmt={"measured ms": ".1f", "predicted ms": ".1f", "error %": "+.1f", "after --calibrate %": "+.1f"},
        notes=[
            "Measured: the median of at least 6 steps and about 3 s of them after the first (as `--calibrate` times them), "
            "freed memory kept as `Trainer.fit` keeps it (no page faults once warm); "
            "2 processes share the cores (each gets half the threads); each row in its own process (or two), after the plan.",
            "Predicted: each matmul, attention and other op moving over 1 MiB timed here at its shapes in the step's cache state "
            "(operands touched just before in cache, the others and the output not), smaller ops at the measured "
            "memory bandwidth, plus a per-op cost measured on a tiny training step, plus communication without overlap: gloo's "
            "all-reduce, all-gather and reduce-scatter timed here beside computing threads (latency + bandwidth) for each DDP "
            "bucket and FSDP2 unit, and FSDP2's own work: its copies at the memory bandwidth, its hooks' time per unit and "
            "parameter and DTensor's per update op, timed on tiny models in a one-rank group.",
            "After --calibrate: the same plan's rows after `Planner.calibrate` (what `regimen plan --calibrate` does): one rank's "
            "step alone scales compute; with 2 devices, each of ddp and fsdp trained by its 2 processes (its fastest row, marked "
            "'calibration') scales that mode's rows. Those runs are the plan's own; every error is against this table's separate "
            "measurement.",
            f"Worst error {worst:.1%} (goal <= {TIME_GOAL:.0%}: {'met' if worst <= TIME_GOAL else '**not met**'}); after "
            f"calibration {worst_cal:.1%} (goal <= {CALIBRATED_GOAL:.0%}: {'met' if worst_cal <= CALIBRATED_GOAL else '**not met**'}); "
            f"{sum(e <= TIME_GOAL for e in errors)} and {sum(e <= CALIBRATED_GOAL for e in calibrated_errors)} of {len(errors)} rows "
            "within each.",
            "Repeatability: on a row marked 'calibration' the calibrated prediction is the calibration's own measurement, so its "
            "error there is how far two measurements of one configuration a minute apart differ: "
            + (f"{min(repeats):+.1%} to {max(repeats):+.1%} in this run." if repeats else "none in this run."),
        ],
    )


def auto_table(quick: bool) -> Table:
    from regimen.estimate import micro_choices
    from regimen.strategy import BatchConfig

    size, batch = ("10M", 32) if quick else ("30M", 64)
    base = overrides(size, "adamw", "none", "none", [f"batch.size={batch}"])
    # A device memory that holds the training state and about half the batch's activations.
    full = measure([*base, "batch.micro=none"], 1, steps=1, isolate=False)
    smallest = measure([*base, "batch.micro=1"], 1, steps=1, isolate=False)
    memory = (full["hwm"] + smallest["hwm"]) / 2
    gib = memory / 2**30
    auto = measure([*base, "batch.micro=auto", f"parallel.memory_gib={gib:.4f}"], 1, steps=1, isolate=False)
    fits: dict[int, bool] = {}

    def fit(m: int) -> bool:
        if m not in fits:
            fits[m] = measure([*base, f"batch.micro={m}"], 1, steps=1, isolate=False)["hwm"] <= memory
        return fits[m]

    choices = micro_choices(BatchConfig(size=batch), batch)
    lo, hi = 0, len(choices) - 1  # bisection: fits is monotone in the micro-batch below the whole share
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fit(choices[mid]) else (lo, mid - 1)
    largest = choices[lo] if fit(choices[lo]) else 0
    chosen = int(auto["micro"])
    ratio = chosen / largest if largest else math.nan
    ok = auto["hwm"] <= memory and ratio >= AUTO_GOAL
    return Table(
        title=f'batch.micro = "auto" on GPT {size}, AdamW, global batch {batch} (CPU)',
        columns=["device memory MiB", "auto micro", "auto peak MiB", "largest fitting micro", "auto / largest"],
        rows=[[memory / MiB, chosen, auto["hwm"] / MiB, largest, ratio]],
        command="python -m benchmarks.plan_accuracy --part auto" + (" --quick" if quick else ""),
        fmt={"device memory MiB": ".0f", "auto peak MiB": ".0f", "auto / largest": ".2f"},
        notes=[
            "Device memory M: halfway between the measured peaks of micro 1 and of the whole batch in one micro-batch; "
            "peaks are the whole process's VmHWM after the first step, default malloc.",
            f"Largest fitting: bisection over the divisors of {batch} on the measured peak ({len(fits)} runs).",
            f"Goal: auto fits and is >= {AUTO_GOAL:.0%} of the largest that does: {'met' if ok else '**not met**'}.",
        ],
    )


def decompose_table(quick: bool) -> Table:
    """A 2-process step taken apart: a rank alone, two ranks at once without talking, DDP, FSDP2; with the plan's parts."""
    from regimen.devices import torch_threads

    rows: list[list[Any]] = []
    steps = 3 if quick else 6
    for size in ("1M", "10M"):

        def args(mode: str, batch: int, size: str = size) -> list[str]:
            return [a for a in overrides(size, "adamw", mode, "none") if not a.startswith("batch.size")] + [f"batch.size={batch}"]

        alone = measure(args("none", 4), 1, steps=steps, isolate=False, threads=1)["step_s"]
        together = _at_once(args("none", 4), 2, steps)
        with torch_threads(1):  # a rank's share of the cores, as `alone` ran
            p = planner(args("none", 4), 1)
            alone_predicted = p.row(p.given_layout(), p.speed(), 1.0, 4.0).step
        rows.append([f"{size} one process, batch 4, 1 thread", alone * 1e3, alone_predicted.compute * 1e3, 0.0])
        rows.append([f"{size} two such processes at once", max(together) * 1e3, None, None])
        for mode in ("ddp", "fsdp"):
            measured = measure(args(mode, 8), 2, steps=steps, isolate=False, threads=1)["step_s"]
            p = planner(args(mode, 8), 2)
            step = p.row(p.given_layout(), p.speed(), 1.0, 8.0).step
            rows.append([f"{size} {mode} x2, batch 8", measured * 1e3, step.compute * 1e3, step.communication * 1e3])
    return Table(
        title="A 2-process step taken apart (CPU, AdamW)",
        columns=["run", "measured ms", "predicted compute ms", "predicted communication ms"],
        rows=rows,
        command="python -m benchmarks.plan_accuracy --part decompose" + (" --quick" if quick else ""),
        fmt={"measured ms": ".1f", "predicted compute ms": ".1f", "predicted communication ms": ".1f"},
        notes=[
            "Each measured figure is the median step after the first (the slowest rank), freed memory kept; 1 thread per process.",
            "One process with a rank's batch and thread is what the plan predicts a rank's compute from; two of them at once "
            "show what the processes cost each other without communicating; DDP and FSDP2 beyond that are communication "
            "and the wrappers' own work.",
        ],
    )


def _at_once(args: list[str], n: int, steps: int) -> list[float]:
    """Step seconds of `n` independent one-thread processes of `args` started together."""
    import threading

    seconds = [0.0] * n

    def one(i: int) -> None:
        seconds[i] = measure(args, 1, steps=steps, isolate=False, threads=1)["step_s"]

    runs = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    return seconds


PARTS = {"memory": memory_table, "time": time_table, "auto": auto_table, "decompose": decompose_table}


def run(quick: bool) -> list[Table]:
    """The parts `$BENCH_PLAN_PARTS` names (default all: the protocol of `python -m benchmarks`); timing needs a quiet machine."""
    names = os.environ.get("BENCH_PLAN_PARTS", "all")
    return [fn(quick) for name, fn in PARTS.items() if names == "all" or name in names.split(",")]


def main() -> None:
    """`--part memory|time|auto|all`, then `benchmarks.common.cli`'s `--quick` and `--threads`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--sizes", nargs="*", choices=list(GPTS), help="only these GPT sizes (memory and time)")
    parser.add_argument("--optimizers", nargs="*", choices=list(OPTIMIZERS), help="only these optimizers (memory and time)")
    args, rest = parser.parse_known_args()
    os.environ["BENCH_PLAN_PARTS"] = args.part
    if args.sizes:
        os.environ["BENCH_PLAN_SIZES"] = ",".join(args.sizes)
    if args.optimizers:
        os.environ["BENCH_PLAN_OPTIMIZERS"] = ",".join(args.optimizers)
    sys.argv = [sys.argv[0], *rest]
    cli(run, __doc__)


if __name__ == "__main__":
    main()
