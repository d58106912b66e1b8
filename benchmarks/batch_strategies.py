"""Batch-size strategies on the built-in GPT at an equal budget of samples.

Five runs of the recipes in examples/batch_*.toml, identical but for [batch]: the same model
and initial weights (seed 0), the same data order, the same LR schedule counted in samples
(peak 2e-3 at 16 samples, scaled by sqrt(B / 16)), the same budget of 8,192 samples of 64
bytes, and the same 128 validation samples:

- fixed small: 16 samples a step;
- fixed large: 128 samples a step;
- ramp: the GPT-3-like table of examples/batch_ramp_tokens.toml, 16 -> 32 -> 64 -> 128;
- random: uniform in [16, 128] at each step;
- adaptive: from 16, following the measured noise scale within [16, 128].

For each: the final validation loss, the optimizer steps, the training wall time and CPU time
(evaluation excluded; on a shared machine the CPU time is the steadier figure), and the first
evaluated step whose validation loss is at or below the small-batch run's final one (read from
the run's metrics.jsonl). And the other way round: the steps (and samples) the small-batch run
needed to reach each run's final loss, i.e. the step saving of a larger or growing batch at
equal loss, paid for in samples. Evaluation runs every 8 steps (every 16 for the small-batch
run, which has 512), so steps-to-target is resolved to 8 (16) steps.

`--quick` scales every budget-like quantity (samples, warmup, ramp stages, adaptive cadence)
by 1/4: a smoke test whose ranking means little. Threads: 1 by default (on a shared 2-core
machine a second intra-op thread oversubscribes the cores; wall times then mean little).

    .venv/bin/python benchmarks/batch_strategies.py            # about 4-6 minutes on 2 CPU cores
    .venv/bin/python benchmarks/batch_strategies.py --quick    # about 1-2 minutes
    .venv/bin/python benchmarks/batch_strategies.py --twice    # + ramp and adaptive on 2x the samples
    regimen report runs/batch_strategies/*                     # the comparison report of the runs
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from regimen.rundir import read_metrics
from regimen.strategy import Strategy, parse_value, read_toml
from regimen.task import build_task
from regimen.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# (name, recipe, overrides)
RUNS: list[tuple[str, str, list[str]]] = [
    ("fixed-16", "batch_fixed.toml", []),
    ("fixed-128", "batch_fixed.toml", ["batch.size=128"]),
    ("ramp-tokens", "batch_ramp_tokens.toml", []),
    ("random-16-128", "batch_random.toml", []),
    ("adaptive-16-128", "batch_adaptive.toml", []),
]
BASELINE = "fixed-16"
EVAL_EVERY = 8
EVAL_SAMPLES = 128


def load_strategy(recipe: str, overrides: list[str], scale: float, eval_every: int) -> Strategy:
    """A recipe with the benchmark's evaluation settings, its budget-like keys scaled by `scale`."""
    tree = read_toml(EXAMPLES / recipe)
    train, lr, batch = tree["train"], tree["lr"], tree.setdefault("batch", {})
    train.update(samples=int(train["samples"] * scale), eval_every=eval_every, eval_samples=EVAL_SAMPLES, log_every=eval_every)
    lr["warmup"] = lr.get("warmup", 0) * scale  # counted in samples in every recipe
    if "stages" in batch:
        batch["stages"] = [{"until": s["until"] * scale, "size": s["size"]} for s in batch["stages"]]
    if batch.get("schedule") == "adaptive":
        batch["every"] = max(5, round(batch.get("every", 50) * scale))
    tree.setdefault("observe", {})["progress"] = "none"
    strategy = Strategy.from_dict(tree)
    return strategy.replace({k: parse_value(v) for k, v in (o.split("=", 1) for o in overrides)}) if overrides else strategy


