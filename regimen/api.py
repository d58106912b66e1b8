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
any other key goes in `overrides={"train.clip": 0}`; a key given there always wins over what
`fit` derives (its once-per-epoch log and evaluation rhythm). Data is tensors `(x, y)`, a mapping
of tensors (batches are passed as keyword arguments, Hugging Face style), a map-style Dataset, a
Hugging Face `datasets.Dataset`, or an iterable of ready-made batches (then each batch is one
step and the batch schedule is the iterable's own).

Tokens: a sample of token ids (the `input_ids` of a mapping, or an integer `x` of shape
`(n, T)`) counts `T` tokens, so token budgets, `lr.unit = "tokens"`, batch ramps in tokens and
tokens/s are in real tokens; `tokens_per_sample=` says it for data without such a key.

Mistakes in the arguments are `rg.UserError`s naming the argument, raised before anything is
trained or written: the checks look at the arguments, the data's lengths, and one forward pass
of one sample (labels inside the model's outputs, an `mse` target of the output's shape).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from regimen.callbacks import EarlyStopping
from regimen.data import Samples, TaskData, as_samples, is_hf_dataset, tensor_names
from regimen.errors import UserError
from regimen.observe import loggers_on
from regimen.strategy import BUDGET_UNITS, Strategy
from regimen.task import LossFn, MetricFn, Task, _logits, cross_entropy, mse, resolve_loss, resolve_metrics
from regimen.trainer import Callback, Trainer, _to_device


class BatchStream:
    """Ready-made batches (a list, a DataLoader, any iterable) read as one "sample" each.

    A sequence is indexed (so its batches are shuffled like samples); any other iterable is
    cycled in its own order.
    """

    def __init__(self, batches: Iterable[Any], what: str = "data") -> None:
        self.batches = batches if isinstance(batches, Sequence) else None
        self.source = batches
        self.iterator = iter(batches)
        self.pending: list[Any] = []  # a batch read ahead by `first()`, served next
        self.n = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        if self.n == 0:
            raise UserError(f"{what}: the iterable of batches is empty")

    def first(self) -> Any:
        """The first batch, without consuming it."""
        if self.batches is not None:
            return self.batches[0]
        if not self.pending:
            self.pending.append(self.gather(np.zeros(1, dtype=np.int64)))
        return self.pending[0]

    def __len__(self) -> int:
        # An iterable without a length: one "epoch" is nominal; give steps= to fit.
        return self.n if self.n is not None else 1_000_000

    def gather(self, idx: np.ndarray) -> Any:
        assert len(idx) == 1, "batches from an iterable are taken one per step"
        if self.batches is not None:
            return self.batches[int(idx[0])]
        if self.pending:
            return self.pending.pop()
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.source)
            return next(self.iterator)


def _is_batch_iterable(data: Any) -> bool:
    if isinstance(data, (Dataset, Mapping)) or hasattr(data, "gather") or is_hf_dataset(data):
        return False
    if isinstance(data, (tuple, list)) and data and all(hasattr(t, "shape") for t in data):
        return False  # (x, y) tensors
    return isinstance(data, Iterable)


