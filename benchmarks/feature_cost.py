"""What each feature a real run turns on costs per step, against regimen's bare loop.

The workload is `loop_speed`'s (the built-in GPT, stdlib corpus, batch 12, fused AdamW), run by
regimen's `Trainer.fit` with one feature on at a time (`loop_speed.FEATURES`): gradient clipping
at 1.0; a warmup-stable-decay LR; an evaluation every quarter of the run on 48 fixed samples;
the same with the text sample regimen writes after each evaluation on text sources (its default,
64 tokens); a checkpoint every quarter of the run, written in the background (`checkpoint.async_save`,
the default on CUDA) and synchronously (the default on CPU); the gradient-noise-scale estimate; and all of `loop_speed`'s features mode at
once. "bare" has none of them (regimen still computes the gradient norm, for its non-finite
guard).

Each configuration runs in its own process; the rounds are interleaved (every configuration
once per round, the order alternating), and each cost is taken within a round against that
round's bare run: the extra milliseconds per step and the ratio of tokens/s, the median over
rounds with their range. Evaluations and saves happen inside the timed steps, so their cost is
spread over the steps as a user sees it.

    python -m benchmarks --only feature_cost [--quick]
    python -m benchmarks.feature_cost --sizes 1M 10M 50M [--quick]
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from benchmarks.common import Table, cli, python_command, rerun_command, rounds, run_worker, threads
from benchmarks.loop_speed import FEATURES_MODE, PLAN, QUICK_PLAN, SIZES, spread

CONFIGS: dict[str, list[str]] = {
    "bare": [],
    "clip 1.0": ["clip"],
    "WSD schedule": ["wsd"],
    "eval every N": ["eval"],
    "eval every N + text sample": ["eval", "samples"],
    "checkpoint every N, background (CUDA's default)": ["checkpoint"],
    "checkpoint every N, synchronous (CPU's default)": ["checkpoint_sync"],
    "noise scale": ["noise"],
    "all of loop_speed's features mode": sorted(FEATURES_MODE),
}


SIZES_RUN = ["1M", "10M"]  # --sizes
CONFIGS_RUN = list(CONFIGS)  # --configs (always with "bare", every cost's reference)


def run(quick: bool) -> list[Table]:
    """Interleaved rounds of every configuration at each size; costs against the bare run of the same round."""
    repeats = rounds(quick)
    plan = QUICK_PLAN if quick else PLAN
    n_threads = threads()
    tables = []
    for size in SIZES_RUN:
        steps, warmup = plan[size]
        names = list(dict.fromkeys(["bare", *CONFIGS_RUN]))
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                args = ["--worker", "regimen", "--size", size, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(n_threads)]
                results[name].append(run_worker(python_command("loop_speed", *args, "--only-features", *CONFIGS[name]), timeout=3600))
        tables.append(_table(size, steps, warmup, repeats, n_threads, results, quick))
    return tables


def _table(
    size: str, steps: int, warmup: int, repeats: int, n_threads: int, results: dict[str, list[dict[str, Any]]], quick: bool
) -> Table:
    bare = results["bare"]
    rows = []
    for name, runs in results.items():
        extra = [a["ms_per_step"] - b["ms_per_step"] for a, b in zip(runs, bare)]
        ratio = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs, bare)]
        rows.append(
            [
                name,
                statistics.median(r["ms_per_step"] for r in runs),
                statistics.median(extra),
                spread(extra),
                statistics.median(ratio),
                spread(ratio),
                100 * statistics.median(r["data_wait"] for r in runs),
            ]
        )
    every = max(steps // 4, 1)
    return Table(
        title=f"The cost of each feature per step, GPT {size}",
        columns=["configuration", "ms/step", "extra ms/step", "extra range", "x bare tokens/s", "ratio range", "data wait %"],
        rows=rows,
        command=rerun_command("feature_cost", quick),
        notes=[
            f"GPT {size} ({SIZES[size]}), batch 12, fused AdamW, 1 process; {steps} steps of which the first {warmup} are not timed; "
            f"N = {every} (evaluations and checkpoints inside the timed steps); {repeats} interleaved rounds, each run its own process, "
            f"{n_threads} torch threads. Costs are taken within a round against that round's bare run.",
            "A checkpoint holds the model and AdamW's two moments; in the background, the step loop pays for the copy "
            "(DCP's staging) and a thread writes, checksums and renames while training goes on.",
        ],
        fmt={
            "ms/step": ".1f",
            "extra ms/step": "+.2f",
            "x bare tokens/s": ".3f",
            "data wait %": ".3f",
        },
    )


def main() -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--sizes", nargs="+", choices=list(SIZES), default=SIZES_RUN)
    extra.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=CONFIGS_RUN, help="which configurations (bare always runs)")
    known, rest = extra.parse_known_args()
    sys.argv[1:] = rest
    SIZES_RUN[:] = known.sizes
    CONFIGS_RUN[:] = known.configs
    cli(run, __doc__)


if __name__ == "__main__":
    main()