def run_one(name: str, strategy: Strategy, out: Path) -> dict[str, Any]:
    """Train one strategy into `out / name`; its summary, history and training-only wall time."""
    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the benchmark owns these directories
    resolved = strategy.resolve()
    trainer = Trainer(resolved, build_task(resolved), run_dir)
    # Time evaluation separately: the runs evaluate at different cadences.
    # CPU time too: with one thread it counts this process's work only, which a busy shared
    # machine disturbs far less than wall time.
    evaluate, eval_wall, eval_cpu = trainer.evaluate, [0.0], [0.0]

    def timed_evaluate() -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = evaluate()
        eval_wall[0] += time.perf_counter() - wall
        eval_cpu[0] += time.process_time() - cpu
        return result

    trainer.evaluate = timed_evaluate  # type: ignore[method-assign]
    cpu = time.process_time()
    result = trainer.fit()
    cpu = time.process_time() - cpu
    rows = read_metrics(run_dir / "metrics.jsonl")
    sizes = [r["batch_size"] for r in rows]
    return {
        "name": name,
        "steps": result.progress.step,
        "samples": result.progress.samples,
        "val_loss": result.summary["final_val_loss"],
        "train_seconds": result.summary["wall_time"] - eval_wall[0],
        # fit's CPU time includes the final checkpoint and export, the same for every run.
        "train_cpu": cpu - eval_cpu[0],
        "rows": rows,
        "batch": (min(sizes), max(sizes), sizes[-1]),
        "noise_scale": next((r["noise_scale"] for r in reversed(rows) if r.get("noise_scale") is not None), None),
    }


def steps_to(rows: list[dict[str, Any]], target: float) -> tuple[int, int] | None:
    """(step, samples) of the first evaluation at or below `target`, or None."""
    for r in rows:
        if r.get("val_loss") is not None and r["val_loss"] <= target:
            return r["step"], r["samples"]
    return None


def _reach(rows: list[dict[str, Any]], target: float) -> str:
    hit = steps_to(rows, target)
    return f"{hit[0]} ({hit[1]:,})" if hit else "not reached"


def table(results: list[dict[str, Any]], target: float) -> str:
    """The results as a markdown table."""
    base = next(r for r in results if r["name"] == BASELINE)
    lines = [
        f"| strategy | optimizer steps | final val loss | vs {BASELINE} | steps to {BASELINE}'s final {target:.4f} "
        f"| {BASELINE} needed for this loss: steps (samples) | step saving at equal loss | train wall / CPU time "
        "| batch min / max / last | B_noise at end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lo, hi, last = r["batch"]
        ns = f"{r['noise_scale']:.1f}" if r["noise_scale"] is not None else "-"
        hit = steps_to(base["rows"], r["val_loss"])
        needed = f"{hit[0]} ({hit[1]:,})" if hit else "not reached"
        saving = f"{hit[0] / r['steps']:.2f}x" if hit else "-"
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['val_loss']:.4f} | {r['val_loss'] - base['val_loss']:+.4f} | {_reach(r['rows'], target)} "
            f"| {needed} | {saving} | {r['train_seconds']:.0f} s / {r['train_cpu']:.0f} s | {lo} / {hi} / {last} | {ns} |"
        )
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]], target: float) -> str:
    """Who wins, from the numbers: by final loss at equal samples, by steps to the target, by steps at equal loss."""
    ranked = sorted(results, key=lambda r: r["val_loss"])
    best, second = ranked[0], ranked[1]
    lines = [
        f"Lowest final val loss at equal samples: {best['name']} ({best['val_loss']:.4f}, "
        f"{second['val_loss'] - best['val_loss']:.4f} below {second['name']}) in {best['steps']} steps."
    ]
    base = next(r for r in results if r["name"] == BASELINE)
    others = [r for r in results if r["name"] != BASELINE]
    reached = [(hit[0], r) for r in others if (hit := steps_to(r["rows"], target)) is not None]
    if reached:
        steps, r = min(reached, key=lambda x: x[0])
        lines.append(
            f"Fewest optimizer steps to the {BASELINE} run's final val loss: {r['name']}, {steps} steps "
            f"against {base['steps']} ({base['steps'] / steps:.1f}x fewer)."
        )
    else:
        lines.append(f"No other strategy reached the {BASELINE} run's final val loss ({target:.4f}) within the same samples.")
    savings = [(hit[0] / r["steps"], hit, r) for r in others if (hit := steps_to(base["rows"], r["val_loss"])) is not None]
    if savings:
        factor, hit, r = max(savings, key=lambda x: x[0])
        lines.append(
            f"Largest step saving at equal loss: {r['name']} reached {r['val_loss']:.4f} in {r['steps']} steps and "
            f"{r['samples']:,} samples; {BASELINE} needed {hit[0]} steps ({factor:.1f}x as many) "
            f"but only {hit[1]:,} samples ({hit[1] / r['samples']:.0%} as many) to get there."
        )
    return "\n".join(lines)


