"""The learning-rate range test (`regimen lr-find`): sweep the LR up until training diverges.

The sweep trains for at most `steps` steps with the real training step (`Trainer.train_step`:
the strategy's optimizer from `build_optimizer`, its batch schedule, micro-batching, clipping,
the task's forward and the data in the order a run reads it); only the LR schedule is replaced.
Step i uses

    optimizer.lr_i = min_lr * (max_lr / min_lr) ** (i / (steps - 1))

constant within the step (no warmup, no decay). The strategy's batch-size scaling rule still
applies on top, so the swept value is exactly the `optimizer.lr` to write in the strategy.
The model, the optimizer-free state of the task and torch's RNG are restored afterwards: the
test leaves nothing changed.

Decisions (Smith 2017, "Cyclical Learning Rates", section 3.3; the fastai and Lightning finders):

- The loss a step's LR led to is the one measured at the next step (the forward pass of step
  i+1 sees the weights step i updated), so loss i+1 is paired with lr i.
- Stop when the loss is non-finite, or when its exponential moving average (beta 0.98, bias
  corrected, as fastai and Lightning do) exceeds 4x the best so far: the run has diverged.
- The curve the suggestions are read from is a centred moving average (a window of about 5%
  of the steps). An exponential average lags: with beta 0.98 it averages the last ~50 steps,
  which on a 100-step sweep over 8 decades is a lag of ~4 decades in LR. A centred window has
  no lag.
- Two suggestions: the LR of steepest descent (most negative d loss / d ln lr of the smoothed
  loss, searched before its minimum), and a tenth of the LR at the minimum. Steepest descent is
  the one printed as the override: the minimum sits at the edge of divergence.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 4); y = (x[:, 0] > 0).long()  # learnable labels: the loss falls, then diverges
    >>> model = torch.nn.Linear(4, 2)
    >>> before = model.weight.detach().clone()
    >>> result = lr_find(model, (x, y), loss="cross_entropy", overrides={"optimizer.name": "sgd"}, sweep=Sweep(steps=30))
    >>> bool(torch.equal(model.weight, before)), result.override().startswith("optimizer.lr=")
    (True, True)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from regimen.errors import UserError
from regimen.strategy import Strategy

if TYPE_CHECKING:  # torch is imported when a sweep runs: `regimen lr-find` checks its arguments first
    from torch import nn

    from regimen.schedules import Schedule
    from regimen.task import Task

PLOT_FILE = "lr_find.png"
RESULT_FILE = "lr_find.json"


@dataclass(frozen=True)
class Sweep:
    """The range of the sweep and when to stop it.

    Example:
        >>> Sweep(min_lr=1e-4, max_lr=1.0, steps=5).lr(2)
        0.01
    """

    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100
    # Divergence: the EMA of the loss above `stop_factor` x its best.
    stop_factor: float = 4.0
    beta: float = 0.98

    def validate(self) -> None:
        if not (math.isfinite(self.min_lr) and self.min_lr > 0):
            raise UserError(f"--min = {self.min_lr:g}: must be a finite number > 0")
        if not (math.isfinite(self.max_lr) and self.max_lr > self.min_lr):
            raise UserError(f"--max = {self.max_lr:g}: must be a finite number > --min ({self.min_lr:g})")
        if self.steps < 5:
            raise UserError(f"--steps = {self.steps}: must be >= 5 (a curve needs a few points)")
        if self.stop_factor <= 1:
            raise UserError(f"stop_factor = {self.stop_factor:g}: must be > 1")
        if not 0 <= self.beta < 1:
            raise UserError(f"beta = {self.beta:g}: must be in [0, 1)")

    def lr(self, step: float) -> float:
        """The `optimizer.lr` of step `step` (0-based): exponential from min_lr to max_lr."""
        return self.min_lr * self.multiplier()(step)

    def multiplier(self) -> Schedule:
        """The sweep as an LR schedule over steps, a multiple of `min_lr`: max/min times over steps - 1."""
        from regimen.schedules import exponential

        return exponential(1.0, self.max_lr / self.min_lr, self.steps - 1)


@dataclass
class LRFindResult:
    """The sweep's curve, where it stopped, and the suggested LRs.

    `lrs[j]` is the `optimizer.lr` of a step and `losses[j]` the training loss measured right
    after it; `smoothed` is their centred moving average. `steepest` and `minimum` are None
    when the loss never went down.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str
    steepest: float | None
    minimum: float | None
    width: int = 3
    loss_unit: str = "loss"
    batch_size: int | None = None
    optimizer: str = ""

    @property
    def tenth_of_minimum(self) -> float | None:
        """A tenth of the LR at the minimum of the smoothed loss."""
        return self.minimum / 10 if self.minimum is not None else None

    @property
    def suggested(self) -> float | None:
        """The LR to use: steepest descent, else a tenth of the minimum."""
        return self.steepest if self.steepest is not None else self.tenth_of_minimum

    def override(self) -> str:
        """The suggestion as a command-line override, e.g. `optimizer.lr=0.0031`."""
        if self.suggested is None:
            raise UserError("lr-find: the loss never decreased over the sweep; widen the range (--min lower, --max higher) or add --steps")
        return f"optimizer.lr={self.suggested:.2g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "lrs": self.lrs,
            "losses": [v if math.isfinite(v) else None for v in self.losses],
            "smoothed": [v if math.isfinite(v) else None for v in self.smoothed],
            "stopped": self.stopped,
            "steepest": self.steepest,
            "minimum": self.minimum,
            "tenth_of_minimum": self.tenth_of_minimum,
            "suggested": self.suggested,
            "loss_unit": self.loss_unit,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
        }


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def range_test(task: Task, strategy: Strategy, sweep: Sweep | None = None) -> LRFindResult:
    """Run the LR range test of `strategy` on `task`; the task's model is left unchanged.

    Example:
        >>> from regimen.task import build_task
        >>> s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "optimizer.name=sgd", "observe.progress=none"])
        >>> r = range_test(build_task(s.resolve()), s, Sweep(min_lr=1e-3, max_lr=10, steps=20))
        >>> len(r.lrs) <= 19 and r.stopped in ("diverged", "non-finite", "end")
        True
    """
    from regimen.optim import set_train_mode
    from regimen.task import loss_unit
    from regimen.trainer import Trainer

    sweep = sweep or Sweep()
    sweep.validate()
    s = sweep_strategy(strategy, sweep)
    with _restored(task.model):
        # optimizer.lr is the sweep's first LR and the schedule its multiplier (progress in steps).
        trainer = Trainer(s, task, lr_schedule=sweep.multiplier())
        trainer.wrapped.train()
        set_train_mode(trainer.optimizer, True)
        lrs: list[float] = []
        losses: list[float] = []
        batches: set[int] = set()
        ema, best, stopped = 0.0, math.inf, "end"
        for i in range(sweep.steps):
            out = trainer.train_step()
            loss = float(out["loss"])
            if out["skipped"] or not math.isfinite(loss):
                stopped = "non-finite"
                lrs = lrs[: len(losses)]  # the LR that blew up has no finite loss to plot
                break
            if i > 0:
                losses.append(loss)  # what the previous step's LR led to
            ema = sweep.beta * ema + (1 - sweep.beta) * loss
            smooth = ema / (1 - sweep.beta ** (i + 1))
            best = min(best, smooth)
            if smooth > sweep.stop_factor * best:
                stopped = "diverged"
                break
            if i == sweep.steps - 1:
                break  # no later step measures this LR's loss
            lrs.append(sweep.lr(i))
            batches.add(int(out["batch_size"]))
            trainer.progress = trainer.progress.advanced(out["batch_size"], trainer.data.tokens_per_sample)
        losses = losses[: len(lrs)]
    smoothed = centred_average(losses, window(sweep.steps))
    steepest, minimum = suggestions(lrs, smoothed)
    return LRFindResult(
        lrs,
        losses,
        smoothed,
        stopped,
        steepest,
        minimum,
        width=window(sweep.steps),
        loss_unit=loss_unit(task),
        batch_size=batches.pop() if len(batches) == 1 else None,
        optimizer=s.optimizer.name,
    )


