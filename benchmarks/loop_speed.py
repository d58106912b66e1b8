"""Loop speed: regimen's Trainer against a hand-written PyTorch loop, Lightning and Hugging Face.

The same work for every loop: the built-in GPT at about 1M parameters (4 layers, width 128),
10M (6 layers, width 384) and 50M (10 layers, width 640), context 64, byte vocabulary; the
`stdlib` corpus windows of `regimen.data`; batch 12; fused AdamW (lr 1e-3, weight decay 0.1 on
the matrices only, regimen's parameter groups); the same number of steps, from the same initial
weights. Two modes:

- `bare`: a constant LR, no clipping, no evaluation and no checkpoint inside the timed steps.
  (regimen still computes the gradient norm for its non-finite guard: one read of the gradients.)
- `features`, what a real run turns on: global-norm clipping at 1.0, a warmup-stable-decay LR
  (decay over the last 40%, 1-sqrt), an evaluation every quarter of the run on 48 fixed
  validation samples, a checkpoint of model and optimizer every quarter of the run; and the
  gradient-noise-scale estimate in regimen and in the hand-written loop (a') (the peers have
  none: against them regimen does more work).
  Each loop evaluates and saves its own way: the hand-written loop as nanoGPT (`torch.save` of
  both state dicts), Lightning's `ModelCheckpoint`, HF's `save_strategy="steps"`, regimen's DCP
  checkpoint written in the background (`checkpoint.async_save = true`, the issue's ask; CPU runs
  save synchronously by default: `benchmarks.feature_cost` times both).

The loops:

- `torch loop`: nanoGPT's loop written out by hand (get batch, forward, loss, backward, [clip],
  step, zero_grad, [eval, save]), reading the batches the way regimen does (`SampleOrder` +
  `TokenWindows`). This is the baseline: every ratio is against it.
- `torch loop + noise scale` (features mode): the same with the noise scale written by hand
  (`HandNoiseScale`: the last gradient kept, one dot product a step), regimen's like-for-like
  baseline there; the table's notes give regimen against it, what the estimate costs the
  hand-written loop, and both loops' B_noise at the end (the same estimate, computed twice).
- `regimen`: `Trainer.fit()` with its defaults (log row every 10 steps), no progress bar; a run
  directory only in `features` mode (for its checkpoints).
- `lightning`: `lightning.Trainer.fit` with logging, progress bar and model summary off; `hf`:
  `transformers.Trainer.train` with reporting and tqdm off, our optimizer and LR schedule
  passed in. The peers read samples from a Dataset through their own DataLoader (the way each is
  meant to be used); their samples are gathered once up front, so their data path costs them
  less than the baseline's, not more.

Each run is its own process (no state shared between loops), with the same number of torch
threads. Its peak RSS is counted from the moment the corpus is loaded (the same for every loop,
and a one-off peak of its own), so it covers the loop's imports, model, optimizer state and
activations. Repeats are interleaved (a, b, c, d, a, b, ...) so a change in machine load hits
every loop of a round alike; each ratio is taken within a round (against the torch loop of the
same round) and reported as the median over rounds with its range: "ahead" means ahead in
every round, not only in the median. Throughput is timed from the end of the first `warmup`
steps to the end of the last step, so start-up (imports, data, framework set-up) is excluded and
every per-step cost of each loop is included (evaluations and saves too, in `features` mode).
regimen's data wait (the time its step waited for the batch, `train_step`'s `data_wait`) is
reported as a share of the timed steps. The peers run where they are importable: in
`.bench-venv` (`make bench-env`), which this benchmark uses for all four loops when it exists.

    python -m benchmarks --only loop_speed [--quick]
    python -m benchmarks.loop_speed --sizes 1M 10M 50M --modes bare features [--quick]
    python -m benchmarks.loop_speed --worker regimen --size 1M --steps 50   # one run, JSON out
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    rounds,
    run_worker,
    threads,
    to_json,
)

SIZES: dict[str, dict[str, int]] = {
    "1M": {"n_layer": 4, "n_head": 4, "d_model": 128},
    "10M": {"n_layer": 6, "n_head": 6, "d_model": 384},
    "50M": {"n_layer": 10, "n_head": 10, "d_model": 640},
}
# (steps, warmup) per size: full length, and --quick.
PLAN = {"1M": (200, 20), "10M": (60, 10), "50M": (24, 4)}
QUICK_PLAN = {"1M": (40, 10), "10M": (16, 5), "50M": (8, 3)}
MODES = ("bare", "features")
MODE_TEXT = {
    "bare": "constant LR, no clipping, no evaluation or checkpoint in the timed steps",
    "features": "clipping, WSD, evaluation and a checkpoint every quarter of the run, and the noise scale (regimen and (a'))",
}
CONTEXT = 64
BATCH = 12
LR = 1e-3
WEIGHT_DECAY = 0.1
CLIP = 1.0  # features mode
EVAL_SAMPLES = 48  # features mode: validation samples per evaluation (4 batches)
SEED = 0
KINDS = ("torch", "torch_noise", "regimen", "lightning", "hf")
LABELS = {
    "torch": "torch loop (a)",
    "torch_noise": "torch loop + noise scale (a')",
    "regimen": "regimen (b)",
    "lightning": "Lightning (c)",
    "hf": "HF Trainer (d)",
}
FORMATS = {
    "tokens/s": ".0f",
    "ms/step": ".2f",
    "x torch loop": ".3f",
    "range": "",
    "peak RSS MiB": ".0f",
    "RSS x torch loop": ".2f",
    "last loss": ".3f",
}
TARGET = 0.99  # regimen's tokens/s against the hand-written loop (issue 15)


@dataclass
class Workload:
    """What every loop trains: model, data, batch, steps, and the optimizer it must build."""

    model: torch.nn.Module  # the GPT
    windows: Any  # regimen.data.TokenWindows of the training split
    order: Any  # regimen.data.SampleOrder over those windows
    steps: int
    batch: int = BATCH
    features: bool = False
    val: Any = None  # features: TokenWindows of the validation split
    noise_scale: float | None = None  # (a'): B_noise after the last step
    save_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="loop-speed-"))

    @property
    def clip(self) -> float:
        """The clipping norm (0: none)."""
        return CLIP if self.features else 0.0

    @property
    def every(self) -> int:
        """Evaluate and save after every `every` steps (features mode; never at the last step)."""
        return max(self.steps // 4, 1) if self.features else self.steps + 1

    def due(self, step: int) -> bool:
        """After step `step` (1-based): evaluation and checkpoint time, inside the timed run."""
        return step % self.every == 0 and step < self.steps

    def lr(self, step: int) -> float:
        """The LR of step `step` (0-based): constant, or WSD in features mode."""
        if not hasattr(self, "_schedule"):
            self._schedule = lr_multiplier(self.features, self.steps)
        return LR * self._schedule(step)

    def batch_ids(self, step: int) -> Any:
        """The sample indices of a step: the same for every loop."""
        return self.order.take(step * self.batch, self.batch)

    def val_samples(self) -> tuple[Any, Any]:
        """The fixed validation samples every loop evaluates on (features mode)."""
        import numpy as np

        return self.val.gather(np.arange(EVAL_SAMPLES))

    def samples(self) -> tuple[Any, Any]:
        """Every (x, y) the run will read, gathered once (the peers' Dataset serves them)."""
        import numpy as np

        return self.windows.gather(np.concatenate([self.batch_ids(i) for i in range(self.steps)]))


def lr_multiplier(features: bool, steps: int) -> Callable[[float], float]:
    """The LR schedule as a multiple of the peak, a function of the step: regimen's own WSD (or constant)."""
    from regimen.schedules import build_lr_multiplier
    from regimen.strategy import LRConfig

    cfg = LRConfig(schedule="wsd", decay_fraction=0.4, decay_shape="1-sqrt", min_lr=0.0) if features else LRConfig(schedule="constant")
    return build_lr_multiplier(cfg, LR, steps)


def make_workload(size: str, steps: int, features: bool = False) -> Workload:
    """The model (seeded like `regimen.task.build_task`) and the stdlib data."""
    from regimen.data import SampleOrder, load_source
    from regimen.models import GPT, GPTConfig
    from regimen.strategy import DataConfig

    data = load_source(DataConfig(source="stdlib"), CONTEXT)
    reset_peak_rss()  # from here on the peak is the loop's own
    torch.manual_seed(SEED)  # the same initial weights as regimen's build_task
    model = GPT(GPTConfig(vocab_size=data.vocab_size, context=CONTEXT, **SIZES[size]))
    return Workload(model, data.train, SampleOrder(len(data.train), SEED), steps, features=features, val=data.val)


def make_optimizer(model: Any) -> Any:
    """Fused AdamW over regimen's parameter groups (what `build_optimizer` makes for adamw)."""
    from regimen.optim.groups import decay_groups

    return torch.optim.AdamW(decay_groups(model, WEIGHT_DECAY), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)


# ---- the loops (each returns the time after every step and the last loss) --------------------


def hand_step(model: Any, params: list, optimizer: Any, x: Any, y: Any, clip: float, estimate: HandNoiseScale | None = None) -> Any:
    """One step of the hand-written loop: forward, loss, backward, clip (when `clip` > 0), step, zero_grad.

    With `estimate` (loop (a')): the norm first, the noise-scale pair before clipping (which scales the gradients).
    """
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    if estimate is not None:
        grads = [p.grad for p in params]
        with torch.no_grad():
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            estimate.step(grads, norm, clip)
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, clip, norm, foreach=True)  # = clip_grad_norm_ with the norm known
    elif clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def hand_eval(model: Any, x: Any, y: Any) -> float:
    """nanoGPT's `estimate_loss` on the fixed validation samples, in batches of `BATCH`."""
    model.eval()
    losses = [F.cross_entropy(model(x[i : i + BATCH]).flatten(0, 1), y[i : i + BATCH].flatten()) for i in range(0, len(x), BATCH)]
    model.train()
    return float(torch.stack(losses).mean())