def twice(results: list[dict[str, Any]], out: Path, scale: float) -> str:
    """Ramp and adaptive again on twice the samples: do they reach the small batch's final loss in fewer steps?

    Not an equal-budget comparison (their cosine then spans twice the samples); it answers how
    many steps a growing batch needs for the small batch's loss when data is not the limit.
    """
    base = next(r for r in results if r["name"] == BASELINE)
    samples = 2 * base["samples"]
    lines = [
        f"Twice the samples ({samples:,}) for the growing batches; target: {BASELINE}'s final val loss {base['val_loss']:.4f} "
        f"after {base['steps']} steps and {base['samples']:,} samples.",
        "",
        f"| strategy | optimizer steps | final val loss | steps to {base['val_loss']:.4f} (samples then) | steps vs {BASELINE} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, recipe, overrides in RUNS:
        if name not in ("ramp-tokens", "adaptive-16-128"):
            continue
        strategy = load_strategy(recipe, [*overrides, f"train.samples={samples}"], scale, max(2, round(EVAL_EVERY * scale)))
        r = run_one(f"{name}-2x", strategy, out)
        hit = steps_to(r["rows"], base["val_loss"])
        reach = f"{hit[0]} ({hit[1]:,})" if hit else "not reached"
        ratio = f"{base['steps'] / hit[0]:.1f}x fewer" if hit else "-"
        lines.append(f"| {r['name']} | {r['steps']} | {r['val_loss']:.4f} | {reach} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, train the five strategies, print the table, the verdict and the command."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the budget (a smoke test; the ranking means little)")
    parser.add_argument("--out", default="runs/batch_strategies", help="where the run directories go (default runs/batch_strategies)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see the module docstring)")
    parser.add_argument("--only", nargs="*", choices=[n for n, _, _ in RUNS], help="run only these (the baseline always runs)")
    parser.add_argument(
        "--twice", action="store_true", help="also run ramp and adaptive on twice the samples: steps to the small batch's loss (+3 min)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = 0.25 if args.quick else 1.0
    out = Path(args.out)
    chosen = [r for r in RUNS if args.only is None or r[0] in args.only or r[0] == BASELINE]
    results = []
    start = time.perf_counter()
    for name, recipe, overrides in chosen:
        eval_every = max(2, round((2 * EVAL_EVERY if name == BASELINE else EVAL_EVERY) * scale))
        strategy = load_strategy(recipe, overrides, scale, eval_every)
        results.append(run_one(name, strategy, out))
    total = time.perf_counter() - start
    target = next(r for r in results if r["name"] == BASELINE)["val_loss"]
    print(
        f"GPT n_layer=2 d_model=64 context=64, budget {int(8192 * scale):,} samples ({int(8192 * scale) * 64:,} tokens), "
        f"AdamW peak 2e-3 at batch 16, sqrt LR scaling, cosine in samples; seed 0; {EVAL_SAMPLES} val samples; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {total / 60:.1f} min in all"
    )
    print()
    print(table(results, target))
    print()
    print(verdict(results, target))
    print()
    if args.twice:
        print(twice(results, out, scale))
    flags = (" --quick" if args.quick else "") + (" --twice" if args.twice else "")
    print()
    print(f"command: python benchmarks/batch_strategies.py{flags}   (runs in {out}/)")


if __name__ == "__main__":
    main()
