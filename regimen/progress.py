"""Training progress: the clock every schedule reads.

Every schedule (learning rate, batch size, warmup) and the order of the data are pure functions
of these counters and the seed, which is what makes a resumed run identical to an
uninterrupted one.

Example:
    >>> p = Progress().advanced(batch=32, tokens_per_sample=64)
    >>> p.step, p.samples, p.tokens, p.value("samples")
    (1, 32, 2048, 32.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Unit = Literal["steps", "samples", "tokens"]


@dataclass(frozen=True)
class Progress:
    """Optimizer steps taken, samples and tokens consumed so far."""

    step: int = 0
    samples: int = 0
    tokens: int = 0

    def value(self, unit: Unit) -> float:
        """The counter that `unit` names, as a float (what schedules take)."""
        if unit == "steps":
            return float(self.step)
        if unit == "samples":
            return float(self.samples)
        if unit == "tokens":
            return float(self.tokens)
        raise AssertionError(f"unknown unit {unit!r}")

    def advanced(self, batch: int, tokens_per_sample: int) -> Progress:
        """The progress after one optimizer step on a global batch of `batch` samples."""
        return Progress(self.step + 1, self.samples + batch, self.tokens + batch * tokens_per_sample)