class HandNoiseScale:
    """The gradient noise scale added to the hand-written loop by hand, the way regimen measures it
    in one process with one micro-batch (McCandlish et al. 2018 from two consecutive steps'
    gradients, AdaptDL's pairing): the last gradient kept by reference (`zero_grad` sets `.grad`
    to None, so the next backward writes new tensors), one dot product with it per step, |g|^2
    from the clipping norm, the averages as tensors (no host sync). Written without regimen.
    """

    def __init__(self, batch: int, ema: float = 0.95) -> None:
        self.batch, self.ema = batch, ema
        self.prev: list[Any] | None = None
        self.prev_sq: Any = None
        self.prev_scale: Any = None  # clipping multiplied the kept gradient in place by this
        self.grad_sq = torch.zeros((), dtype=torch.float64)
        self.trace = torch.zeros((), dtype=torch.float64)

    def step(self, grads: list[Any], norm: Any, clip: float) -> None:
        """Pair this step's gradients (total norm `norm`, before clipping at `clip`) with the last ones."""
        sq = norm.square()
        if self.prev is not None:
            dot = torch.stack([torch.dot(a.view(-1), b.view(-1)) for a, b in zip(grads, self.prev)]).sum() / self.prev_scale
            small = (sq + self.prev_sq) / 2  # at batch b
            big = (sq + self.prev_sq + 2 * dot) / 4  # their mean: batch 2b
            b = self.batch
            self.grad_sq = self.grad_sq * self.ema + (2 * big - small).double() * (1 - self.ema)
            self.trace = self.trace * self.ema + ((small - big) * 2 * b).double() * (1 - self.ema)
        self.prev, self.prev_sq = grads, sq
        self.prev_scale = (clip / (norm + 1e-6)).clamp(max=1.0) if clip > 0 else 1.0  # what clip_grads_with_norm_ multiplies by

    @property
    def value(self) -> float:
        """B_noise in samples (the bias corrections of the two averages cancel)."""
        return float(self.trace / self.grad_sq)