def _is_number_list(value: Any) -> bool:
    """A Python list (or tuple) of numbers, or of such lists: data typed out, not tensors."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, (numbers.Number, str))


def _refuse_lists(data: Any, what: str) -> None:
    """Python lists where tensors belong: one line saying which, before anything is built."""
    hint = "pass tensors, e.g. torch.tensor(...) (or numpy arrays)"
    if isinstance(data, Mapping):
        for key, value in data.items():
            if isinstance(value, (list, tuple)):
                raise UserError(f"{what}: {key!r} is a Python {type(value).__name__}; {hint}")
    elif isinstance(data, (list, tuple)) and data:
        if not isinstance(data[0], (list, tuple)) and _is_number_list(data):
            raise UserError(f"{what} is a Python {type(data).__name__} of numbers; {hint}")
        names = tensor_names(data) if len(data) <= 3 else [f"element {i}" for i in range(len(data))]
        for name, value in zip(names, data):
            if isinstance(value, (list, tuple)) and _is_number_list(value):
                raise UserError(f"{what}: {name} is a Python {type(value).__name__}; {hint}")


# An iterable of ready-made batches (a DataLoader) with at most this many is read into a list once,
# so its batches can be shuffled like samples; a longer one is cycled in its own order (a list of
# that many batches would hold the whole dataset in memory a second time).
MATERIALIZE_BATCHES = 10_000


def _samples(data: Any, what: str) -> Samples:
    _refuse_lists(data, what)
    if _is_batch_iterable(data):
        if not isinstance(data, Sequence) and hasattr(data, "__len__") and len(data) < MATERIALIZE_BATCHES:
            data = list(data)
        return BatchStream(data, what)
    samples = as_samples(data, what)
    if len(samples) == 0:
        raise UserError(f"{what} is empty (0 samples); fit needs at least one")
    return samples


@dataclass
class History:
    """Keras's History: `history["val_loss"]` is a list with one value per evaluation.

    `rows` are the logged rows as they are; `summary` is the run's summary (`stopped_early`
    holds the step and the reason when a callback ended the run).
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None
    summary: dict[str, Any] = field(default_factory=dict)

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
    callbacks: Sequence[Callback] | None = None,
    tokens_per_sample: int | None = None,
    strategy: Strategy | str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    verbose: bool = True,
) -> History:
    """Train `model` on `data` with an explicit strategy; returns a `History`.

    Without `strategy`, the strategy is built from the Keras-style arguments (constant LR,
    fixed batch). Evaluation (and a History entry) happens once per epoch, on the whole
    `validation_data`, unless `overrides` set `train.eval_every` / `train.log_every`.
    `callbacks` get every logged row (after the History); `rg.EarlyStopping` or any callback
    raising `rg.StopTraining` ends the run after that step. `tokens_per_sample` counts the
    tokens of a sample where the data has no `input_ids` or integer `x` of shape (n, T).

    Example:
        >>> import torch
        >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> h = fit(torch.nn.Linear(3, 2), (x, y), loss="cross_entropy", epochs=2, batch_size=16, verbose=False)
        >>> len(h.history["loss"])
        2
    """
    _check_arguments(lr=lr, batch_size=batch_size, epochs=epochs, tokens_per_sample=tokens_per_sample, callbacks=callbacks)
    train = _samples(data, "data")
    val = _samples(validation_data, "validation_data") if validation_data is not None else None
    streaming = isinstance(train, BatchStream)
    if isinstance(strategy, (str, Path)):
        strategy = Strategy.load(strategy)
    given = dict(overrides or {})
    from_arguments = strategy is None
    if strategy is None:
        budget_given = any(f"train.{unit}" in given for unit in BUDGET_UNITS)
        tree: dict[str, Any] = {
            "optimizer": _table(optimizer, "name"),
            "lr": {"schedule": "constant", "scale_with_batch": "none"} | (dict(lr) if isinstance(lr, Mapping) else {}),
            "batch": {"size": 1} if streaming else _table(batch_size if isinstance(batch_size, Mapping) else int(batch_size), "size"),
            "train": {"clip": 0.0, "eval_samples": 0} | ({} if epochs is None and budget_given else {"epochs": float(epochs or 1)}),
            "observe": {"progress": "auto" if verbose else "none"},
        }
        if not isinstance(lr, Mapping):
            tree["optimizer"]["lr"] = float(lr)
        strategy = Strategy.for_python(tree)
    if given:
        strategy = strategy.replace(given)
    if from_arguments and strategy.batch.schedule == "fixed":
        # Log and evaluate once per epoch, Keras's rhythm, for each key the user did not give.
        steps_per_epoch = max(1, math.ceil(len(train) / strategy.batch.size))
        rhythm = {key: steps_per_epoch for key in ("train.eval_every", "train.log_every") if key not in given}
        strategy = strategy.replace(rhythm) if rhythm else strategy
    if not streaming and strategy.batch.schedule != "full" and strategy.batch.size > len(train):
        key = "batch_size" if from_arguments and "batch.size" not in given else "batch.size"
        raise UserError(f"{key} = {strategy.batch.size}: larger than the {len(train)} samples of data; use at most {len(train)}")
    on = loggers_on(strategy.observe)
    if on and run_dir is None:
        raise UserError(f"observe.{on[0]} = true logs beside a run directory: pass run_dir= to fit")
    loss_fn, metric_fns = resolve_loss(loss), resolve_metrics(metrics)
    callbacks = list(callbacks or [])
    _check_monitors(callbacks, val is not None, metric_fns)
    first = train.first() if isinstance(train, BatchStream) else train.gather(np.zeros(1, dtype=np.int64))
    _check_targets(model, first, data, loss_fn, "data")
    if val is not None:
        val_first = val.first() if isinstance(val, BatchStream) else val.gather(np.zeros(1, dtype=np.int64))
        _check_targets(model, val_first, validation_data, loss_fn, "validation_data")
    tokens = int(tokens_per_sample) if tokens_per_sample is not None else _tokens_in(first)
    for callback in callbacks:
        if hasattr(callback, "set_model"):
            callback.set_model(model)
    task = Task(model, TaskData(train, val, tokens_per_sample=tokens), loss=loss_fn, metrics=metric_fns)
    history = History(model=model)
    result = Trainer(strategy, task, run_dir, callbacks=[history.record, *callbacks]).fit()
    history.summary = result.summary
    return history


# ---- the checks behind fit's one-line errors ---------------------------------------------------


