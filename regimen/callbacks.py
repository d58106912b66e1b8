"""Callbacks for `rg.fit` and `Trainer`: functions of each logged row, as Keras users expect.

A callback is any callable that takes the row written to `metrics.jsonl` (a dict with `step`,
`loss`, `lr`, ... and `val_loss`, `val_<metric>` on evaluation rows). Raising
`StopTraining` ends the run after that step, cleanly: the final checkpoint, export and summary
are written as for a finished run. `EarlyStopping` is Keras's, counted in evaluations (one per
epoch under `rg.fit`'s default rhythm).

Example:
    >>> stop = EarlyStopping(monitor="val_loss", patience=1)
    >>> stop({"step": 10, "val_loss": 2.0}); stop({"step": 20, "val_loss": 2.1})
    Traceback (most recent call last):
    regimen.trainer.StopTraining: val_loss did not improve on 2 (step 10) for 1 evaluation
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from regimen.errors import UserError
from regimen.trainer import StopTraining


class EarlyStopping:
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` evaluations.

    Keras's rules: a value improves on the best so far when it is lower by more than
    `min_delta` (`mode="min"`) or higher by more than `min_delta` (`mode="max"`; `"auto"` is
    `max` for a name containing `acc`, else `min`); the run stops at the `patience`-th
    evaluation in a row that does not improve (Keras's count: `patience` 0 and 1 both stop at
    the first). Rows without `monitor` (log rows between evaluations) are ignored.
    `restore_best_weights=True` loads the best evaluation's weights back into the model when it
    stops the run (as Keras does; a run that ends on its budget keeps its last weights), so the
    final checkpoint and `model.safetensors` hold them. `rg.fit` gives it the model; with a
    `Trainer`, call `set_model(model)`.

    Example:
        >>> stop = EarlyStopping(monitor="val_accuracy", patience=3, min_delta=0.01)
        >>> for acc in (0.50, 0.60, 0.605, 0.61):
        ...     stop({"step": 1, "val_accuracy": acc})
        >>> stop.best, stop.wait
        (0.6, 2)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 0,
        min_delta: float = 0.0,
        mode: Literal["min", "max", "auto"] = "auto",
        restore_best_weights: bool = False,
    ) -> None:
        if mode not in ("min", "max", "auto"):
            raise UserError(f"EarlyStopping(mode={mode!r}): allowed: 'min', 'max', 'auto'")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise UserError(f"EarlyStopping(patience={patience!r}): must be an integer >= 0")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise UserError(f"EarlyStopping(min_delta={min_delta!r}): must be a number >= 0")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode if mode != "auto" else ("max" if "acc" in monitor else "min")
        self.restore_best_weights = restore_best_weights
        self.model: nn.Module | None = None
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.wait = 0
        self.stopped_step: int | None = None

    def set_model(self, model: nn.Module) -> None:
        """The model whose best weights are kept (`restore_best_weights`); `rg.fit` calls it."""
        self.model = model

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best so far by more than `min_delta`."""
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def __call__(self, row: dict[str, Any]) -> None:
        value = row.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.improves(value):
            self.best, self.best_step, self.wait = value, row.get("step"), 0
            if self.restore_best_weights:
                if self.model is None:
                    raise UserError(
                        "EarlyStopping(restore_best_weights=True) needs the model: pass it in rg.fit's callbacks, or call set_model"
                    )
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= max(self.patience, 1):
            self.stopped_step = row.get("step")
            if self.restore_best_weights and self.model is not None and self.best_weights is not None:
                self.model.load_state_dict(self.best_weights)
            plural = "s" if self.wait != 1 else ""
            raise StopTraining(
                f"{self.monitor} did not improve on {self.best:.6g} (step {self.best_step}) for {self.wait} evaluation{plural}"
            )
