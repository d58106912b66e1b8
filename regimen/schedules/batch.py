"""Batch-size schedules: the global batch (in samples) as a function of progress.

Every schedule returns a multiple of `multiple` (the caller passes micro-batch x world size,
so that each rank's share splits into whole micro-batches of one shape) and at least
`multiple`. All but `AdaptiveBatch` are pure functions of `Progress` (and the seed), so a
resumed run recomputes them; `AdaptiveBatch` follows a measured noise scale and carries its
small state in `state_dict()`.

Every schedule has the same interface (`__call__`, `observe`, `state_dict`,
`load_state_dict`), so the trainer calls them all the same way.

Example:
    >>> ramp = RampBatch(64, start=16, span=100, multiple=8)
    >>> ramp(Progress(step=0)), ramp(Progress(step=50)), ramp(Progress(step=1000))
    (16, 40, 64)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from regimen.errors import UserError
from regimen.progress import Progress, Unit
from regimen.registry import BATCH_SCHEDULES
from regimen.schedules.lr import constant, join, linear

if TYPE_CHECKING:
    from regimen.strategy import BatchConfig

__all__ = [
    "AdaptiveBatch",
    "BatchSchedule",
    "FixedBatch",
    "FullBatch",
    "RampBatch",
    "RandomBatch",
    "budget_reached",
    "build_batch_schedule",
    "simulate_budget",
]

# Mixed into RandomBatch's seed so that its draws are independent of any other stream that
# is also seeded from (seed, step), such as the data order.
_RANDOM_BATCH_STREAM = 0xBA7C5


def _round(size: float, multiple: int) -> int:
    """The nearest multiple of `multiple` (halves round up, unlike `round`), at least `multiple`."""
    return max(multiple, math.floor(size / multiple + 0.5) * multiple)


def _round_down(size: float, multiple: int) -> int:
    return max(multiple, math.floor(size / multiple) * multiple)


def _round_up(size: float, multiple: int) -> int:
    return max(multiple, math.ceil(size / multiple) * multiple)


def _check_multiple(multiple: int) -> None:
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1 (micro-batch x world size), got {multiple}")


def _warn_if_rounded(key: str, sizes: Sequence[int], multiple: int) -> None:
    """Say so when a configured size is not what will run (a setting silently changed is a bug)."""
    odd = [s for s in sizes if s % multiple or s < multiple]
    if odd:
        warnings.warn(
            f"batch.{key}: {odd} rounded to multiples of {multiple} (micro-batch x world size)",
            stacklevel=3,
        )


class BatchSchedule:
    """The global batch size in samples at a given progress; the base of every batch schedule.

    Stateless schedules keep the defaults: `observe` does nothing and the state is empty.

    >>> FixedBatch(32)(Progress(step=7))
    32
    """

    @classmethod
    def from_config(cls, cfg: BatchConfig, *, seed: int, multiple: int, dataset_size: int | None) -> BatchSchedule:
        """The schedule a `[batch]` section describes (`build_batch_schedule` calls this for its name)."""
        raise NotImplementedError

    def __call__(self, progress: Progress) -> int:
        raise NotImplementedError

    def wants_noise(self, progress: Progress) -> bool:
        """Whether `observe` would use a noise scale now (reading one syncs host and device)."""
        return False

    def largest(self) -> int:
        """The largest batch this schedule can give (checked against the training set before training)."""
        raise NotImplementedError

    def observe(self, progress: Progress, noise_scale: float | None) -> None:
        """Called by the trainer after every step; only `AdaptiveBatch` uses it."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume identically (nothing, for pure schedules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class FixedBatch(BatchSchedule):
    """The same global batch at every step.

    >>> FixedBatch(64, multiple=8)(Progress(step=123))
    64
    """

    @classmethod
    def from_config(cls, cfg: BatchConfig, *, seed: int, multiple: int, dataset_size: int | None) -> BatchSchedule:
        return cls(cfg.size, multiple)

    def __init__(self, size: int, multiple: int = 1) -> None:
        _check_multiple(multiple)
        _warn_if_rounded("size", [size], multiple)
        self.size = _round(size, multiple)

    def __call__(self, progress: Progress) -> int:
        return self.size

    def largest(self) -> int:
        return self.size


