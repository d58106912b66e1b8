"""Optimizer step time: each optimizer as regimen builds it against torch's default construction.

regimen builds with `implementation = "auto"`: the fused kernel where torch has one (SGD,
Adagrad, Adam, AdamW), foreach elsewhere. The baseline is the same algorithm on the same
parameter groups constructed the way torch's documentation shows it, with no `fused` / `foreach`
flag, which on CPU means torch's per-tensor loop. Optimizers torch lacks (Lion, LAMB, LARS,
schedule-free) are compared with their line-by-line reference versions in
`regimen.optim.reference` instead (marked "ref" in the table; the schedule-free references also
store x, y and z, so they do more work than the fast versions by design).

Only `optimizer.step()` is timed, on fixed random gradients of a GPT of about 9M parameters:
forward and backward are the same whichever optimizer runs. Each figure is the median of
several timed steps after a warmup.

    .venv/bin/python benchmarks/optimizer_step.py            # 1-2 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/optimizer_step.py --quick    # fewer repeats, for a smoke test
    .venv/bin/python benchmarks/optimizer_step.py --threads 1  # steadier numbers on a shared machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from regimen.models import GPT, GPTConfig, count_parameters
from regimen.optim import NAMES, CombinedOptimizer, build_optimizer, set_train_mode
from regimen.optim import reference as ref
from regimen.optim.groups import decay_groups, muon_split
from regimen.registry import OPTIMIZERS
from regimen.strategy import OptimizerConfig

WEIGHT_DECAY = 0.1  # non-zero, so the decay path and both parameter groups are exercised

# Learning rates in each algorithm's usual range: they do not change the work a step does,
# but keep the parameters finite over the timed steps.
LR = {"lion": 1e-4, "lars": 0.1, "schedulefree_sgd": 0.1, "muon": 0.02, "sgd": 0.01, "gd": 0.01, "momentum": 0.01, "nesterov": 0.01}

# The baseline of each name: torch's constructor and the keywords the name implies.
TORCH_DEFAULT: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    **{e.name: (e.load(), dict(e.meta.get("implied", {}))) for e in OPTIMIZERS.entries() if e.target.startswith("torch.")},
    "lion": (ref.LionReference, {}),
    "lamb": (ref.LAMBReference, {}),
    "lars": (ref.LARSReference, {}),
    "schedulefree_adamw": (ref.ScheduleFreeAdamWReference, {}),
    "schedulefree_sgd": (ref.ScheduleFreeSGDReference, {}),
}
# torch's Muon (the baseline) runs its Newton-Schulz iterations as bf16 matmuls, which a CPU
# without native bf16 emulates: seconds a step on this model. regimen's Muon uses float32 there.
SLOW_ON_CPU = ("muon",)
REFERENCE_BASELINE = {"lion", "lamb", "lars", "schedulefree_adamw", "schedulefree_sgd"}


def make_model() -> nn.Module:
    """The benchmark model: GPT with d_model 384, 5 layers, context 64, byte vocabulary."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, context=64, n_layer=5, n_head=6, d_model=384))


def baseline(model: nn.Module, name: str) -> torch.optim.Optimizer:
    """torch's default construction (no fused / foreach flag) over regimen's groups."""
    lr = LR.get(name, 1e-3)
    if name == "muon":
        hidden, rest = muon_split(model)
        return CombinedOptimizer([torch.optim.Muon(hidden, lr=lr), torch.optim.AdamW(rest, lr=lr, weight_decay=WEIGHT_DECAY)])
    ctor, implied = TORCH_DEFAULT[name]
    return ctor(decay_groups(model, WEIGHT_DECAY), lr=lr, weight_decay=WEIGHT_DECAY, **implied)


def regimen_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    """The optimizer `build_optimizer` makes (implementation = "auto")."""
    return build_optimizer(model, OptimizerConfig(name=name, lr=LR.get(name, 1e-3), weight_decay=WEIGHT_DECAY, implementation="auto"))


def time_pair(first: torch.optim.Optimizer, second: torch.optim.Optimizer, warmup: int, repeats: int) -> tuple[float, float]:
    """Median wall time of one `step()` of each, in milliseconds.

    The two are stepped alternately, so that both see the same load from whatever else runs
    on the machine (on a shared CPU that drifts by more than the effect measured).
    """
    for optimizer in (first, second):
        set_train_mode(optimizer, True)
        for _ in range(warmup):  # allocates the state and warms the caches
            optimizer.step()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for optimizer, record in zip((first, second), times):
            start = time.perf_counter()
            optimizer.step()
            record.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times[0]), 1000.0 * statistics.median(times[1])


def describe(optimizer: torch.optim.Optimizer) -> str:
    """Which implementation an optimizer runs: fused, foreach or the per-tensor loop."""
    inner = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    kinds = []
    for o in inner:
        if o.defaults.get("fused"):
            kinds.append("fused")
        elif o.defaults.get("foreach"):
            kinds.append("foreach")
        else:
            kinds.append("own" if type(o).__module__.startswith("regimen") else "default")
    return "+".join(kinds)


def _with_gradients(seed: int = 1) -> nn.Module:
    model = make_model()
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = 0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return model


def run(names: Sequence[str], warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Time every optimizer in `names` both ways, each on its own copy of the model and gradients."""
    rows = []
    for name in names:
        base, ours = baseline(_with_gradients(), name), regimen_optimizer(_with_gradients(), name)
        base_ms, ours_ms = time_pair(base, ours, warmup, repeats)
        rows.append({"name": name, "baseline": base_ms, "regimen": ours_ms, "impl": describe(ours), "ref": name in REFERENCE_BASELINE})
        print(f"  {name}: {base_ms:.1f} / {ours_ms:.1f} ms", file=sys.stderr, flush=True)
        del base, ours  # free the state before the next pair allocates its own
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| optimizer | regimen runs | torch default ms/step | regimen ms/step | speedup |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        label = f"{r['baseline']:.2f}" + (" (ref)" if r["ref"] else "")
        lines.append(f"| {r['name']} | {r['impl']} | {label} | {r['regimen']:.2f} | {r['baseline'] / r['regimen']:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, time the optimizers, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke test; noisier numbers)")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help="optimizers to time (default: all but muon)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or [n for n in NAMES if n not in SLOW_ON_CPU]
    warmup, repeats = (1, 5) if args.quick else (2, 10)
    if "muon" in names:
        warmup, repeats = 1, min(repeats, 3)
    print(
        f"GPT d_model=384 n_layer=5 context=64: {count_parameters(make_model()) / 1e6:.2f}M parameters; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {repeats} steps after {warmup} warmup"
    )
    print()
    print(table(run(names, warmup, repeats)))
    print()
    print("speedup = torch default / regimen. (ref): torch has no such optimizer; the baseline is regimen's line-by-line reference.")
    skipped = [n for n in SLOW_ON_CPU if n not in names]
    if skipped:
        print(f"Not timed by default: {', '.join(skipped)} (the baseline, torch's Muon, multiplies bf16 matrices, seconds a step on a")
        print("CPU without native bf16; regimen's Muon uses float32 there). Time it with --only muon.")


if __name__ == "__main__":
    main()
