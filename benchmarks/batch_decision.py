"""The batch schedule `regimen tune` picks from the noise scale, against fixed batches, at equal samples.

On the byte-level GPT of benchmarks/tune_common.py, for each budget of samples: fixed batches of
16, 32, 64 and 128 (the LR scaled by sqrt(B / 16), CONFIG's rule), and the schedule tune's probe
decides (`regimen.search.probe.decide_batch` on the noise scale a short run of CONFIG measures,
exactly as `regimen tune` does). For each: the final validation loss and the optimizer steps.
Target (issue 13): at the budget where the noise scale grows past the smallest batch, tune's
schedule within 1% of the best fixed batch's loss with at least 40% fewer optimizer steps.
Where the probe keeps the fixed batch, tune's row is that batch.

Losses and steps only (no timing).

    python -m benchmarks.batch_decision                 # budgets 8,192 / 32,768 / 131,072 samples; about an hour
    python -m benchmarks.batch_decision --quick         # 2,048 and 8,192 samples
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.tune_common import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small budgets (a smoke test)")
    parser.add_argument("--out", default="runs/batch_decision")
    args = parser.parse_args()
    import torch

    from regimen.rundir import read_metrics, read_summary
    from regimen.runner import run_training
    from regimen.search.probe import decide_batch
    from regimen.strategy import Strategy

    torch.set_num_threads(1)
    base = Strategy.default([a for a in TASKS["gpt"] if "=" in a])
    budgets = [2048, 8192] if args.quick else [8192, 32768, 131072]
    print("| samples | batch | optimizer steps | final val loss | vs best fixed | steps vs best fixed |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for samples in budgets:
        out = Path(args.out) / f"s{samples}"

        def train(name: str, keys: dict, out: Path = out, samples: int = samples) -> tuple[float, int]:
            s = base.replace({"train.steps": None, "train.samples": samples, "lr.reference_batch": 16, **keys})
            s = s.replace({"observe.report": False, "observe.progress": "none", "train.eval_every": 10_000})
            run_dir = out / name
            if (read_summary(run_dir) or {}).get("status") != "finished":
                run_training(s, run_dir, resume="auto", quiet=True)
            summary = read_summary(run_dir) or {}
            return float(summary["final_val_loss"]), int(summary["steps"])

        fixed = {b: train(f"fixed-{b}", {"batch.size": b}) for b in (16, 32, 64, 128)}
        # tune's probe: CONFIG with the noise scale measured, for its noise budget (1/27 of the run, at least 20 steps).
        probe_samples = max(20 * 16, samples // 27)
        train("probe", {"batch.size": 16, "observe.noise_scale": True, "train.samples": probe_samples})
        rows = read_metrics(out / "probe" / "metrics.jsonl")
        noise = next((r["noise_scale"] for r in reversed(rows) if r.get("noise_scale") is not None), None)
        keys, reason = decide_batch("fixed", 16, noise, samples)
        chosen = train("tune", {"batch.size": 16, **keys})
        best = min(fixed, key=lambda b: fixed[b][0])
        loss_best, steps_best = fixed[best]
        for b, (loss, steps) in fixed.items():
            print(f"| {samples:,} | fixed {b} | {steps} | {loss:.4f} | {loss / loss_best - 1:+.2%} | {steps / steps_best:.2f}x |")
        loss, steps = chosen
        print(f"| {samples:,} | tune: {reason} | {steps} | {loss:.4f} | {loss / loss_best - 1:+.2%} | {steps / steps_best:.2f}x |")
    print(f"\ncommand: python -m benchmarks.batch_decision{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
