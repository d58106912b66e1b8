"""A profile of one training step of the 10M GPT through regimen's `Trainer.train_step`.

torch.profiler (CPU activities) records a few steps after a warm-up; the first table lists the
operators with the largest self CPU time per step, as a share of the step's wall time. The
row "outside operators" is the wall time no operator accounts for: Python (the trainer's own
code, module calls, autograd bookkeeping) and the dispatcher.

The second table is the loop's own overhead: the same profile of the hand-written step of
`loop_speed` (same model, batch, fused AdamW, clipping) and, per operator, what regimen's step
runs in addition (more calls or more self time). Those rows are what the trainer adds to the
work the model needs; they must stay small against the step (issue 2's target: 0.97 of the
hand-written loop's throughput).

    python -m benchmarks --only profile_step [--quick]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import Table, cli, rerun_command, set_threads
from benchmarks.loop_speed import BATCH, CLIP, CONTEXT, LR, SEED, SIZES, WEIGHT_DECAY, hand_step, make_optimizer, make_workload

TOP = 15
SIZE = "10M"


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


def regimen_trainer() -> Any:
    """regimen's Trainer on the 10M GPT with loop_speed's settings."""
    from regimen.strategy import Strategy
    from regimen.task import build_task
    from regimen.trainer import Trainer

    shape = SIZES[SIZE]
    overrides = [f"model.{k}={v}" for k, v in shape.items()] + [
        f"model.context={CONTEXT}",
        "optimizer.name=adamw",
        f"optimizer.lr={LR}",
        f"optimizer.weight_decay={WEIGHT_DECAY}",
        "lr.schedule=constant",
        f"batch.size={BATCH}",
        f"train.clip={CLIP}",
        f"train.seed={SEED}",
        "train.device=cpu",
        "observe.progress=none",
    ]
    strategy = Strategy.load(None, overrides).resolve()
    trainer = Trainer(strategy, build_task(strategy))
    trainer.model.train()
    return trainer


def overhead_table(quick: bool) -> Table:
    """regimen's per-step cost in absolute terms: both steps on a model too small to matter.

    With a 1-layer, width-8 GPT on batch 2 x context 8, the model's work is a few microseconds
    and the difference between regimen's `train_step` (plus what `fit` does per step) and the
    hand-written step is the loop's own cost, which a real model's step must dwarf: regimen's
    throughput ratio on a model whose step takes S microseconds is about 1 - overhead / S.
    """
    import statistics

    from regimen.strategy import Strategy
    from regimen.task import build_task
    from regimen.trainer import Trainer

    tiny = ["model.n_layer=1", "model.n_head=1", "model.d_model=8", "model.context=8", "batch.size=2", "lr.schedule=constant"]
    rest = [f"optimizer.weight_decay={WEIGHT_DECAY}", "observe.progress=none", "train.device=cpu", "train.steps=1000000000"]
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
    """The top operators of regimen's step, and its extra cost over the hand-written step."""
    set_threads()
    warmup, steps = (2, 3) if quick else (3, 10)
    trainer = regimen_trainer()
    ours, ours_wall = profile(trainer.train_step, warmup, steps)
    del trainer

    w = make_workload(SIZE, 10**6)
    w.model.train()
    optimizer = make_optimizer(w.model)
    params = list(w.model.parameters())
    counter = iter(range(10**6))

    def hand() -> None:
        x, y = w.windows.gather(w.batch_ids(next(counter)))
        hand_step(w.model, params, optimizer, x, y, w.clip)

    theirs, theirs_wall = profile(hand, warmup, steps)

    # Profiler annotations (ProfilerStep, record_function) wrap operators: leave them out of sums.
    def real(ops: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        return {k: v for k, v in ops.items() if not k.startswith(("ProfilerStep", "## ", "Optimizer."))}

    ours, theirs = real(ours), real(theirs)
    top = sorted(ours.items(), key=lambda kv: kv[1][0], reverse=True)[:TOP]
    inside = sum(v[0] for v in ours.values())
    rows: list[list[Any]] = [[name, ms, ms / ours_wall, calls] for name, (ms, calls) in top]
    rows.append(["outside operators (Python, dispatcher)", max(ours_wall - inside, 0.0), max(ours_wall - inside, 0.0) / ours_wall, None])
    rows.append(["the whole step (wall)", ours_wall, 1.0, None])
    params_m = sum(p.numel() for p in params) / 1e6
    top_table = Table(
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

    extra: list[list[Any]] = []
    for name, (ms, calls) in ours.items():
        base_ms, base_calls = theirs.get(name, (0.0, 0.0))
        if calls > base_calls + 0.5 or ms - base_ms > 0.05 * ours_wall / 100:
            extra.append([name, calls - base_calls, ms - base_ms, (ms - base_ms) / theirs_wall])
    extra.sort(key=lambda r: float(r[2]), reverse=True)
    extra = [r for r in extra if r[1] > 0.5][:TOP]  # only operators regimen calls more often: timing noise aside
    outside = (ours_wall - inside) - (theirs_wall - sum(v[0] for v in theirs.values()))
    extra.append(["outside operators (Python, dispatcher)", None, outside, outside / theirs_wall])
    extra.append(["the whole step (wall)", None, ours_wall - theirs_wall, ours_wall / theirs_wall - 1])
    extra_table = Table(
        "What regimen's step adds to the hand-written step",
        ["operator", "extra calls/step", "extra self CPU ms/step", "x hand step"],
        extra,
        rerun_command("profile_step", quick),
        [
            f"Hand-written step (loop_speed's torch loop): {theirs_wall:.1f} ms; regimen's train_step: {ours_wall:.1f} ms "
            f"({ours_wall / theirs_wall:.3f}x). Operators listed are those regimen's step calls more often; 'x hand step' is "
            "the extra time as a share of the hand-written step. Whole-step differences below a few percent are within "
            "the noise of a profile this short.",
        ],
        {"extra calls/step": ".0f", "extra self CPU ms/step": ".3f", "x hand step": ".2%"},
    )
    return [top_table, extra_table, overhead_table(quick)]


if __name__ == "__main__":
    cli(run, __doc__)
