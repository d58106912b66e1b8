"""Time to a target loss: nanoGPT's recipe, the classic one and regimen's fast recipe, on two corpora.

All on the built-in byte-level GPT of nanoGPT's CPU recipe (4 layers, 4 heads, width 128,
context 64), same seed, the same 1024 validation samples. The target is the final validation
loss of nanoGPT's recipe (AdamW 1e-3, cosine, batch 12, 2000 steps, evaluated every 100 steps);
each recipe's time to the target counts its evaluations (every one it makes before the target is
reached, at its own cadence: `examples/fast_gpt.toml`'s for regimen's).

How the time is measured, so that a busy machine does not decide the answer:

1. Each recipe trains for its budget, in this process; its loss curve (validation loss at each
   evaluation) is deterministic for a seed on a given CPU, whatever the load, so the step at
   which it first reaches the target is exact.
2. The cost of one training step of each recipe and of one evaluation is then measured in one
   process, interleaved (blocks of steps of each recipe in turn, and evaluations between them),
   so a change in load hits all of them alike; each is the median of the blocks.
3. Time to target = steps to the target x the recipe's step time + the evaluations it made by
   then x the evaluation time. The ratio to nanoGPT's is the figure; its range comes from the
   per-round ratios of step 2. The wall time of each run in step 1 is shown for context.

Corpora: `stdlib` (the Python standard library, what the recipe was tuned on) and `torch` (the
Python sources of the installed torch package, about 50 MB, prepared once with `regimen prepare`
into the system's temporary directory, byte tokens: a second corpus the recipe never saw).

    python -m benchmarks --only time_to_loss [--quick]
    python -m benchmarks.time_to_loss [--quick] [--threads N] [--corpus stdlib torch] [--only NAME ...]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Table, cli, rerun_command, set_threads

MODEL = ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.context=64"]
COMMON = ["train.eval_samples=1024", "observe.progress=none", "observe.report=false", "observe.samples=0", "train.log_every=50"]
TARGET_RATIO = 0.30  # issue 15: regimen's recipe at most 0.30 of nanoGPT's time, evaluation included

RECIPES: dict[str, list[str]] = {
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
    "classic": [
        "optimizer.name=adam",
        "optimizer.lr=1e-3",
        "lr.schedule=constant",
        "batch.size=12",
        "train.steps=2000",
        "train.clip=0",
        "train.eval_every=100",
    ],
}
LABELS = {
    "nanogpt": "nanoGPT (AdamW 1e-3, warmup 100, cosine to 1e-4, batch 12, 2000 steps)",
    "classic": "classic (Adam 1e-3 constant, batch 12, 2000 steps)",
    "regimen-fast": "regimen-fast (`examples/fast_gpt.toml`)",
}
CORPORA = ["stdlib", "torch"]  # --corpus
ONLY: list[str] = []  # --only: recipes besides nanoGPT (default: all)


def fast_recipe() -> list[str]:
    """regimen's recipe, read from examples/fast_gpt.toml (the file users run), without its model and data."""
    from regimen.strategy import Strategy, _toml_value

    path = Path(__file__).resolve().parents[1] / "examples" / "fast_gpt.toml"
    flat = Strategy.load(path).flat()
    keys = [k for k in flat if k.split(".")[0] in ("optimizer", "lr", "batch", "train")]
    return [f"{k}={_toml_value(flat[k])}" for k in keys if not k.startswith(("train.eval_samples", "train.log_every", "train.device"))]


def torch_sources() -> str:
    """`tokens:DIR` of the installed torch's Python sources, prepared once (bytes; a rerun with the same files does nothing)."""
    import torch

    from regimen.prepare import prepare

    root = Path(torch.__file__).parent
    out = Path(tempfile.gettempdir()) / f"regimen-bench-torch-sources-{torch.__version__}"
    prepare(sorted(root.rglob("*.py")), out, "bytes", val_fraction=0.1, quiet=True)
    return f"tokens:{out}"


def source(corpus: str) -> str:
    return "stdlib" if corpus == "stdlib" else torch_sources()


def strategy(recipe: list[str], data: str, quick: bool) -> Any:
    from regimen.strategy import Strategy

    overrides = [*MODEL, f"data.source={data}", *recipe, *COMMON, "train.device=cpu"]
    if quick:
        overrides = [o.replace("train.steps=2000", "train.steps=500") for o in overrides]
    return Strategy.load(None, overrides).resolve()


def train(recipe: list[str], data: str, quick: bool) -> tuple[list[tuple[int, float]], float, Any]:
    """Train one recipe for its budget: (step, val loss) at each evaluation, the wall seconds, the strategy."""
    from regimen.task import build_task
    from regimen.trainer import Trainer

    s = strategy(recipe, data, quick)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    Trainer(s, build_task(s), callbacks=[rows.append]).fit()
    return [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None], time.perf_counter() - start, s


