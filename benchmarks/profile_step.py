"""Where regimen's step spends its time, against the hand-written step, with evidence the load cannot move.

Everything here compares `Trainer.train_step` with `loop_speed`'s hand-written step on the same
GPT (10M parameters: 6 layers, width 384, context 64), batch 12, fused AdamW, reading the same
batches. On a shared machine timings are noise, so the tables rest on what a busy machine
still counts exactly:

1. The top operators of regimen's step (torch.profiler, self CPU time): where a step goes.
2. The operator calls regimen's step makes in addition to the hand-written one, by name and
   input shapes (`record_shapes`), with clipping at 1.0 on both sides and with clipping off
   (where regimen still computes the gradient norm for its non-finite guard): counts.
3. Page faults per step (`ru_minflt`), in fresh processes: the hand-written loop and regimen's
   `fit`, each with glibc's default allocator behaviour and with regimen's fixed thresholds
   (`regimen.host_memory`); a fault costs about 1 us of CPU (the kernel zeroes the page), so
   10,000 faults are 10 ms of a step. The earlier profile's "one more aten::copy_ costing 19 ms"
   compared two profiles taken one after the other: the same calls, with more self time, and
   faults are charged to the operator that first touches fresh pages (copies, mostly); whether
   a process falls into the faulting state depends on the order of its allocations, not on the
   loop.
4. The two steps interleaved in one process (same load on both): their time ratio, median and
   range over blocks.
5. The loop's own overhead on a model too small to matter.

    python -m benchmarks --only profile_step [--quick]
"""

from __future__ import annotations

import collections
import copy
import itertools
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import Table, cli, python_command, rerun_command, run_worker, set_threads, threads, to_json
from benchmarks.loop_speed import BATCH, CONTEXT, LR, SEED, SIZES, WEIGHT_DECAY, hand_step, make_optimizer

TOP = 15
SIZE = "10M"
CLIP = 1.0


def profile(step: Callable[[], Any], warmup: int, steps: int) -> tuple[dict[str, tuple[float, float]], float]:
    """Per-operator (self CPU ms per step, calls per step) and the wall ms per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(warmup):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    ops = {e.key: (e.self_cpu_time_total / 1000 / steps, e.count / steps) for e in prof.key_averages()}
    return ops, 1000 * wall


def op_counts(step: Callable[[], Any], steps: int = 2) -> collections.Counter[tuple[str, str]]:
    """Calls per (operator, input shapes) over `steps` steps, after one untimed step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for e in prof.events():
        if not e.name.startswith(("ProfilerStep", "## ", "Optimizer.")):
            counts[(e.name, str([list(s) for s in e.input_shapes if s]))] += 1
    return counts


def pair(size: str, clip: float, extra: list[str] | None = None) -> tuple[Any, Callable[[], None], Callable[[], None]]:
    """regimen's trainer and two step functions on identical copies of the model: (trainer, hand, regimen)."""
    from regimen.strategy import Strategy
    from regimen.task import build_task
    from regimen.trainer import Trainer

    overrides = [f"model.{k}={v}" for k, v in SIZES[size].items()] + [
        f"model.context={CONTEXT}",
        "optimizer.name=adamw",
        f"optimizer.lr={LR}",
        f"optimizer.weight_decay={WEIGHT_DECAY}",
        "optimizer.betas=[0.9, 0.999]",
        "lr.schedule=constant",
        f"batch.size={BATCH}",
        f"train.clip={clip}",
        f"train.seed={SEED}",
        "train.device=cpu",
        "observe.progress=none",
        *(extra or []),
    ]
    strategy = Strategy.load(None, overrides).resolve()
    trainer = Trainer(strategy, build_task(strategy))
    trainer.model.train()
    model = copy.deepcopy(trainer.model)
    optimizer = make_optimizer(model)
    params = list(model.parameters())
    position = iter(range(10**9))

    def hand() -> None:
        x, y = trainer.data.train.gather(trainer.order.take(BATCH * next(position), BATCH))
        hand_step(model, params, optimizer, x, y, clip)

    def ours() -> None:  # the step as fit() runs it, without logging
        out = trainer.train_step()
        trainer.progress = trainer.progress.advanced(out["batch_size"], trainer.data.tokens_per_sample)

    return trainer, hand, ours


