"""`rg.fit`: the Keras-like entry point for any `torch.nn.Module`.

```python
import regimen as rg
history = rg.fit(model, (x_train, y_train), loss="cross_entropy",
                 optimizer="adam", lr=1e-3, epochs=10, batch_size=32,
                 validation_data=(x_val, y_val), metrics=["accuracy"])
history.history["val_accuracy"][-1]
```

`optimizer`, `lr` and `batch_size` are a name / number or a mapping shaped like the
`[optimizer]`, `[lr]` and `[batch]` tables; `strategy=` takes a whole `Strategy` or a TOML path;
any other key goes in `overrides={"train.clip": 0}`. Data is tensors `(x, y)`, a mapping of
tensors (batches are passed as keyword arguments, Hugging Face style), a map-style Dataset, or
an iterable of ready-made batches (then each batch is one step and the batch schedule is the
iterable's own).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from regimen.data import Samples, TaskData, as_samples
from regimen.errors import UserError
from regimen.strategy import Strategy
from regimen.task import LossFn, MetricFn, Task, resolve_loss, resolve_metrics
from regimen.trainer import Trainer


class BatchStream:
    """Ready-made batches (a list, a DataLoader, any iterable) read as one "sample" each.

    A sequence is indexed (so its batches are shuffled like samples); any other iterable is
    cycled in its own order.
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches if isinstance(batches, Sequence) else None
        self.source = batches
        self.iterator = iter(batches)
        self.n = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        if self.n == 0:
            raise UserError("data: the iterable of batches is empty")

    def __len__(self) -> int:
        # An iterable without a length: one "epoch" is nominal; give steps= to fit.
        return self.n if self.n is not None else 1_000_000

    def gather(self, idx: np.ndarray) -> Any:
        assert len(idx) == 1, "batches from an iterable are taken one per step"
        if self.batches is not None:
            return self.batches[int(idx[0])]
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.source)
            return next(self.iterator)


def _is_batch_iterable(data: Any) -> bool:
    if isinstance(data, (Dataset, Mapping)) or hasattr(data, "gather"):
        return False
    if isinstance(data, (tuple, list)) and data and all(hasattr(t, "shape") for t in data):
        return False  # (x, y) tensors
    return isinstance(data, Iterable)


def _samples(data: Any) -> Samples:
    if _is_batch_iterable(data):
        return BatchStream(list(data) if not isinstance(data, Sequence) and hasattr(data, "__len__") and len(data) < 10_000 else data)
    return as_samples(data)


@dataclass
class History:
    """Keras's History: `history["val_loss"]` is a list with one value per evaluation."""

    history: dict[str, list[float]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        for key, value in row.items():
            if isinstance(value, (int, float)):
                self.history.setdefault(key, []).append(value)


def _table(value: Any, key: str) -> dict[str, Any]:
    """A name or number as the main key of a section, or a mapping as the section."""
    if isinstance(value, Mapping):
        return dict(value)
    return {key: value}


def fit(
    model: nn.Module,
    data: Any,
    *,
    loss: str | LossFn | None = None,
    optimizer: str | Mapping[str, Any] = "adam",
    lr: float | Mapping[str, Any] = 1e-3,
    epochs: float | None = None,
    batch_size: int | Mapping[str, Any] = 32,
    validation_data: Any = None,
    metrics: list[str | MetricFn] | None = None,
    strategy: Strategy | str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    verbose: bool = True,
) -> History:
    """Train `model` on `data` with an explicit strategy; returns a `History`.

    Without `strategy`, the strategy is built from the Keras-style arguments (constant LR,
    fixed batch). Evaluation (and a History entry) happens once per epoch, on the whole
    `validation_data`.

    Example:
        >>> import torch
        >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> h = fit(torch.nn.Linear(3, 2), (x, y), loss="cross_entropy", epochs=2, batch_size=16, verbose=False)
        >>> len(h.history["loss"])
        2
    """
    train = _samples(data)
    val = _samples(validation_data) if validation_data is not None else None
    streaming = isinstance(train, BatchStream)
    if isinstance(strategy, (str, Path)):
        strategy = Strategy.load(strategy)
    from_arguments = strategy is None
    if strategy is None:
        tree: dict[str, Any] = {
            "model": {"name": "python:module"},
            "data": {"source": "python"},
            "optimizer": _table(optimizer, "name"),
            "lr": {"schedule": "constant", "scale_with_batch": "none"} | (dict(lr) if isinstance(lr, Mapping) else {}),
            "batch": {"size": 1} if streaming else _table(batch_size, "size"),
            "train": {"epochs": float(epochs if epochs is not None else 1), "clip": 0.0, "eval_samples": 0},
            "observe": {"progress": "auto" if verbose else "none"},
        }
        if not isinstance(lr, Mapping):
            tree["optimizer"]["lr"] = float(lr)
        strategy = Strategy.from_dict(tree)
    if overrides:
        strategy = strategy.replace(dict(overrides))
    if from_arguments and "train.eval_every" not in (overrides or {}) and strategy.batch.schedule == "fixed":
        # Evaluate once per epoch, Keras's rhythm.
        steps_per_epoch = max(1, math.ceil(len(train) / strategy.batch.size))
        strategy = strategy.replace({"train.eval_every": steps_per_epoch, "train.log_every": steps_per_epoch})
    task = Task(model, TaskData(train, val), loss=resolve_loss(loss), metrics=resolve_metrics(metrics))
    history = History(model=model)
    Trainer(strategy, task, run_dir, callbacks=[history.record]).fit()
    return history