def step_costs(strategies: dict[str, Any], rounds: int, block: int) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per training step of each recipe and per evaluation, interleaved in this process, per round."""
    from regimen.task import build_task
    from regimen.trainer import Trainer

    trainers = {}
    for name, s in strategies.items():
        trainers[name] = Trainer(s, build_task(s))
        trainers[name].model.train()

    def steps(t: Any, n: int) -> None:
        for _ in range(n):
            out = t.train_step()
            t.progress = t.progress.advanced(out["batch_size"], t.data.tokens_per_sample)

    for t in trainers.values():
        steps(t, 3)
    per_round: dict[str, list[float]] = {name: [] for name in trainers}
    evals: list[float] = []
    names = list(trainers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps(trainers[name], block)
            per_round[name].append((time.perf_counter() - start) / block)
        t = trainers[names[0]]
        start = time.perf_counter()
        t.evaluate()
        evals.append(time.perf_counter() - start)
        t.model.train()
    for t in trainers.values():
        t.close()
    return per_round, evals


def first_reach(curve: list[tuple[int, float]], target: float) -> tuple[int, int] | None:
    """(step, evaluations made up to and including it) of the first evaluation at or below `target`."""
    for i, (step, loss) in enumerate(curve):
        if loss <= target:
            return step, i + 1
    return None


def corpus_table(corpus: str, quick: bool) -> Table:
    data = source(corpus)
    recipes = {"nanogpt": RECIPES["nanogpt"], "classic": RECIPES["classic"], "regimen-fast": fast_recipe()}
    names = ["nanogpt", *[n for n in recipes if n != "nanogpt" and (not ONLY or n in ONLY)]]
    curves, walls, strategies = {}, {}, {}
    for name in names:
        curves[name], walls[name], strategies[name] = train(recipes[name], data, quick)
        print(f"# {corpus} {name}: {walls[name]:.0f} s", file=sys.stderr, flush=True)
    target = curves["nanogpt"][-1][1]
    rounds, block = (3, 3) if quick else (9, 10)
    per_round, evals = step_costs(strategies, rounds, block)
    t_eval = statistics.median(evals)
    base_steps, base_evals = strategies["nanogpt"].train.steps, len(curves["nanogpt"])

    def times(name: str, r: int | None = None) -> tuple[float, float] | None:
        hit = first_reach(curves[name], target)
        if hit is None:
            return None
        step, n_evals = hit
        t_step = statistics.median(per_round[name]) if r is None else per_round[name][r]
        evals_s = t_eval if r is None else evals[r]
        return step * t_step, step * t_step + n_evals * evals_s

    base = times("nanogpt")
    assert base is not None
    rows = []
    notes = []
    for name in names:
        final = curves[name][-1][1]
        hit = first_reach(curves[name], target)
        t = times(name)
        s = strategies[name]
        tokens_per_step = s.batch.size * s.model.context
        if hit is None or t is None:
            rows.append(
                [LABELS[name], final, "not reached", None, None, statistics.median(per_round[name]) * 1000, None, None, walls[name]]
            )
            continue
        ratios = [times(name, r)[1] / times("nanogpt", r)[1] for r in range(rounds)]  # type: ignore[index]
        rows.append(
            [
                LABELS[name],
                final,
                hit[0],
                float(hit[0] * tokens_per_step),
                t[1],
                statistics.median(per_round[name]) * 1000,
                t[1] / base[1],
                f"{min(ratios):.3f}-{max(ratios):.3f}",
                walls[name],
            ]
        )
        if name == "regimen-fast":
            met = t[1] / base[1] <= TARGET_RATIO
            notes.append(
                f"regimen-fast / nanoGPT, evaluation included: {t[1] / base[1]:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}; "
                f"target <= {TARGET_RATIO}): " + ("met." if met else "**not met**.") + f" Training alone: {t[0] / base[0]:.3f}."
            )
    notes.insert(
        0,
        f"Corpus `{data}`; target: nanoGPT's final validation loss, {target:.4f}, over 1024 fixed validation samples. "
        f"Step and evaluation costs: {rounds} interleaved rounds of {block} steps of each recipe and one evaluation "
        f"({t_eval * 1000:.0f} ms); nanoGPT makes {base_evals} evaluations in its {base_steps} steps.",
    )
    return Table(
        title=f"Time to nanoGPT's final validation loss, corpus {corpus}",
        columns=[
            "recipe",
            "final val loss",
            "reaches target at step",
            "tokens to target",
            "time to target s (eval incl.)",
            "ms/step",
            "time x nanoGPT",
            "range",
            "wall of the run s",
        ],
        rows=rows,
        command=rerun_command("time_to_loss", quick),
        notes=notes,
        fmt={
            "final val loss": ".4f",
            "tokens to target": ",.0f",
            "time to target s (eval incl.)": ".1f",
            "ms/step": ".1f",
            "time x nanoGPT": ".3f",
            "wall of the run s": ".0f",
        },
    )


def run(quick: bool) -> list[Table]:
    set_threads()
    return [corpus_table(corpus, quick) for corpus in CORPORA]


def main() -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--corpus", nargs="+", choices=["stdlib", "torch"], default=CORPORA)
    extra.add_argument("--only", nargs="+", default=[])
    known, rest = extra.parse_known_args()
    sys.argv[1:] = rest
    CORPORA[:], ONLY[:] = known.corpus, known.only
    cli(run, __doc__)


if __name__ == "__main__":
    main()