def torch_loop(w: Workload, noise: bool = False) -> tuple[list[float], float]:
    """(a) The hand-written loop: nanoGPT's train.py (clipping, its LR set per step, eval and `torch.save` in features mode).

    (a') with `noise`: and the noise scale measured by hand every step (`HandNoiseScale`), as regimen's features mode does.
    """
    model, stamps = w.model, []
    model.train()
    optimizer = make_optimizer(model)
    params = list(model.parameters())
    val_x, val_y = w.val_samples() if w.features else (None, None)
    estimate = HandNoiseScale(w.batch) if noise else None
    for step in range(w.steps):
        lr = w.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = w.windows.gather(w.batch_ids(step))
        loss = hand_step(model, params, optimizer, x, y, w.clip, estimate)
        stamps.append(time.perf_counter())
        if w.due(step + 1):
            hand_eval(model, val_x, val_y)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, os.path.join(w.save_dir, "ckpt.pt"))
    w.noise_scale = estimate.value if estimate is not None else None
    return stamps, float(loss.detach())


def regimen_overrides(size: str, steps: int, features: set[str]) -> list[str]:
    """regimen's strategy for the workload, with the named features on (`FEATURES`)."""
    shape = SIZES[size]
    every = max(steps // 4, 1)
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
        "train.clip=0",
        f"train.seed={SEED}",
        f"train.eval_every={steps + 1}",  # the one evaluation, at the end, is after the last stamp
        f"train.eval_samples={EVAL_SAMPLES}",
        "train.device=cpu",
        "observe.progress=none",
        "observe.report=false",
        "observe.samples=0",
    ]
    for name in sorted(features):
        overrides += [o.format(every=every) for o in FEATURES[name]]
    return overrides