def sweep_strategy(strategy: Strategy, sweep: Sweep) -> Strategy:
    """The strategy the sweep trains: the same, peak LR at the sweep's start, LR counted in steps, no warmup."""
    return strategy.replace(
        {
            "optimizer.lr": sweep.min_lr,
            "lr.schedule": "constant",
            "lr.unit": "steps",
            "lr.warmup": 0.0,
            "train.steps": sweep.steps,
            "train.samples": None,
            "train.tokens": None,
            "train.epochs": None,
            "checkpoint.every": 0,
            "checkpoint.every_minutes": 0.0,
        }
    )


class _restored:
    """Restore a model's weights, buffers, gradients, train/eval flags and torch's RNG on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        import torch

        m = self.model
        self.state = {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in m.parameters()]
        self.modes = [(mod, mod.training) for mod in m.modules()]
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def __exit__(self, *exc: object) -> None:
        import torch

        self.model.load_state_dict(self.state)
        for p, g in self.grads:
            p.grad = g
        for mod, mode in self.modes:
            mod.training = mode
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def window(steps: int) -> int:
    """The centred moving average's width: about 5% of the steps, odd, at least 3.

    >>> window(100), window(20), window(400)
    (5, 3, 21)
    """
    return max(3, int(steps * 0.05) // 2 * 2 + 1)


def centred_average(values: list[float], width: int) -> list[float]:
    """Mean over a centred window, narrowed symmetrically at the ends (so nothing lags).

    >>> centred_average([1.0, 2.0, 3.0, 4.0, 10.0], 3)
    [1.0, 2.0, 3.0, 5.666666666666667, 10.0]
    """
    half = width // 2
    out = []
    for j in range(len(values)):
        h = min(half, j, len(values) - 1 - j)
        out.append(float(np.mean(values[j - h : j + h + 1])))
    return out


def suggestions(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None]:
    """(LR of steepest descent before the minimum, LR at the minimum) of a smoothed curve.

    None for both when the loss never went below its start.

    >>> lrs = [10.0**k for k in range(-5, 1)]
    >>> suggestions(lrs, [2.0, 1.9, 1.5, 0.6, 0.5, 3.0])
    (0.001, 0.1)
    """
    if len(smoothed) < 3:
        return None, None
    y = np.asarray(smoothed, dtype=np.float64)
    low = int(np.argmin(y))
    if low == 0 or y[low] >= y[0]:
        return None, None
    slope = np.gradient(y[: low + 1], np.log(np.asarray(lrs[: low + 1], dtype=np.float64)))
    return float(lrs[int(np.argmin(slope))]), float(lrs[low])


# --------------------------------------------------------------------------------------------
# The Python API and the plot
# --------------------------------------------------------------------------------------------


def lr_find(
    model: nn.Module,
    data: Any,
    *,
    loss: Any = None,
    strategy: Strategy | str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    sweep: Sweep | None = None,
) -> LRFindResult:
    """The LR range test of any model on any data (shaped as for `regimen.fit`); the model is unchanged.

    Without `strategy`, the sweep uses `fit`'s defaults (Adam, batch 32, no clipping, no LR
    scaling with the batch); `overrides` sets any key, e.g. `{"optimizer.name": "sgd"}`.

    Example:
        >>> import torch
        >>> x, y = torch.randn(128, 3), torch.randn(128)
        >>> r = lr_find(torch.nn.Linear(3, 1), (x, y), loss="mse", sweep=Sweep(steps=20))
        >>> r.stopped in ("diverged", "non-finite", "end")
        True
    """
    from regimen.data import TaskData, as_samples
    from regimen.task import Task, resolve_loss

    if isinstance(strategy, (str, Path)):
        strategy = Strategy.load(strategy)
    if strategy is None:
        strategy = Strategy.for_python(
            {
                "optimizer": {"name": "adam"},
                "lr": {"schedule": "constant", "scale_with_batch": "none"},
                "train": {"clip": 0.0},
                "observe": {"progress": "none", "report": False},
            }
        )
    if overrides:
        strategy = strategy.replace(dict(overrides))
    if strategy.train.device == "auto":
        # Leave the model where it is (the trainer would move it to the GPU).
        first = next(model.parameters(), None)
        strategy = strategy.replace({"train.device": str(first.device) if first is not None else "cpu"})
    task = Task(model, TaskData(as_samples(data), None), loss=resolve_loss(loss))
    return range_test(task, strategy, sweep)


def plot(result: LRFindResult, path: str | Path) -> Path:
    """Draw the smoothed loss against the LR (log axis), the raw loss faintly, both suggestions marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from regimen.figures import PALETTE

    fig = Figure(figsize=(7.5, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color=PALETTE[0], alpha=0.25, linewidth=1, label="loss (each step)")
    ax.plot(result.lrs, result.smoothed, color=PALETTE[0], linewidth=2, label=f"smoothed (centred mean of {result.width} steps)")
    marks = [("steepest descent", result.steepest, PALETTE[1]), ("minimum / 10", result.tenth_of_minimum, PALETTE[2])]
    for label, lr, colour in marks:
        if lr is not None:
            ax.axvline(lr, color=colour, linestyle="--", linewidth=1.2, label=f"{label}: {lr:.2g}")
            ax.plot([lr], [float(np.interp(math.log(lr), np.log(result.lrs), result.smoothed))], "o", color=colour)
    if result.minimum is not None:
        ax.axvline(result.minimum, color="#59636e", linestyle=":", linewidth=1, label=f"minimum: {result.minimum:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer.lr (log scale)")
    ax.set_ylabel(f"training loss ({result.loss_unit})")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:
        # Divergence explodes the loss: keep the descent readable.
        low = min(finite)
        before = finite[: finite.index(low) + 1]
        top = max(before) if len(before) > 1 else max(finite)
        span = max(top - low, 1e-12)
        ax.set_ylim(low - 0.1 * span, top + 0.15 * span)
    batch = f", batch {result.batch_size}" if result.batch_size else ""
    ax.set_title(f"LR range test: {result.optimizer}{batch}, stopped: {result.stopped}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9, frameon=False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


STOPPED = {
    "diverged": "the smoothed loss rose above {factor:g}x its best (diverged)",
    "non-finite": "the loss became non-finite (diverged)",
    "end": "reached --max without diverging",
}


def format_result(result: LRFindResult, sweep: Sweep, plot_path: Path | None) -> str:
    """The lines `regimen lr-find` prints; the last one is the override to paste."""
    last = result.lrs[-1] if result.lrs else sweep.min_lr
    lines = [
        f"regimen lr-find: {len(result.lrs)} steps of {result.optimizer}, optimizer.lr {sweep.min_lr:.2g} -> {last:.2g}; "
        f"stopped: {STOPPED[result.stopped].format(factor=sweep.stop_factor)}",
    ]
    rows = []
    if result.steepest is not None:
        rows.append(("steepest descent of the smoothed loss", f"optimizer.lr={result.steepest:.2g}"))
    if result.minimum is not None:
        rows.append((f"a tenth of the minimum ({result.minimum:.2g})", f"optimizer.lr={result.minimum / 10:.2g}"))
    if plot_path is not None:
        rows.append(("plot", str(plot_path)))
    lines += [f"  {label:<38}  {value}" for label, value in rows]
    lines.append(f"suggested: {result.override()}")
    return "\n".join(lines)


def run(args: Any) -> int:
    """`regimen lr-find`: the range test of a strategy's built-in task; prints the override."""
    from regimen.task import build_task

    sweep = Sweep(min_lr=args.min_lr, max_lr=args.max_lr, steps=args.steps)
    sweep.validate()
    strategy = Strategy.from_cli(args.config, args.overrides)
    out_dir = Path(args.out) if args.out else Path("runs") / time.strftime("lr-find-%Y%m%d-%H%M%S")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {str(out_dir)!r} exists and is not a directory")
    result = range_test(build_task(strategy.resolve()), strategy, sweep)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = plot(result, out_dir / PLOT_FILE)
    (out_dir / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    print(format_result(result, sweep, path))
    return 0


__all__ = ["LRFindResult", "Sweep", "format_result", "lr_find", "plot", "range_test"]