def extra_calls_table(quick: bool) -> Table:
    """Operator calls regimen's step adds, by name and shapes, with clipping on and off."""
    import torch

    rows: list[list[Any]] = []
    notes = []
    for clip in (CLIP, 0.0):
        trainer, hand, ours = pair(SIZE, clip)
        shapes = {str(list(p.shape)) for p in trainer.model.parameters() if p.dim() >= 2}
        a, b = op_counts(hand), op_counts(ours)
        per_param = 0
        for key in sorted(set(a) | set(b)):
            diff = (b[key] - a[key]) / 2
            if diff == 0:
                continue
            name, args = key
            big = any(shape in args for shape in shapes)
            per_param += int(big and diff > 0)
            rows.append([f"clip {clip:g}", name, args if len(args) < 60 else args[:57] + "...", diff, "yes" if big else ""])
        n_params = sum(1 for _ in trainer.model.parameters())
        notes.append(
            f"clip {clip:g}: {per_param} operator/shape pair(s) on parameter-shaped (2-D) tensors that the hand-written step "
            f"does not make, over the model's {n_params} parameters"
            + (" (the gradient norm of the non-finite guard: one read of every gradient)." if clip == 0 else ".")
        )
        del trainer
    torch.set_num_threads(threads())
    return Table(
        "Operator calls regimen's step adds to the hand-written step",
        ["clipping", "operator", "input shapes", "extra calls/step", "parameter-shaped"],
        rows,
        rerun_command("profile_step", quick),
        [
            f"GPT {SIZE} ({SIZES[SIZE]}), batch {BATCH}, fused AdamW, the same model and batches on both sides; "
            "torch.profiler with record_shapes over 2 steps after one. A negative count: the hand-written step makes more "
            "(torch's clip_grad_norm_ multiplies every gradient by min(1, max_norm / norm); regimen only when that changes them).",
            *notes,
        ],
        {"extra calls/step": ".1f"},
    )


# ---- page faults in fresh processes -------------------------------------------------------------