# What each feature of `features` mode adds to regimen's strategy (`benchmarks.feature_cost`
# times each alone).
FEATURES: dict[str, list[str]] = {
    "clip": [f"train.clip={CLIP}"],
    "wsd": ["lr.schedule=wsd", "lr.decay_fraction=0.4", "lr.decay_shape=1-sqrt", "lr.min_lr=0"],
    "eval": ["train.eval_every={every}"],
    "samples": ["observe.samples=64"],  # the text sample after each evaluation (regimen's default on text)
    "checkpoint": ["checkpoint.every={every}", "checkpoint.async_save=true"],
    "checkpoint_sync": ["checkpoint.every={every}", "checkpoint.async_save=false"],
    "noise": ["observe.noise_scale=true"],
}
FEATURES_MODE = {"clip", "wsd", "eval", "checkpoint", "noise"}


def regimen_loop(
    size: str, steps: int, features: set[str] | None = None, hooks: list[Callable[..., None]] | None = None
) -> tuple[list[float], float, list[float]]:
    """(b) regimen's `Trainer.fit`, with a timestamp after every `train_step` (and `hooks`); also each step's data wait."""
    from regimen.data import load_source
    from regimen.models import build_model
    from regimen.strategy import Strategy
    from regimen.task import Task, cross_entropy
    from regimen.trainer import Trainer

    features = features or set()
    strategy = Strategy.load(None, regimen_overrides(size, steps, features)).resolve()
    # What `build_task(strategy)` does, with the peak-RSS reset after the data like the others.
    data = load_source(strategy.data, strategy.model.context)
    reset_peak_rss()
    torch.manual_seed(strategy.train.seed)
    task = Task(build_model(strategy.model, vocab_size=data.vocab_size), data, loss=cross_entropy)
    stamps: list[float] = []
    losses: list[float] = []
    waits: list[float] = []

    def stamp(_: Trainer, out: dict) -> None:  # the trainer's per-step hook, after every optimizer step
        stamps.append(time.perf_counter())
        losses.append(out["loss"])
        waits.append(out["data_wait"])

    tmp = tempfile.mkdtemp(prefix="loop-speed-regimen-") if any(f.startswith("checkpoint") for f in features) else None
    try:
        Trainer(strategy, task, run_dir=tmp and tmp + "/run", hooks=[stamp, *(hooks or [])]).fit()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # the benchmark made it
    return stamps, losses[-1], waits