class FullBatch(BatchSchedule):
    """The whole training set each step (full-batch gradient descent), rounded DOWN to `multiple`.

    Rounding down rather than up keeps every step an exact mean over distinct samples: rounding
    up would have to count some samples twice, weighting them double in the gradient. Equal
    shares per rank keep each rank's mean a valid piece of the global mean. The data stream
    chooses which (fewer than `multiple`) samples sit out each step; the micro-batches then
    accumulate the rest.

    >>> FullBatch(1000, multiple=16)(Progress())
    992
    """

    @classmethod
    def from_config(cls, cfg: BatchConfig, *, seed: int, multiple: int, dataset_size: int | None) -> BatchSchedule:
        if dataset_size is None:
            raise UserError("batch.schedule = 'full': needs a training set of known size")
        return cls(dataset_size, multiple)

    def __init__(self, dataset_size: int, multiple: int = 1) -> None:
        _check_multiple(multiple)
        if dataset_size < multiple:
            raise UserError(
                f"batch.schedule = 'full': the training set ({dataset_size} samples) is smaller than "
                f"one micro-batch on each rank ({multiple} samples); lower batch.micro or the number of processes"
            )
        self.size = _round_down(dataset_size, multiple)

    def __call__(self, progress: Progress) -> int:
        return self.size

    def largest(self) -> int:
        return self.size


