"""The optimizers torch lacks: regimen's Lion, LAMB, LARS and schedule-free pair against the same
algorithms in pytorch_optimizer and timm, and against torch's AdamW; and the optimizer state
every optimizer regimen offers keeps per parameter.

Step time: only `optimizer.step()` is timed, on fixed random gradients of the built-in GPT at
about 10M parameters (6 layers, width 384, context 64), over regimen's parameter groups (weight
decay 0.1 on the matrices) for every implementation. Each peer runs twice, with its foreach
(multi-tensor) path and with its per-tensor loop; the target is regimen at least as fast as the
fastest peer row of the same algorithm, and Lion's step at most 1.1x fused AdamW's (issue 15:
regimen's Lion runs one compiled loop over the whole parameter list, `regimen.optim.native`,
where a C compiler is present; its foreach path is timed beside it, and torch's fused AdamW
steps in the same interleave, so the ratio is taken step by step under the same load). The timed steps of all
implementations of one algorithm are interleaved (one step of each in turn), so a change in
machine load hits them alike; each figure is the median over the timed steps. The peers'
defaults differ from regimen's in details that cost little (pytorch_optimizer's LAMB skips bias
correction; timm's LAMB is asked not to clip gradients, as the trainer clips them): the work of
a step is the same up to a few elementwise operations.

State: one `step()` of each optimizer `regimen.optim.NAMES` lists, as `build_optimizer` makes
it, on the built-in GPT at about 1M parameters; the bytes of every distinct tensor in its state,
per model parameter, and as a multiple of the fp32 weights' own bytes.

The peers are imported where available (`.bench-venv`, `make bench-env`, which this benchmark
runs in when it exists); without them the table keeps regimen's and torch's rows.

    python -m benchmarks --only own_optimizers [--quick]
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import Table, cli, python_command, rerun_command, run_worker, set_threads, threads, to_json

WEIGHT_DECAY = 0.1
# Learning rates in each algorithm's usual range: they do not change the work of a step, but
# keep the parameters finite over the timed steps.
LR = {"adamw": 1e-3, "lion": 1e-4, "lamb": 1e-3, "lars": 0.1, "schedulefree_adamw": 2.5e-3, "schedulefree_sgd": 0.1}
ALGORITHMS = ("lion", "lamb", "lars", "schedulefree_adamw", "schedulefree_sgd")
Factory = Callable[[list[dict[str, Any]]], Any]


def _gpt(n_layer: int, n_head: int, d_model: int) -> Any:
    import torch

    from regimen.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, context=64, n_layer=n_layer, n_head=n_head, d_model=d_model))


def implementations(algorithm: str) -> dict[str, Factory]:
    """Every implementation of `algorithm` importable here: label -> factory(groups)."""
    import torch

    from regimen.registry import OPTIMIZERS

    lr = LR[algorithm]
    out: dict[str, Factory] = {}
    if algorithm == "adamw":
        out["torch foreach"] = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=WEIGHT_DECAY, foreach=True)
        out["torch fused"] = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=WEIGHT_DECAY, fused=True)
        return out
    own = OPTIMIZERS[algorithm].load()
    out["regimen"] = functools.partial(own, lr=lr, weight_decay=WEIGHT_DECAY)
    if algorithm == "lion":
        out["regimen foreach (fused=False)"] = functools.partial(own, lr=lr, weight_decay=WEIGHT_DECAY, fused=False)
        out["torch AdamW fused (reference)"] = functools.partial(torch.optim.AdamW, lr=LR["adamw"], weight_decay=WEIGHT_DECAY, fused=True)
    try:
        import pytorch_optimizer as po

        po_class, po_kwargs = {
            "lion": (po.Lion, {}),
            "lamb": (po.Lamb, {}),
            "lars": (po.LARS, {"momentum": 0.9}),
            "schedulefree_adamw": (po.ScheduleFreeAdamW, {}),
            "schedulefree_sgd": (po.ScheduleFreeSGD, {"momentum": 0.9}),
        }[algorithm]
        for foreach in (True, False):
            label = f"pytorch_optimizer {'foreach' if foreach else 'loop'}"
            out[label] = functools.partial(po_class, lr=lr, weight_decay=WEIGHT_DECAY, foreach=foreach, **po_kwargs)
    except ImportError:
        pass
    try:
        from benchmarks.peers import timm_optim

        timm = timm_optim()
        timm_specs: dict[str, tuple[Any, dict[str, Any]]] = {
            "lion": (timm.Lion, {}),
            "lamb": (timm.Lamb, {"max_grad_norm": None}),
            "lars": (timm.Lars, {"momentum": 0.9}),
        }
        timm_spec = timm_specs.get(algorithm)
        if timm_spec is not None:
            for foreach in (True, False):
                label = f"timm {'foreach' if foreach else 'loop'}"
                timm_class, timm_kwargs = timm_spec
                out[label] = functools.partial(timm_class, lr=lr, weight_decay=WEIGHT_DECAY, foreach=foreach, **timm_kwargs)
    except ImportError:
        pass
    return out


def time_algorithm(model: Any, algorithm: str, warmup: int, repeats: int) -> dict[str, list[float]]:
    """ms of each timed `step()` of each implementation, their timed steps interleaved."""
    from regimen.optim.groups import decay_groups

    optimizers = {label: make(decay_groups(model, WEIGHT_DECAY)) for label, make in implementations(algorithm).items()}
    for o in optimizers.values():
        if callable(getattr(o, "train", None)):
            o.train()  # schedule-free: steps are taken in train mode
        for _ in range(warmup):  # allocates the state, warms the caches
            o.step()
    times: dict[str, list[float]] = {label: [] for label in optimizers}
    for _ in range(repeats):
        for label, o in optimizers.items():
            start = time.perf_counter()
            o.step()
            times[label].append(time.perf_counter() - start)
    return {label: [1000 * x for x in t] for label, t in times.items()}


def state_bytes() -> list[dict[str, Any]]:
    """Bytes of optimizer state per parameter, for every name regimen registers."""
    import torch

    from regimen.models import count_parameters
    from regimen.optim import NAMES, build_optimizer, set_train_mode
    from regimen.strategy import OptimizerConfig

    rows = []
    for name in NAMES:
        model = _gpt(4, 4, 128)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = 0.01 * torch.randn(p.shape, generator=g)
        optimizer = build_optimizer(model, OptimizerConfig(name=name, lr=LR.get(name, 1e-3), weight_decay=WEIGHT_DECAY))
        set_train_mode(optimizer, True)
        optimizer.step()
        seen: dict[int, int] = {}
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):  # a storage shared by two entries counts once
                    seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        n = count_parameters(model)
        rows.append({"name": name, "bytes": sum(seen.values()), "tensors": len(seen), "params": n})
    return rows


def worker(quick: bool) -> dict[str, Any]:
    """Everything this benchmark measures, in this process (the peers' interpreter)."""
    import torch

    from regimen.models import count_parameters

    set_threads()
    warmup, repeats = (2, 5) if quick else (3, 20)
    model = _gpt(6, 6, 384)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = 0.01 * torch.randn(p.shape, generator=g)
    steps = {a: time_algorithm(model, a, warmup, repeats) for a in ("adamw", *ALGORITHMS)}
    timing = {a: {label: statistics.median(t) for label, t in by_label.items()} for a, by_label in steps.items()}
    lion = steps["lion"]
    lion_vs_adamw = [a / b for a, b in zip(lion["regimen"], lion["torch AdamW fused (reference)"])]
    from regimen.optim import native

    versions: dict[str, str | None] = {}
    for dist in ("pytorch_optimizer", "timm"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = None
    return {
        "timing": timing,
        "lion_vs_adamw": lion_vs_adamw,
        "lion_kernel": native.status(),
        "state": state_bytes(),
        "params": count_parameters(model),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "versions": versions,
    }


def run(quick: bool) -> list[Table]:
    """Step-time and state tables (measured in the peers' interpreter when there is one)."""
    from benchmarks.peers import bench_python

    cmd = python_command("own_optimizers", "--worker", *(["--quick"] if quick else []), "--threads", str(threads()))
    cmd[0] = bench_python()
    r = run_worker(cmd)
    adamw = r["timing"]["adamw"]
    fused = adamw["torch fused"]
    rows: list[list[Any]] = [["adamw", label, ms, None, ms / fused] for label, ms in adamw.items()]
    notes = []
    for algorithm in ALGORITHMS:
        t = r["timing"][algorithm]
        ours = t["regimen"]
        peers = {k: v for k, v in t.items() if k.startswith(("pytorch_optimizer", "timm"))}
        rows += [[algorithm, label, ms, ms / ours, ms / fused] for label, ms in t.items()]
        if peers:
            best = min(peers, key=peers.__getitem__)
            ok = ours <= peers[best]
            notes.append(
                f"{algorithm}: fastest peer {best}, {peers[best]:.2f} ms; regimen {ours:.2f} ms "
                + ("(target met)." if ok else f"(**behind**, {ours / peers[best]:.2f}x its time).")
            )
        else:
            notes.append(f"{algorithm}: no peer implementation importable here.")
    ratios = r["lion_vs_adamw"]
    lion_ratio = statistics.median(ratios)
    notes.append(
        f"Lion / fused AdamW, step by step in the same interleave: {lion_ratio:.3f} (steps {min(ratios):.2f}-{max(ratios):.2f}; "
        "target <= 1.1): " + ("met." if lion_ratio <= 1.1 else "**not met**.") + f" Lion's kernel: {r['lion_kernel']}."
    )
    v = r["versions"]
    notes.insert(
        0,
        f"GPT 6 layers x 384 ({r['params'] / 1e6:.1f}M parameters); median of {r['repeats']} interleaved steps; "
        f"{r['threads']} torch threads; pytorch_optimizer {v['pytorch_optimizer'] or 'absent'}, timm {v['timm'] or 'absent'}. "
        "`x regimen` = that row's time / regimen's (above 1: regimen faster).",
    )
    step_table = Table(
        "Optimizers torch lacks: step time against the peers",
        ["algorithm", "implementation", "ms/step", "x regimen", "x AdamW fused"],
        rows,
        rerun_command("own_optimizers", quick),
        notes,
        {"ms/step": ".2f", "x regimen": ".2f", "x AdamW fused": ".2f"},
    )
    state_rows = [[s["name"], s["tensors"], s["bytes"] / s["params"], s["bytes"] / (4 * s["params"])] for s in r["state"]]
    state_table = Table(
        "Optimizer state per parameter",
        ["optimizer", "state tensors", "bytes/param", "x fp32 weights"],
        state_rows,
        rerun_command("own_optimizers", quick),
        [
            f"After one step on the built-in GPT 4 x 128 ({r['state'][0]['params'] / 1e6:.2f}M parameters), as build_optimizer "
            "makes each optimizer; every distinct state tensor counted once, scalar step counters included. "
            "muon: Muon's momentum on the hidden matrices plus AdamW's two moments on the rest."
        ],
        {"bytes/param": ".2f", "x fp32 weights": ".2f"},
    )
    return [step_table, state_table]


def main() -> None:
    if "--worker" not in sys.argv:
        cli(run, __doc__)
        return
    import argparse
    import os

    parser = argparse.ArgumentParser(description="Measure in this process; print JSON.")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    print(to_json(worker(args.quick)))


if __name__ == "__main__":
    main()