def faults_worker(kind: str, size: str, steps: int) -> dict[str, Any]:
    """Minor page faults of each step of `kind` ("hand" or "regimen") in this process."""
    import torch

    from benchmarks.loop_speed import make_workload, regimen_loop

    torch.set_num_threads(threads())
    faults: list[int] = []

    def count() -> None:
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    if kind == "hand":
        w = make_workload(size, steps)
        model, optimizer = w.model, make_optimizer(w.model)
        params = list(model.parameters())
        model.train()
        for step in range(steps):
            x, y = w.windows.gather(w.batch_ids(step))
            hand_step(model, params, optimizer, x, y, 0.0)
            count()
    else:
        regimen_loop(size, steps, hooks=[lambda *_: count()])
    per_step = [b - a for a, b in itertools.pairwise(faults)][steps // 2 :]  # the second half: past the first steps' allocations
    return {"kind": kind, "malloc": os.environ.get("REGIMEN_MALLOC", "kept"), "faults": per_step}


def faults_table(quick: bool) -> Table:
    steps, processes = (8, 1) if quick else (20, 3)
    rows = []
    for kind, malloc in (("hand", "default"), ("regimen", "default"), ("regimen", "kept")):
        per_process = []
        for _ in range(processes):
            env = (
                {**os.environ, "REGIMEN_MALLOC": "default"}
                if malloc == "default"
                else {k: v for k, v in os.environ.items() if k != "REGIMEN_MALLOC"}
            )
            cmd = python_command("profile_step", "--faults-worker", kind, "--size", SIZE, "--steps", str(steps))
            per_process.append(run_worker(cmd, timeout=3600, env=env)["faults"])
        means = [statistics.fmean(f) for f in per_process]
        label = {"hand": "hand-written loop", "regimen": "regimen fit"}[kind]
        rows.append(
            [
                f"{label}, glibc {'default thresholds' if malloc == 'default' else 'thresholds fixed (host_memory)'}",
                statistics.fmean(means),
                f"{min(means):.0f}-{max(means):.0f}",
                max(max(f) for f in per_process),
                statistics.fmean(means) * 4096 / 2**20,
            ]
        )
    return Table(
        "Page faults per step, fresh processes",
        ["loop and allocator", "faults/step (mean)", "range of process means", "most in one step", "MiB faulted in/step"],
        rows,
        rerun_command("profile_step", quick),
        [
            f"GPT {SIZE}, batch {BATCH}, no clipping; {processes} fresh process(es) each, faults counted per step over the second "
            f"half of {steps} steps (ru_minflt). REGIMEN_MALLOC=default leaves glibc's moving thresholds; regimen's fit fixes them "
            "on CPU (regimen/host_memory.py). A fault costs about 1 us of CPU: 10,000 faults are 10 ms of a step.",
        ],
        {"faults/step (mean)": ".0f", "most in one step": ".0f", "MiB faulted in/step": ".1f"},
    )


# ---- timing, interleaved in one process ---------------------------------------------------------


def interleaved_table(quick: bool) -> Table:
    from regimen.host_memory import keep_freed_memory

    keep_freed_memory()  # both steps in one process: the same allocator for both
    blocks, n = (4, 2) if quick else (10, 3)
    rows = []
    for clip in (CLIP, 0.0):
        _, hand, ours = pair(SIZE, clip)
        for f in (hand, ours, hand, ours):
            f()
        times: dict[str, list[float]] = {"hand": [], "regimen": []}
        for i in range(blocks):
            for name, f in (("hand", hand), ("regimen", ours)) if i % 2 == 0 else (("regimen", ours), ("hand", hand)):
                start = time.perf_counter()
                for _ in range(n):
                    f()
                times[name].append(1000 * (time.perf_counter() - start) / n)
        ratios = [h / r for h, r in zip(times["hand"], times["regimen"])]
        rows.append(
            [
                f"clip {clip:g}",
                statistics.median(times["hand"]),
                statistics.median(times["regimen"]),
                statistics.median(ratios),
                f"{min(ratios):.3f}-{max(ratios):.3f}",
            ]
        )
    return Table(
        "The two steps interleaved in one process",
        ["clipping", "hand ms/step", "regimen ms/step", "regimen speed / hand", "range"],
        rows,
        rerun_command("profile_step", quick),
        [
            f"GPT {SIZE}, batch {BATCH}; {blocks} alternating blocks of {n} steps each, the ratio taken per pair of adjacent "
            "blocks (same load on both); speed ratio = hand time / regimen time (above 1: regimen faster).",
        ],
        {"hand ms/step": ".1f", "regimen ms/step": ".1f", "regimen speed / hand": ".3f"},
    )


def top_table(quick: bool) -> Table:
    warmup, steps = (2, 3) if quick else (3, 10)
    trainer, _, ours = pair(SIZE, CLIP)
    ops, wall = profile(ours, warmup, steps)
    ops = {k: v for k, v in ops.items() if not k.startswith(("ProfilerStep", "## ", "Optimizer."))}
    top = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:TOP]
    inside = sum(v[0] for v in ops.values())
    rows: list[list[Any]] = [[name, ms, ms / wall, calls] for name, (ms, calls) in top]
    rows.append(["outside operators (Python, dispatcher)", max(wall - inside, 0.0), max(wall - inside, 0.0) / wall, None])
    rows.append(["the whole step (wall)", wall, 1.0, None])
    params_m = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    return Table(
        f"Profile of one training step: GPT {SIZE} through Trainer.train_step",
        ["operator", "self CPU ms/step", "share of step", "calls/step"],
        rows,
        rerun_command("profile_step", quick),
        [
            f"GPT {SIZES[SIZE]} ({params_m:.1f}M parameters), context {CONTEXT}, batch {BATCH}, fused AdamW, clip {CLIP}; "
            f"torch.profiler over {steps} steps after {warmup} warm-up steps; self time excludes the operators each one calls.",
        ],
        {"self CPU ms/step": ".2f", "share of step": ".1%", "calls/step": ".0f"},
    )


