"""Time to a target loss: the classic recipe, nanoGPT's recipe, and regimen's fast recipe.

All on the built-in byte-level GPT of nanoGPT's CPU recipe (4 layers, 4 heads, width 128,
context 64) on the standard-library corpus, same seed, same validation samples. The target is
the final validation loss of nanoGPT's recipe; each strategy reports the wall time (training
only: evaluation time is subtracted) and the tokens it needed to first reach it, and the ratio to
nanoGPT's recipe.

Run: python -m benchmarks.time_to_loss [--quick] [--threads N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

MODEL = ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.context=64", "data.source=stdlib"]
COMMON = ["train.eval_samples=1024", "observe.progress=none", "observe.report=false", "train.log_every=50"]

RECIPES: dict[str, list[str]] = {
    "classic": [
        "optimizer.name=adam",
        "optimizer.lr=1e-3",
        "lr.schedule=constant",
        "batch.size=12",
        "train.steps=2000",
        "train.clip=0",
        "train.eval_every=100",
    ],
    "nanogpt": [
        "optimizer.name=adamw",
        "optimizer.lr=1e-3",
        "optimizer.betas=[0.9, 0.99]",
        "optimizer.weight_decay=0.1",
        "lr.schedule=cosine",
        "lr.warmup=100",
        "lr.min_lr=1e-4",
        "batch.size=12",
        "train.steps=2000",
        "train.clip=1.0",
        "train.eval_every=100",
    ],
}


def fast_recipe() -> list[str]:
    """regimen's recipe, read from examples/fast_gpt.toml (the file users run)."""
    from regimen.strategy import Strategy

    path = Path(__file__).resolve().parents[1] / "examples" / "fast_gpt.toml"
    flat = Strategy.load(path).flat()
    keys = [k for k in flat if k.split(".")[0] in ("optimizer", "lr", "batch", "train")]
    from regimen.strategy import _toml_value

    return [f"{k}={_toml_value(flat[k])}" for k in keys if not k.startswith(("train.eval_samples", "train.log_every", "train.device"))]


def run(name: str, overrides: list[str], out: Path) -> list[dict]:
    """Train one recipe in this process; return its metrics rows."""
    from regimen.strategy import Strategy
    from regimen.task import build_task
    from regimen.trainer import Trainer

    s = Strategy.load(None, [*MODEL, *overrides, *COMMON]).resolve()
    trainer = Trainer(s, build_task(s), out / name)
    trainer.fit()
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def first_reach(rows: list[dict], target: float) -> dict | None:
    for row in rows:
        if row.get("val_loss") is not None and row["val_loss"] <= target:
            return row
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--quick", action="store_true", help="classic and fast only against a shorter nanoGPT (500 steps)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = {**RECIPES, "regimen-fast": fast_recipe()}
    if args.quick:
        recipes = {k: [o.replace("train.steps=2000", "train.steps=500") for o in v] for k, v in recipes.items()}
    names = args.only or list(recipes)
    out = Path(tempfile.mkdtemp(prefix="time_to_loss-"))
    results: dict[str, list[dict]] = {}
    for name in ["nanogpt", *[n for n in names if n != "nanogpt"]]:
        t0 = time.perf_counter()
        results[name] = run(name, recipes[name], out)
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    target = [r for r in results["nanogpt"] if r.get("val_loss") is not None][-1]["val_loss"]
    base = first_reach(results["nanogpt"], target)
    assert base is not None
    base_time = base["time"] - base.get("eval_time", 0.0)
    machine = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    print(f"Target: nanoGPT recipe's final validation loss, {target:.4f} nats/byte. {machine}")
    print()
    print("| recipe | final val loss | reaches target at step | tokens to target | train time to target (s) | time vs nanoGPT | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in results.items():
        final = [r for r in rows if r.get("val_loss") is not None][-1]
        hit = first_reach(rows, target)
        tps = rows[-1]["tokens"] / max(rows[-1]["time"] - rows[-1].get("eval_time", 0.0), 1e-9)
        if hit is None:
            print(f"| {name} | {final['val_loss']:.4f} | not reached | - | - | - | {tps:,.0f} |")
            continue
        t = hit["time"] - hit.get("eval_time", 0.0)
        print(f"| {name} | {final['val_loss']:.4f} | {hit['step']} | {hit['tokens']:,} | {t:.1f} | {t / base_time:.2f} | {tps:,.0f} |")
    print()
    print(f"Runs kept in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
