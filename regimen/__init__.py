"""regimen: train neural networks with an explicit strategy.

A strategy is optimizer x learning-rate schedule x batch-size schedule x parallelism, written
as data (`Strategy`, TOML). regimen runs one, compares several on your model, and scales the
winner out with torch.distributed.

Example:
    >>> import regimen as rg
    >>> rg.Strategy.load(None, ["optimizer.name=sgd"]).optimizer.name
    'sgd'

The torch-dependent names (`fit`, `Trainer`, `GPT`, ...) are imported on first use, so that
`regimen --help` and config handling stay fast.
"""

from __future__ import annotations

from typing import Any

from regimen.errors import UserError
from regimen.progress import Progress
from regimen.strategy import Strategy

__version__ = "0.1.0"

_LAZY = {
    "fit": "regimen.api",
    "lr_find": "regimen.lr_find",
    "tune": "regimen.search.api",
    "History": "regimen.api",
    "EarlyStopping": "regimen.callbacks",
    "StopTraining": "regimen.trainer",
    "Trainer": "regimen.trainer",
    "RunResult": "regimen.trainer",
    "train": "regimen.trainer",
    "Task": "regimen.task",
    "build_task": "regimen.task",
    "GPT": "regimen.models",
    "GPTConfig": "regimen.models",
    "MLP": "regimen.models",
    "build_optimizer": "regimen.optim",
    "build_lr_schedule": "regimen.schedules",
    "build_batch_schedule": "regimen.schedules",
    "NoiseScaleEstimator": "regimen.noise",
}

__all__ = ["Progress", "Strategy", "UserError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regimen' has no attribute {name!r}")