def overhead_table(quick: bool) -> Table:
    """regimen's per-step cost in absolute terms: both steps on a model too small to matter.

    With a 1-layer, width-8 GPT on batch 2 x context 8, the model's work is a few microseconds
    and the difference between regimen's `train_step` (plus what `fit` does per step) and the
    hand-written step is the loop's own cost, which a real model's step must dwarf: regimen's
    throughput ratio on a model whose step takes S microseconds is about 1 - overhead / S.
    """
    from regimen.strategy import Strategy
    from regimen.task import build_task
    from regimen.trainer import Trainer

    tiny = ["model.n_layer=1", "model.n_head=1", "model.d_model=8", "model.context=8", "batch.size=2", "lr.schedule=constant"]
    rest = [
        f"optimizer.weight_decay={WEIGHT_DECAY}",
        "observe.progress=none",
        "train.device=cpu",
        "train.steps=1000000000",
        f"train.clip={CLIP}",
    ]
    strategy = Strategy.load(None, tiny + rest).resolve()
    trainer = Trainer(strategy, build_task(strategy))
    trainer.model.train()
    model, params = trainer.model, list(trainer.model.parameters())
    optimizer = make_optimizer(model)
    position = iter(range(10**9))

    def hand() -> None:
        x, y = trainer.data.train.gather(trainer.order.take(2 * next(position), 2))
        hand_step(model, params, optimizer, x, y, CLIP)

    def ours() -> None:  # the step as fit() runs it, without logging
        out = trainer.train_step()
        trainer.progress = trainer.progress.advanced(out["batch_size"], trainer.data.tokens_per_sample)

    n, repeats = (100, 5) if quick else (300, 15)
    times: dict[str, list[float]] = {"hand": [], "regimen": []}
    for f in (hand, ours):
        for _ in range(20):
            f()
    for _ in range(repeats):  # interleaved blocks
        for name, f in (("hand", hand), ("regimen", ours)):
            start = time.perf_counter()
            for _ in range(n):
                f()
            times[name].append(1e6 * (time.perf_counter() - start) / n)
    hand_us, ours_us = statistics.median(times["hand"]), statistics.median(times["regimen"])
    return Table(
        "Loop overhead per step, absolute (a model too small to matter)",
        ["step", "us/step", "x hand step"],
        [
            ["hand-written step", hand_us, 1.0],
            ["regimen train_step + progress", ours_us, ours_us / hand_us],
            ["overhead", ours_us - hand_us, None],
        ],
        rerun_command("profile_step", quick),
        [
            f"GPT 1 layer x width 8, batch 2 x context 8, fused AdamW, clip {CLIP}; median of {repeats} interleaved blocks of {n} steps. "
            "regimen's tokens/s ratio on a real model is about 1 - overhead / (its step time).",
        ],
        {"us/step": ".0f", "x hand step": ".2f"},
    )


def run(quick: bool) -> list[Table]:
    """Top operators, extra operator calls, page faults, interleaved timing, absolute overhead."""
    set_threads()
    return [top_table(quick), extra_calls_table(quick), faults_table(quick), interleaved_table(quick), overhead_table(quick)]


def main() -> None:
    if "--faults-worker" not in sys.argv:
        cli(run, __doc__)
        return
    import argparse

    parser = argparse.ArgumentParser(description="Page faults per step of one loop in this process; JSON out.")
    parser.add_argument("--faults-worker", choices=["hand", "regimen"], required=True)
    parser.add_argument("--size", choices=list(SIZES), default=SIZE)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    set_threads()
    print(to_json(faults_worker(args.faults_worker, args.size, args.steps)))


if __name__ == "__main__":
    main()
