"""Schedules: the learning rate and the batch size as functions of training progress.

See `regimen.schedules.lr` (LR pieces, `join`, `build_lr_schedule`, `lr_batch_scale`) and
`regimen.schedules.batch` (batch-size schedules, `build_batch_schedule`, `simulate_budget`).

Example:
    >>> from regimen.schedules import cosine, join, linear
    >>> join([linear(0.0, 1.0, 10), cosine(1.0, 0.0, 90)], [10])(5)
    0.5
"""

from regimen.schedules.batch import (
    AdaptiveBatch,
    BatchSchedule,
    FixedBatch,
    FullBatch,
    RampBatch,
    RandomBatch,
    budget_reached,
    build_batch_schedule,
    simulate_budget,
)
from regimen.schedules.lr import (
    Schedule,
    build_lr_multiplier,
    build_lr_schedule,
    constant,
    cosine,
    exponential,
    inverse_sqrt,
    join,
    linear,
    lr_batch_scale,
    multistep,
    one_minus_sqrt,
    polynomial,
    step,
)

__all__ = [
    "AdaptiveBatch",
    "BatchSchedule",
    "FixedBatch",
    "FullBatch",
    "RampBatch",
    "RandomBatch",
    "Schedule",
    "budget_reached",
    "build_batch_schedule",
    "build_lr_multiplier",
    "build_lr_schedule",
    "constant",
    "cosine",
    "exponential",
    "inverse_sqrt",
    "join",
    "linear",
    "lr_batch_scale",
    "multistep",
    "one_minus_sqrt",
    "polynomial",
    "simulate_budget",
    "step",
]