def _positive_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)) and float(value) > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def _check_arguments(*, lr: Any, batch_size: Any, epochs: Any, tokens_per_sample: Any, callbacks: Sequence[Callback] | None) -> None:
    if not isinstance(lr, Mapping) and not _positive_number(lr):
        raise UserError(f"lr = {lr!r}: expected a positive number (e.g. 1e-3) or a mapping shaped like the [lr] table")
    if not isinstance(batch_size, Mapping) and not _positive_int(batch_size):
        raise UserError(f"batch_size = {batch_size!r}: expected a positive integer or a mapping shaped like the [batch] table")
    if epochs is not None and not _positive_number(epochs):
        raise UserError(f"epochs = {epochs!r}: expected a positive number")
    if tokens_per_sample is not None and not _positive_int(tokens_per_sample):
        raise UserError(f"tokens_per_sample = {tokens_per_sample!r}: expected a positive integer")
    if callbacks is not None:
        if not isinstance(callbacks, Sequence):
            raise UserError(f"callbacks = {callbacks!r}: expected a list of callables, each taking a logged row")
        for i, callback in enumerate(callbacks):
            if not callable(callback):
                raise UserError(f"callbacks[{i}] = {callback!r}: not callable; a callback takes each logged row (a dict)")


def _check_monitors(callbacks: list[Callback], validates: bool, metrics: Mapping[str, MetricFn]) -> None:
    """An EarlyStopping on a `val_` value that no row will hold would never stop: say so now."""
    for callback in callbacks:
        if not isinstance(callback, EarlyStopping) or not callback.monitor.startswith("val_"):
            continue
        if not validates:
            raise UserError(f"callbacks: EarlyStopping monitors {callback.monitor!r} but fit has no validation_data")
        name = callback.monitor.removeprefix("val_")
        if name != "loss" and name not in metrics:
            known = ", ".join(["val_loss", *(f"val_{m}" for m in metrics)])
            raise UserError(f"callbacks: EarlyStopping monitors {callback.monitor!r}, which no row holds; the rows have {known}")


def _split(batch: Any) -> tuple[Any, torch.Tensor | None, str]:
    """(the model's inputs, the target, what the user calls the target) of a batch."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}, batch.get("labels"), "labels"
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return tuple(batch[:-1]), batch[-1], tensor_names(batch)[-1]
    return batch, None, ""


def _tokens_in(first: Any) -> int:
    """Tokens per sample: the `input_ids` (or integer `x`) of the first batch, counted (1 without such ids).

    `first` is a batch of one sample, or, from an iterable of batches, a whole batch (then a
    "sample" of the trainer is that batch).
    """
    ids = first.get("input_ids") if isinstance(first, Mapping) else (first[0] if isinstance(first, (tuple, list)) else first)
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        return int(ids.numel())
    return 1


def _probe(model: nn.Module, inputs: Any) -> torch.Tensor | None:
    """The model's output on one batch: eval mode, no gradient, the RNG untouched; None if it fails.

    The training step will raise the model's own error if this forward fails: the checks that
    need the output then simply do not run.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            inputs = _to_device(inputs, device)
            return _logits(model(**inputs) if isinstance(inputs, Mapping) else model(*inputs))
    except Exception:
        return None
    finally:
        model.train(was_training)


def _all_labels(data: Any, first_target: torch.Tensor) -> torch.Tensor:
    """Every label when the data are tensors (a cheap max / min), else the first batch's."""
    if isinstance(data, Mapping) and isinstance(data.get("labels"), (torch.Tensor, np.ndarray)):
        return torch.as_tensor(data["labels"])
    if isinstance(data, (tuple, list)) and len(data) > 1 and isinstance(data[-1], (torch.Tensor, np.ndarray)):
        return torch.as_tensor(data[-1])
    return first_target


def _check_targets(model: nn.Module, first: Any, data: Any, loss: LossFn | None, what: str) -> None:
    """Class labels inside the model's outputs (cross-entropy, or a model's own loss on `labels`);
    an `mse` target with as many values per sample as the output."""
    inputs, target, name = _split(first)
    if not isinstance(target, torch.Tensor):
        return
    integer = not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
    classify = integer and (loss is cross_entropy or (loss is None and isinstance(first, Mapping)))
    if not (classify or loss is mse):
        return
    out = _probe(model, inputs)
    if out is None:
        return
    if classify:
        classes = out.shape[-1]
        labels = _all_labels(data, target)
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= classes))]
        if bad.numel():
            worst = int(bad.max()) if int(bad.max()) >= classes else int(bad.min())
            raise UserError(
                f"{what}: {name} holds label {worst}, outside the model's {classes} outputs (allowed: 0..{classes - 1}, or -100 to ignore)"
            )
    elif out[0].numel() != target[0].numel():
        raise UserError(
            f"{what}: {name} has shape {tuple(target.shape[1:])} per sample but the model outputs {tuple(out.shape[1:])}; "
            "loss='mse' compares them value for value"
        )
