"""A task: a model, its data, and how a batch becomes a loss (and metrics).

The trainer knows nothing about models or data formats; it asks the task for the loss of a
micro-batch. A batch is a tuple `(inputs..., target)` (the loss function compares the model's
output with the target), or a mapping passed as keyword arguments, Hugging Face style, whose
output carries `.loss` (or `["loss"]`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> task = Task(nn.Linear(3, 2, bias=False), None, loss=resolve_loss("cross_entropy"))
    >>> loss, _, _ = task.forward((torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
    >>> round(loss.item(), 4)  # zero logits over 2 classes: ln 2
    0.6931
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regimen.data import TaskData, load_source
from regimen.errors import UserError
from regimen.models import build_model
from regimen.strategy import Strategy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A metric returns (sum over the batch, count) so that it averages exactly over any split.
MetricFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 outputs are upcast for the loss; float32 and float64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position; logits (..., C) against integer targets (...)."""
    return F.cross_entropy(_upcast(output).reshape(-1, output.shape[-1]), target.reshape(-1), ignore_index=-100)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, with the output squeezed to the target's shape."""
    output = _upcast(output)
    return F.mse_loss(output.reshape(target.shape), target.to(output.dtype))


def accuracy(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Correct argmax predictions (positions with target -100 are ignored)."""
    mask = target != -100
    return ((output.argmax(-1) == target) & mask).sum(), int(mask.sum())


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}
METRICS: dict[str, MetricFn] = {"accuracy": accuracy}


def resolve_loss(loss: str | LossFn | None) -> LossFn | None:
    """A loss function from a name or a callable (None: the model's output has `.loss`)."""
    if loss is None or callable(loss):
        return loss
    if loss not in LOSSES:
        raise UserError(f"loss = {loss!r}: allowed: {', '.join(LOSSES)}, or a callable (output, target) -> loss")
    return LOSSES[loss]


def resolve_metrics(metrics: Sequence[str | MetricFn] | None) -> dict[str, MetricFn]:
    """Named metric functions; a callable is named after its `__name__`."""
    out: dict[str, MetricFn] = {}
    for m in metrics or []:
        if callable(m):
            out[getattr(m, "__name__", "metric")] = m
        elif m in METRICS:
            out[m] = METRICS[m]
        else:
            raise UserError(f"metrics: unknown metric {m!r}; allowed: {', '.join(METRICS)}, or a callable (output, target) -> (sum, count)")
    return out


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise UserError(f"the model returned a {type(out).__name__}; with a loss function it must return a tensor or an object with .logits")


@dataclass
class Task:
    """A model, its data, the loss and the metrics."""

    model: nn.Module
    data: TaskData | None
    loss: LossFn | None = None
    metrics: dict[str, MetricFn] = field(default_factory=dict)

    def forward(self, batch: Any, model: nn.Module | None = None) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """(mean loss over the batch, model output, target) for one batch."""
        model = model if model is not None else self.model  # (a compiled module has no truth value)
        if isinstance(batch, Mapping):
            out = model(**batch)
            target = batch.get("labels")
        elif len(batch) == 1:
            out, target = model(batch[0]), None
        else:
            out, target = model(*batch[:-1]), batch[-1]
        if self.loss is None or target is None:
            if hasattr(out, "loss") and out.loss is not None:
                return out.loss, out, target
            if isinstance(out, Mapping) and "loss" in out:
                return out["loss"], out, target
            raise UserError(
                "the model's output has no .loss; pass loss='cross_entropy', 'mse' or a callable, and batches of (inputs, target)"
            )
        return self.loss(_logits(out), target), out, target

    def measure(self, out: Any, target: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, int]]:
        """Every metric's (sum, count) on one batch."""
        if target is None or not self.metrics:
            return {}
        logits = _logits(out)
        return {name: fn(logits, target) for name, fn in self.metrics.items()}


def loss_unit(task: Task) -> str:
    """What the task's loss is measured in: nats per byte (byte corpora), per token, per sample, or a squared error.

    >>> from torch import nn
    >>> loss_unit(Task(nn.Linear(2, 2), None, loss=mse))
    'squared error'
    """
    if task.loss is mse:
        return "squared error"
    if task.loss is not cross_entropy and task.loss is not None:
        return "loss"
    data = task.data
    if data is not None and data.tokens_per_sample > 1:
        return "nats/byte" if data.unigram_entropy is not None else "nats/token"  # a byte corpus has a byte entropy
    return "nats/sample"


def build_task(strategy: Strategy) -> Task:
    """The built-in task a strategy describes: its model on its data source."""
    data = load_source(strategy.data, strategy.model.context)
    torch.manual_seed(strategy.train.seed)  # the model's initial weights follow the seed
    model = build_model(strategy.model, vocab_size=data.vocab_size, num_features=data.num_features, num_classes=data.num_classes)
    metrics = ["accuracy"] if strategy.model.name in ("mlp", "cnn") else []
    task = Task(model, data, loss=cross_entropy, metrics=resolve_metrics(metrics))
    if ":" in strategy.model.name:
        _check_outputs(task, strategy.model.name)
    return task


def _check_outputs(task: Task, name: str) -> None:
    """A user's model must run on the data and give a score for every token (or class): one line if not."""
    assert task.data is not None
    classes = task.data.vocab_size if task.data.tokens_per_sample > 1 else task.data.num_classes
    batch = task.data.train.gather(np.arange(min(2, len(task.data.train))))
    was_training = task.model.training
    task.model.eval()  # no running statistics (batch norm) may move: this batch is not training
    try:
        with torch.no_grad():
            out = task.model(*batch[:-1])  # the built-in sources give (inputs, target)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"model.name = {name!r}: the model fails on a batch of the data ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        task.model.train(was_training)
    width = _logits(out).shape[-1]
    if width < classes:
        what = "tokens in the data's vocabulary" if task.data.tokens_per_sample > 1 else "classes"
        raise UserError(f"model.name = {name!r}: the model gives {width} outputs per position, fewer than the {classes} {what}")