def worker(kind: str, size: str, steps: int, warmup: int, threads: int, features: set[str]) -> dict:
    """One run of one loop in this process: tokens/s after warmup, peak RSS, last loss (and regimen's data wait)."""
    torch.set_num_threads(threads)
    waits: list[float] | None = None
    noise_scale: list[float | None] = [None]
    if kind == "regimen":

        def last_noise_scale(trainer: Any, _: dict) -> None:
            noise_scale[0] = trainer.noise.noise_scale if trainer.noise is not None else None

        stamps, loss, waits = regimen_loop(size, steps, features, hooks=[last_noise_scale])
    else:
        assert not features or features == FEATURES_MODE, f"the peers run bare or with every feature, not {sorted(features)}"
        w = make_workload(size, steps, features=bool(features))
        run: Callable[[Workload], tuple[list[float], float]]
        if kind == "torch":
            run = torch_loop
        elif kind == "torch_noise":
            run = functools.partial(torch_loop, noise=True)
        elif kind == "lightning":
            from benchmarks.peers import lightning_loop as run
        elif kind == "hf":
            from benchmarks.peers import hf_loop as run
        else:
            raise ValueError(f"unknown loop {kind!r}; allowed: {', '.join(KINDS)}")
        try:
            stamps, loss = run(w)
            noise_scale[0] = w.noise_scale
        finally:
            shutil.rmtree(w.save_dir, ignore_errors=True)  # the benchmark made it: 2 GB of checkpoints a run at 50M
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
        "noise_scale": noise_scale[0],  # B_noise after the last step, where measured
        "threads": torch.get_num_threads(),
        # regimen: the seconds its steps waited for their batch, as a share of the timed steps
        "data_wait": sum(waits[warmup:]) / seconds if waits is not None else None,
    }


# ---- the benchmark -------------------------------------------------------------------------


SIZES_RUN = list(SIZES)  # --sizes
MODES_RUN = list(MODES)  # --modes


def run(quick: bool) -> list[Table]:
    """Interleaved repeats of every available loop, per size and mode; ratios to the torch loop of the same round."""
    from benchmarks.peers import bench_python, importable

    python = bench_python()
    peers = importable(python)
    every = ["torch", "regimen"] + [k for k in ("lightning", "hf") if peers.get(k)]
    repeats = rounds(quick)
    plan = QUICK_PLAN if quick else PLAN
    n_threads = threads()
    tables = []
    for mode in MODES_RUN:
        for size in SIZES_RUN:
            steps, warmup = plan[size]
            # features: the hand-written loop also with the noise scale, regimen's like-for-like baseline.
            kinds = [*every[:1], "torch_noise", *every[1:]] if mode == "features" else every
            results: dict[str, list[dict]] = {k: [] for k in kinds}
            for r in range(repeats):
                for kind in kinds if r % 2 == 0 else kinds[::-1]:  # alternate the order: no loop always runs first
                    args = ["--worker", kind, "--size", size, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(n_threads)]
                    cmd = python_command("loop_speed", *args, *(["--features"] if mode == "features" else []))
                    cmd[0] = python
                    results[kind].append(run_worker(cmd, timeout=3600))
            setup = (
                f"{steps} steps of which the first {warmup} are not timed; {repeats} interleaved rounds, each run its own "
                f"process, {n_threads} torch threads; interpreter `{_short(python)}`"
            )
            tables.append(_table(size, mode, results, setup, quick, peers))
    return tables


def spread(values: list[float]) -> str:
    """The range of per-round values, for a table cell: "0.981-1.012"."""
    return f"{min(values):.3f}-{max(values):.3f}"


