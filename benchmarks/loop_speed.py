"""Loop speed: regimen's Trainer against a hand-written PyTorch loop, Lightning and Hugging Face.

The same work for every loop: the built-in GPT at about 1M parameters (4 layers, width 128)
and about 10M (6 layers, width 384), context 64, byte vocabulary; the `stdlib` corpus windows
of `regimen.data`; batch 12; fused AdamW (lr 1e-3, weight decay 0.1 on the matrices only,
regimen's parameter groups); a constant LR; global-norm clipping at 1.0; the same number of
steps, from the same initial weights. The loops:

- `torch loop`: nanoGPT's loop written out by hand (get batch, forward, loss, backward, clip,
  step, zero_grad), reading the batches the way regimen does (`SampleOrder` + `TokenWindows`).
  This is the baseline: every ratio is against it.
- `regimen`: `Trainer.fit()` with its defaults (log row every 10 steps), no run directory,
  no progress bar.
- `lightning`: `lightning.Trainer.fit` with logging, checkpoints, progress bar and model
  summary off; `hf`: `transformers.Trainer.train` with reporting, saving and tqdm off, our
  optimizer and a constant scheduler passed in. The peers read samples from a Dataset through
  their own DataLoader (the way each is meant to be used); their samples are gathered once up
  front, so their data path costs them less than the baseline's, not more.

Each run is its own process (no state shared between loops), with the same number of torch
threads. Its peak RSS is counted from the moment the corpus is loaded (the same for every loop,
and a one-off peak of its own), so it covers the loop's imports, model, optimizer state and
activations. Repeats are interleaved (a, b, c, d, a, b, ...) so a change in
machine load hits every loop alike, and each figure is the median over repeats. Throughput is
timed from the end of the first `warmup` steps to the end of the last step, so start-up
(imports, data, framework set-up) is excluded and every per-step cost of each loop is included.
The peers run where they are importable: in `.bench-venv` (`make bench-env`), which this
benchmark uses for all four loops when it exists.

    python -m benchmarks --only loop_speed [--quick]
    python -m benchmarks.loop_speed --worker regimen --size 1M --steps 50   # one run, JSON out
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    ROOT,
    Table,
    cli,
    loop_worker_parser,
    peak_rss_mib,
    python_command,
    rerun_command,
    reset_peak_rss,
    run_worker,
    threads,
    to_json,
)

SIZES: dict[str, dict[str, int]] = {
    "1M": {"n_layer": 4, "n_head": 4, "d_model": 128},
    "10M": {"n_layer": 6, "n_head": 6, "d_model": 384},
}
CONTEXT = 64
BATCH = 12
LR = 1e-3
WEIGHT_DECAY = 0.1
CLIP = 1.0
SEED = 0
KINDS = ("torch", "regimen", "lightning", "hf")
LABELS = {"torch": "torch loop (a)", "regimen": "regimen (b)", "lightning": "Lightning (c)", "hf": "HF Trainer (d)"}
FORMATS = {"tokens/s": ".0f", "ms/step": ".2f", "x torch loop": ".3f", "peak RSS MiB": ".0f", "RSS x torch loop": ".2f", "last loss": ".3f"}
TARGET = 0.97  # regimen's tokens/s against the hand-written loop (issues 2 and 7)


@dataclass
class Workload:
    """What every loop trains: model, data, batch, steps, and the optimizer it must build."""

    model: torch.nn.Module  # the GPT
    windows: Any  # regimen.data.TokenWindows of the training split
    order: Any  # regimen.data.SampleOrder over those windows
    steps: int
    batch: int = BATCH
    clip: float = CLIP

    def batch_ids(self, step: int) -> Any:
        """The sample indices of a step: the same for every loop."""
        return self.order.take(step * self.batch, self.batch)

    def samples(self) -> tuple[Any, Any]:
        """Every (x, y) the run will read, gathered once (the peers' Dataset serves them)."""
        import numpy as np

        return self.windows.gather(np.concatenate([self.batch_ids(i) for i in range(self.steps)]))


def make_workload(size: str, steps: int) -> Workload:
    """The model (seeded like `regimen.task.build_task`) and the stdlib data."""
    from regimen.data import SampleOrder, load_source
    from regimen.models import GPT, GPTConfig
    from regimen.strategy import DataConfig

    data = load_source(DataConfig(source="stdlib"), CONTEXT)
    reset_peak_rss()  # from here on the peak is the loop's own
    torch.manual_seed(SEED)  # the same initial weights as regimen's build_task
    model = GPT(GPTConfig(vocab_size=data.vocab_size, context=CONTEXT, **SIZES[size]))
    return Workload(model, data.train, SampleOrder(len(data.train), SEED), steps)


def make_optimizer(model: Any) -> Any:
    """Fused AdamW over regimen's parameter groups (what `build_optimizer` makes for adamw)."""
    from regimen.optim.groups import decay_groups

    return torch.optim.AdamW(decay_groups(model, WEIGHT_DECAY), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)


# ---- the loops (each returns the time after every step and the last loss) --------------------


def hand_step(model: Any, params: list, optimizer: Any, x: Any, y: Any, clip: float) -> Any:
    """One step of the hand-written loop: forward, loss, backward, clip, step, zero_grad."""
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def torch_loop(w: Workload) -> tuple[list[float], float]:
    """(a) The hand-written loop: nanoGPT's train.py with its extras stripped."""
    model, stamps = w.model, []
    model.train()
    optimizer = make_optimizer(model)
    params = list(model.parameters())
    for step in range(w.steps):
        x, y = w.windows.gather(w.batch_ids(step))
        loss = hand_step(model, params, optimizer, x, y, w.clip)
        stamps.append(time.perf_counter())
    return stamps, float(loss.detach())


def regimen_loop(size: str, steps: int) -> tuple[list[float], float]:
    """(b) regimen's `Trainer.fit`, with a timestamp after every `train_step`."""
    from regimen.data import load_source
    from regimen.models import build_model
    from regimen.strategy import Strategy
    from regimen.task import Task, cross_entropy
    from regimen.trainer import Trainer

    shape = SIZES[size]
    overrides = [
        f"model.n_layer={shape['n_layer']}",
        f"model.n_head={shape['n_head']}",
        f"model.d_model={shape['d_model']}",
        f"model.context={CONTEXT}",
        "data.source=stdlib",
        "optimizer.name=adamw",
        f"optimizer.lr={LR}",
        f"optimizer.weight_decay={WEIGHT_DECAY}",
        "lr.schedule=constant",
        f"batch.size={BATCH}",
        f"train.steps={steps}",
        f"train.clip={CLIP}",
        f"train.seed={SEED}",
        f"train.eval_every={steps + 1}",  # the one evaluation, at the end, is after the last stamp
        f"train.eval_samples={BATCH}",
        "train.device=cpu",
        "observe.progress=none",
    ]
    strategy = Strategy.load(None, overrides).resolve()
    # What `build_task(strategy)` does, with the peak-RSS reset after the data like the others.
    data = load_source(strategy.data, strategy.model.context)
    reset_peak_rss()
    torch.manual_seed(strategy.train.seed)
    task = Task(build_model(strategy.model, vocab_size=data.vocab_size), data, loss=cross_entropy)
    stamps: list[float] = []
    losses: list[float] = []

    def stamp(_: Trainer, out: dict) -> None:  # the trainer's per-step hook, after every optimizer step
        stamps.append(time.perf_counter())
        losses.append(out["loss"])

    Trainer(strategy, task, hooks=[stamp]).fit()
    return stamps, losses[-1]


def worker(kind: str, size: str, steps: int, warmup: int, threads: int) -> dict:
    """One run of one loop in this process: tokens/s after warmup, peak RSS, last loss."""
    torch.set_num_threads(threads)
    if kind == "regimen":
        stamps, loss = regimen_loop(size, steps)
    else:
        w = make_workload(size, steps)
        run: Callable[[Workload], tuple[list[float], float]]
        if kind == "torch":
            run = torch_loop
        elif kind == "lightning":
            from benchmarks.peers import lightning_loop as run
        elif kind == "hf":
            from benchmarks.peers import hf_loop as run
        else:
            raise ValueError(f"unknown loop {kind!r}; allowed: {', '.join(KINDS)}")
        stamps, loss = run(w)
    assert len(stamps) == steps, f"{kind}: {len(stamps)} steps timed, {steps} asked"
    seconds = stamps[-1] - stamps[warmup - 1]
    tokens = (steps - warmup) * BATCH * CONTEXT
    return {
        "kind": kind,
        "size": size,
        "tokens_per_s": tokens / seconds,
        "ms_per_step": 1000 * seconds / (steps - warmup),
        "peak_rss_mib": peak_rss_mib(),
        "loss": loss,
        "threads": torch.get_num_threads(),
    }


# ---- the benchmark -------------------------------------------------------------------------


def run(quick: bool) -> list[Table]:
    """Interleaved repeats of every available loop at both sizes; ratios to the torch loop."""
    from benchmarks.peers import bench_python, importable

    python = bench_python()
    peers = importable(python)
    kinds = ["torch", "regimen"] + [k for k in ("lightning", "hf") if peers.get(k)]
    repeats = 2 if quick else 5
    plan = {"1M": (40, 10) if quick else (200, 20), "10M": (15, 5) if quick else (60, 10)}  # (steps, warmup)
    n_threads = threads()
    tables = []
    for size, (steps, warmup) in plan.items():
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(repeats):
            for kind in kinds:
                args = ["--worker", kind, "--size", size, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(n_threads)]
                cmd = python_command("loop_speed", *args)
                cmd[0] = python
                results[kind].append(run_worker(cmd))
        setup = (
            f"{steps} steps of which the first {warmup} are not timed; median of {repeats} interleaved runs, each its own "
            f"process, {n_threads} torch threads; interpreter `{_short(python)}`"
        )
        tables.append(_table(size, results, setup, quick, peers))
    return tables


def _table(size: str, results: dict[str, list[dict]], setup: str, quick: bool, peers: dict) -> Table:
    fields = ("tokens_per_s", "ms_per_step", "peak_rss_mib")
    med = {k: {f: statistics.median(r[f] for r in rs) for f in fields} for k, rs in results.items()}
    base = med["torch"]
    rows = []
    for kind, m in med.items():
        rows.append(
            [
                LABELS[kind],
                m["tokens_per_s"],
                m["ms_per_step"],
                m["tokens_per_s"] / base["tokens_per_s"],
                m["peak_rss_mib"],
                m["peak_rss_mib"] / base["peak_rss_mib"],
                statistics.median(r["loss"] for r in results[kind]),
            ]
        )
    ratio = med["regimen"]["tokens_per_s"] / base["tokens_per_s"]
    notes = [
        f"GPT {size} ({SIZES[size]}, context {CONTEXT}), batch {BATCH}, fused AdamW; {setup}.",
        f"regimen / torch loop = {ratio:.3f} (target >= {TARGET}): " + ("met." if ratio >= TARGET else "**not met**."),
    ]
    for kind in ("lightning", "hf"):
        if kind in med:
            ahead = med["regimen"]["tokens_per_s"] / med[kind]["tokens_per_s"]
            notes.append(f"regimen / {LABELS[kind]} = {ahead:.3f}: " + ("regimen ahead." if ahead > 1 else "**regimen behind**."))
        else:
            notes.append(f"{LABELS[kind]}: not importable here ({peers.get(kind + '_error', 'make bench-env')}); left out.")
    notes.append("Last loss: the final step's training loss, a check that the loops do the same work (HF shuffles its own order).")
    return Table(
        title=f"Loop speed, GPT {size}",
        columns=["loop", "tokens/s", "ms/step", "x torch loop", "peak RSS MiB", "RSS x torch loop", "last loss"],
        rows=rows,
        command=rerun_command("loop_speed", quick),
        notes=notes,
        fmt=FORMATS,
    )


def _short(python: str) -> str:
    return python.replace(str(ROOT) + "/", "")


def main() -> None:
    """Without --worker: the whole benchmark (`common.cli`); with it: one run, JSON out."""
    import sys

    if "--worker" not in sys.argv:
        cli(run, __doc__)
        return
    parser = loop_worker_parser(KINDS, steps=50)
    parser.add_argument("--size", choices=list(SIZES), default="1M")
    args = parser.parse_args()
    print(to_json(worker(args.worker, args.size, args.steps, args.warmup, args.threads or threads())))


if __name__ == "__main__":
    main()
