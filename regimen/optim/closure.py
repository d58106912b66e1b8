"""The closure of `Optimizer.step(closure)`, evaluated the way torch's optimizers do.

Example:
    >>> evaluate_closure(None) is None
    True
    >>> evaluate_closure(lambda: 1.5)
    1.5
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss `closure` returns, computed with autograd on (a step itself runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