def _table(size: str, mode: str, results: dict[str, list[dict]], setup: str, quick: bool, peers: dict) -> Table:
    fields = ("tokens_per_s", "ms_per_step", "peak_rss_mib")
    med = {k: {f: statistics.median(r[f] for r in rs) for f in fields} for k, rs in results.items()}
    base = results["torch"]
    # Ratios within a round: the loops of one round ran back to back, under the same load.
    per_round = {k: [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rs, base)] for k, rs in results.items()}
    rows = []
    for kind, m in med.items():
        rows.append(
            [
                LABELS[kind],
                m["tokens_per_s"],
                m["ms_per_step"],
                statistics.median(per_round[kind]),
                spread(per_round[kind]),
                m["peak_rss_mib"],
                m["peak_rss_mib"] / med["torch"]["peak_rss_mib"],
                statistics.median(r["loss"] for r in results[kind]),
            ]
        )
    ratio = statistics.median(per_round["regimen"])
    what = (
        "clipping, WSD, evaluation and checkpoints every quarter of the run, and the noise scale (regimen and (a') only)"
        if mode == "features"
        else "constant LR, no clipping, no evaluation or checkpoint in the timed steps"
    )
    notes = [
        f"GPT {size} ({SIZES[size]}, context {CONTEXT}), batch {BATCH}, fused AdamW; {mode}: {what}; {setup}.",
        f"regimen / torch loop = {ratio:.3f} (rounds {spread(per_round['regimen'])}; target >= {TARGET}): "
        + ("met." if ratio >= TARGET else "**not met**."),
    ]
    if "torch_noise" in results:
        # Like for like: the hand-written loop doing the same work, the noise scale included.
        same = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["regimen"], results["torch_noise"])]
        cost = [1 - a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["torch_noise"], base)]
        notes.append(
            f"regimen / {LABELS['torch_noise']} = {statistics.median(same):.3f} (rounds {spread(same)}; target >= {TARGET}): "
            + ("met." if statistics.median(same) >= TARGET else "**not met**.")
            + f" The noise scale written by hand costs the hand-written loop {100 * statistics.median(cost):.1f}% of its "
            f"tokens/s (rounds {100 * min(cost):.1f}-{100 * max(cost):.1f}%); B_noise at the end: by hand "
            f"{statistics.median(r['noise_scale'] for r in results['torch_noise']):.1f}, regimen "
            f"{statistics.median(r['noise_scale'] for r in results['regimen']):.1f} samples."
        )
    for kind in ("lightning", "hf"):
        if kind in med:
            ahead = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["regimen"], results[kind])]
            verdict = "regimen ahead in every round." if min(ahead) > 1 else "**regimen not ahead in every round**."
            notes.append(f"regimen / {LABELS[kind]} = {statistics.median(ahead):.3f} (rounds {spread(ahead)}): {verdict}")
        else:
            notes.append(f"{LABELS[kind]}: not importable here ({peers.get(kind + '_error', 'make bench-env')}); left out.")
    waits = [r["data_wait"] for r in results["regimen"]]
    notes.append(
        f"regimen's data wait: {100 * statistics.median(waits):.3f}% of the timed steps (max {100 * max(waits):.3f}%; target < 1%): "
        + ("met." if max(waits) < 0.01 else "**not met**.")
    )
    notes.append("Last loss: the final step's training loss, a check that the loops do the same work (HF shuffles its own order).")
    return Table(
        title=f"Loop speed, GPT {size}, {mode}",
        columns=["loop", "tokens/s", "ms/step", "x torch loop", "range", "peak RSS MiB", "RSS x torch loop", "last loss"],
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
        import argparse

        extra = argparse.ArgumentParser(add_help=False)
        extra.add_argument("--sizes", nargs="+", choices=list(SIZES), default=SIZES_RUN)
        extra.add_argument("--modes", nargs="+", choices=list(MODES), default=MODES_RUN)
        known, rest = extra.parse_known_args()
        sys.argv[1:] = rest
        SIZES_RUN[:], MODES_RUN[:] = known.sizes, known.modes
        cli(run, __doc__)
        return
    parser = loop_worker_parser(KINDS, steps=50)
    parser.add_argument("--size", choices=list(SIZES), default="1M")
    parser.add_argument("--features", action="store_true", help="features mode (every feature of FEATURES_MODE)")
    parser.add_argument("--only-features", nargs="*", default=None, help="regimen: these features of FEATURES only")
    args = parser.parse_args()
    features = set(args.only_features) if args.only_features is not None else (FEATURES_MODE if args.features else set())
    print(to_json(worker(args.worker, args.size, args.steps, args.warmup, args.threads or threads(), features)))


if __name__ == "__main__":
    main()