class RandomBatch(BatchSchedule):
    """A batch drawn at each step from a distribution seeded by `(seed, step)` alone.

    Either uniform over the multiples of `multiple` in `[min, max]`, or one of `choices` with
    probabilities `probs` (uniform when empty). Each draw comes from a fresh generator seeded
    with `SeedSequence([seed, stream, step])`, not from a running stream, so step 1000 draws
    the same size whether the run started at 0 or resumed at 999.

    >>> b = RandomBatch(seed=0, min=8, max=64, multiple=8)
    >>> b(Progress(step=5)) == RandomBatch(seed=0, min=8, max=64, multiple=8)(Progress(step=5))
    True
    """

    @classmethod
    def from_config(cls, cfg: BatchConfig, *, seed: int, multiple: int, dataset_size: int | None) -> BatchSchedule:
        return cls(seed=seed, min=cfg.min, max=cfg.max, choices=cfg.choices, probs=cfg.probs, multiple=multiple)

    def __init__(
        self,
        *,
        seed: int,
        min: int | None = None,
        max: int | None = None,
        choices: Sequence[int] = (),
        probs: Sequence[float] = (),
        multiple: int = 1,
    ) -> None:
        _check_multiple(multiple)
        # SeedSequence takes non-negative integers; fold negative seeds into 64 bits.
        self.seed = seed & 0xFFFF_FFFF_FFFF_FFFF
        self.multiple = multiple
        if choices:
            _warn_if_rounded("choices", list(choices), multiple)
            self.sizes = np.array([_round(c, multiple) for c in choices], dtype=np.int64)
            self.probs = np.asarray(probs, dtype=np.float64) if len(probs) else None
            if self.probs is not None and len(self.probs) != len(self.sizes):
                raise UserError(f"batch.probs = {list(probs)}: one probability per choice ({len(self.sizes)})")
            self.lo = self.hi = 0
        else:
            if min is None or max is None:
                raise UserError("batch.schedule = 'random': needs batch.min and batch.max, or batch.choices")
            self.lo, self.hi = _round_up(min, multiple), math.floor(max / multiple) * multiple
            if self.lo > self.hi:
                raise UserError(f"batch.min = {min}, batch.max = {max}: no multiple of {multiple} (micro-batch x world size) in between")
            self.sizes = np.zeros(0, dtype=np.int64)
            self.probs = None

    def __call__(self, progress: Progress) -> int:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _RANDOM_BATCH_STREAM, progress.step]))
        if len(self.sizes):
            return int(rng.choice(self.sizes, p=self.probs))
        m = self.multiple
        return int(rng.integers(self.lo // m, self.hi // m, endpoint=True)) * m

    def largest(self) -> int:
        return int(self.sizes.max()) if len(self.sizes) else self.hi


class RampBatch(BatchSchedule):
    """A batch that grows with progress counted in `unit`: linearly, or by a table of stages.

    Linear: from `start` to `size` over `span`, then `size`. Stages: `[{until, size}, ...]`,
    each size applying while `progress < until`, and `size` after the last stage. Progress is
    read as an exact count (`progress.value(unit)`), so each stage ends exactly at its `until`.

    >>> ramp = RampBatch(64, stages=[{"until": 100, "size": 16}], unit="samples")
    >>> ramp(Progress(samples=99)), ramp(Progress(samples=100))
    (16, 64)
    """

    @classmethod
    def from_config(cls, cfg: BatchConfig, *, seed: int, multiple: int, dataset_size: int | None) -> BatchSchedule:
        return cls(cfg.size, start=cfg.start, span=cfg.span, stages=cfg.stages, unit=cfg.unit, multiple=multiple)

    def __init__(
        self,
        size: int,
        *,
        start: int | None = None,
        span: float | None = None,
        stages: Sequence[Mapping[str, float]] = (),
        unit: Unit = "steps",
        multiple: int = 1,
    ) -> None:
        _check_multiple(multiple)
        self.size, self.unit, self.multiple = size, unit, multiple
        self.start, self.span = start, span
        self.stages = [(float(s["until"]), _round(s["size"], multiple)) for s in stages]
        _warn_if_rounded("size", [size], multiple)
        _warn_if_rounded("stages", [int(s["size"]) for s in stages], multiple)
        if not stages and start is not None:
            _warn_if_rounded("start", [start], multiple)
        if not self.stages and (start is None or span is None or span <= 0):
            raise UserError("batch.schedule = 'ramp': needs batch.start and batch.span > 0, or batch.stages")

        # The same pieces as the LR schedules: a straight line, or constants joined at the stages.
        if self.stages:
            sizes = [constant(size) for _, size in self.stages] + [constant(_round(size, multiple))]
            self.curve = join(sizes, [until for until, _ in self.stages])
        else:
            assert start is not None and span is not None
            self.curve = linear(start, size, span)

    def __call__(self, progress: Progress) -> int:
        return _round(self.curve(progress.value(self.unit)), self.multiple)

    def largest(self) -> int:
        ends = [size for _, size in self.stages] + [self.size] + ([self.start] if self.start is not None and not self.stages else [])
        return max(_round(size, self.multiple) for size in ends)


class AdaptiveBatch(BatchSchedule):
    """A batch that follows the measured gradient noise scale (the critical batch size).

    After each step the trainer calls `observe(progress, noise_scale)` with the progress after
    that step and the noise scale in samples (None when not measured; None and non-finite or
    non-positive values are ignored). At most once every `every` steps the batch moves toward
    the noise scale, by at most a factor `max_growth` either way, clipped to `[min, max]` and
    rounded to `multiple`. The first move can happen at step `every`: the early estimates are
    the noisiest.

    Defaults: `min = size` (the critical batch size grows as the loss falls, McCandlish et al.
    2018, and early estimates are noisy, so the batch never drops below where it started) and
    `max = 64 * size` (six doublings at the default growth).

    It is the one stateful schedule: `state_dict()` holds the current size and the step of the
    last change, which is all a resumed run needs to continue identically.

    >>> b = AdaptiveBatch(32, every=10, max_growth=2.0, multiple=8)
    >>> b.observe(Progress(step=10), noise_scale=1000.0)
    >>> b(Progress(step=10))
    64
    """

    @classmethod
    def from_config(cls, cfg: BatchConfig, *, seed: int, multiple: int, dataset_size: int | None) -> BatchSchedule:
        # A batch larger than the training set only repeats samples: the default max stops there.
        hi = cfg.max
        if hi is None and dataset_size is not None:
            hi = max(min(64 * cfg.size, dataset_size), cfg.min or cfg.size)
        return cls(cfg.size, min=cfg.min, max=hi, every=cfg.every, max_growth=cfg.max_growth, multiple=multiple)

    def __init__(
        self,
        size: int,
        *,
        min: int | None = None,
        max: int | None = None,
        every: int = 50,
        max_growth: float = 2.0,
        multiple: int = 1,
    ) -> None:
        _check_multiple(multiple)
        if every < 1:
            raise UserError(f"batch.every = {every}: must be >= 1")
        if max_growth < 1.0:
            raise UserError(f"batch.max_growth = {max_growth}: must be >= 1")
        lo = size if min is None else min
        hi = 64 * size if max is None else max
        # Round the bounds inward so that clipping never leaves [min, max] or the multiples.
        self.lo, self.hi = _round_up(lo, multiple), _round_down(hi, multiple)
        if self.lo > self.hi:
            raise UserError(f"batch.min = {lo}, batch.max = {hi}: no multiple of {multiple} (micro-batch x world size) in between")
        self.every, self.max_growth, self.multiple = every, max_growth, multiple
        self.size = self._clip(size)
        self.last_change = 0

    def _clip(self, size: float) -> int:
        return min(max(_round(size, self.multiple), self.lo), self.hi)

    def largest(self) -> int:
        return self.hi

    def __call__(self, progress: Progress) -> int:
        return self.size

    def wants_noise(self, progress: Progress) -> bool:
        return progress.step - self.last_change >= self.every

    def observe(self, progress: Progress, noise_scale: float | None) -> None:
        """Move the batch toward `noise_scale` (samples) if `every` steps passed since the last change."""
        if noise_scale is None or not math.isfinite(noise_scale) or noise_scale <= 0:
            return
        if progress.step - self.last_change < self.every:
            return
        # The multiples reachable in one move: within a factor max_growth of the current size
        # and inside [min, max]. The current size is always among them.
        m = self.multiple
        lowest = max(self.lo, _round_up(self.size / self.max_growth, m))
        highest = min(self.hi, _round_down(self.size * self.max_growth, m))
        new = min(max(_round(noise_scale, m), lowest), highest)
        if new != self.size:
            self.size, self.last_change = new, progress.step

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "last_change": self.last_change}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.size, self.last_change = int(state["size"]), int(state["last_change"])


def build_batch_schedule(cfg: BatchConfig, *, seed: int, multiple: int, dataset_size: int | None) -> BatchSchedule:
    """The `[batch]` schedule, rounding to `multiple` (= micro-batch x world size).

    `dataset_size` (training samples) is needed by `full`; when known it also caps the default
    `max` of `adaptive`, since a batch larger than the training set only repeats samples.

    >>> from regimen.strategy import BatchConfig
    >>> build_batch_schedule(BatchConfig(size=64), seed=0, multiple=8, dataset_size=None)(Progress())
    64
    """
    _check_multiple(multiple)
    schedule: type[BatchSchedule] = BATCH_SCHEDULES[cfg.schedule].load()
    return schedule.from_config(cfg, seed=seed, multiple=multiple, dataset_size=dataset_size)


def budget_reached(progress: Progress, budget_unit: Unit, amount: float) -> bool:
    """Whether training with a budget of `amount` in `budget_unit` is done (epochs: convert to samples first).

    >>> budget_reached(Progress(step=3, samples=96), "samples", 96)
    True
    """
    return progress.value(budget_unit) >= amount


def simulate_budget(schedule: BatchSchedule, budget_unit: Unit, amount: float, target_unit: Unit, tokens_per_sample: int) -> float:
    """A budget of `amount` in `budget_unit` expressed in `target_unit`, by running the batch schedule.

    The answer is the progress (in `target_unit`) at which a run with that budget stops: the
    first step boundary where `budget_reached` holds, so 1000 samples at 32 a step is 32 steps
    (1024 samples). Used to give the LR schedule its total in its own unit.
    `AdaptiveBatch` depends on measurements, not on progress alone, so it cannot be simulated.

    >>> simulate_budget(FixedBatch(32), "steps", 1000, "samples", tokens_per_sample=64)
    32000.0
    """
    if budget_unit == target_unit:
        return float(amount)
    if isinstance(schedule, AdaptiveBatch):
        raise UserError(
            "batch.schedule = 'adaptive': the batch follows measurements, so a budget cannot be converted "
            f"from {budget_unit} to {target_unit}; give train.{target_unit} (same unit as lr.unit), or count in samples or tokens"
        )
    if tokens_per_sample < 1 and "tokens" in (budget_unit, target_unit):
        raise ValueError(f"tokens_per_sample must be >= 1 to count tokens, got {tokens_per_sample}")
    if isinstance(schedule, (FixedBatch, FullBatch)):
        # A constant batch: jump to the last step rather than walk there.
        per_step = Progress().advanced(schedule.size, tokens_per_sample).value(budget_unit)
        steps = max(0, math.ceil(amount / per_step))
        return Progress(steps, steps * schedule.size, steps * schedule.size * tokens_per_sample).value(target_unit)
    progress = Progress()
    while not budget_reached(progress, budget_unit, amount):
        progress = progress.advanced(schedule(progress), tokens_per_sample)
    return progress.value(target_unit)
