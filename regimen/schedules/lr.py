"""Learning-rate schedules: pure functions of progress, built from small pieces.

A `Schedule` maps progress `t` (a float, counted in one unit: steps, samples or tokens) to a
value. Pieces (`linear`, `cosine`, ...) start at `t = 0`; `join` glues them at boundaries and
hands each piece `t - boundary`, as optax's `join_schedules` does, so warmup-then-cosine is
literally a linear piece joined to a cosine piece. Pieces with a `span` hold their end value
for `t > span`, and every piece treats `t < 0` as `t = 0`.

`build_lr_schedule` turns an `[lr]` config into the absolute LR as a function of progress in
`cfg.unit`. Scaling with the batch size (`lr_batch_scale`) is a separate factor that the
trainer multiplies in, so the coupling between the two schedules stays explicit.

Example:
    >>> lr = join([linear(0.0, 1.0, 10), cosine(1.0, 0.0, 90)], [10])
    >>> lr(0), lr(5), lr(10), round(lr(55), 6), lr(100)
    (0.0, 0.5, 1.0, 0.5, 0.0)
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from regimen.errors import UserError
from regimen.registry import LR_SCHEDULES

if TYPE_CHECKING:
    from regimen.strategy import LRConfig

Schedule = Callable[[float], float]

__all__ = [
    "Schedule",
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
    "step",
]


def _fraction(t: float, span: float) -> float:
    """How far through `span` progress `t` is, clipped to [0, 1] (a zero span is already over)."""
    if span <= 0:
        return 1.0
    return min(max(t / span, 0.0), 1.0)


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def constant(value: float) -> Schedule:
    """The same value at every `t`.

    >>> constant(0.1)(1e9)
    0.1
    """
    return lambda t: value


def polynomial(start: float, end: float, span: float, power: float) -> Schedule:
    """`end + (start - end) * (1 - t/span)^power`: with `end = 0`, DESIGN's `lr_0 (1 - t/T)^d`.

    >>> polynomial(1.0, 0.0, 100, 2)(50)
    0.25
    """

    def schedule(t: float) -> float:
        return end + (start - end) * (1.0 - _fraction(t, span)) ** power

    return schedule


def linear(start: float, end: float, span: float) -> Schedule:
    """A straight line from `start` at `t = 0` to `end` at `t = span` (polynomial, power 1).

    >>> linear(0.0, 1.0, 10)(5)
    0.5
    """
    return polynomial(start, end, span, 1.0)


def exponential(start: float, gamma: float, period: float) -> Schedule:
    """`start * gamma^(t/period)`: multiplied by `gamma` every `period`, smoothly, with no floor.

    >>> exponential(1.0, 0.5, 10)(20)
    0.25
    """
    if not period > 0:
        raise ValueError(f"exponential needs a positive period, got {period}")

    def schedule(t: float) -> float:
        return start * gamma ** (max(t, 0.0) / period)

    return schedule


def step(start: float, gamma: float, period: float) -> Schedule:
    """`start * gamma^floor(t/period)`: multiplied by `gamma` at each whole period.

    >>> step(1.0, 0.5, 10)(9), step(1.0, 0.5, 10)(10)
    (1.0, 0.5)
    """
    if not period > 0:
        raise ValueError(f"step needs a positive period, got {period}")

    def schedule(t: float) -> float:
        return start * gamma ** math.floor(max(t, 0.0) / period)

    return schedule


def multistep(start: float, gamma: float, milestones: Sequence[float]) -> Schedule:
    """`start` multiplied by `gamma` once for each milestone `<= t` (torch's MultiStepLR).

    >>> multistep(1.0, 0.1, [10, 20])(15)
    0.1
    """
    marks = sorted(milestones)

    def schedule(t: float) -> float:
        return start * gamma ** bisect.bisect_right(marks, t)

    return schedule


def cosine(start: float, end: float, span: float, power: float = 1.0) -> Schedule:
    """`end + (start - end) * ((1 + cos(pi t/span)) / 2)^power`: decays from `start` to `end`.

    (Not `(1 - cos(t/span))^power`, the common slip, which rises instead of decaying.)

    >>> cosine(1.0, 0.0, 100)(50)
    0.5
    """

    def schedule(t: float) -> float:
        return end + (start - end) * ((1.0 + math.cos(math.pi * _fraction(t, span))) / 2.0) ** power

    return schedule


def inverse_sqrt(peak: float, timescale: float) -> Schedule:
    """`peak * sqrt(timescale / max(t, timescale))`: flat until `timescale`, then `~ 1/sqrt(t)`.

    >>> inverse_sqrt(1.0, 4)(2), inverse_sqrt(1.0, 4)(16)
    (1.0, 0.5)
    """
    if not timescale > 0:
        raise ValueError(f"inverse_sqrt needs a positive timescale, got {timescale}")

    def schedule(t: float) -> float:
        return peak * math.sqrt(timescale / max(t, timescale))

    return schedule


def one_minus_sqrt(start: float, end: float, span: float) -> Schedule:
    """`end + (start - end) * (1 - sqrt(t/span))`: the "1-sqrt" cooldown of WSD (Hägele et al. 2024).

    >>> one_minus_sqrt(1.0, 0.0, 100)(25)
    0.5
    """

    def schedule(t: float) -> float:
        return end + (start - end) * (1.0 - math.sqrt(_fraction(t, span)))

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[float]) -> Schedule:
    """Use `schedules[i]` from `boundaries[i-1]` on, fed `t - boundaries[i-1]` (optax's join_schedules).

    At a boundary the later piece takes over, so a warmup that ends at its peak and a decay
    that starts there meet without a jump.

    >>> warm_then_flat = join([linear(0.0, 1.0, 10), constant(1.0)], [10])
    >>> warm_then_flat(5), warm_then_flat(10), warm_then_flat(50)
    (0.5, 1.0, 1.0)
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"join needs one boundary fewer than schedules, got {len(schedules)} and {len(boundaries)}")
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"join boundaries must be increasing, got {list(boundaries)}")
    pieces = list(schedules)
    marks = list(boundaries)

    def schedule(t: float) -> float:
        i = bisect.bisect_right(marks, t)
        return pieces[i](t - marks[i - 1] if i > 0 else t)

    return schedule


def _shifted(schedule: Schedule, offset: float) -> Schedule:
    """`schedule` read `offset` further on: undoes join's shift for pieces defined in absolute `t`."""
    return lambda t: schedule(t + offset)


# --------------------------------------------------------------------------------------------
# From config
# --------------------------------------------------------------------------------------------


def build_lr_schedule(cfg: LRConfig, peak: float, total: float) -> Schedule:
    """The absolute LR (before batch-size scaling) as a function of progress counted in `cfg.unit`.

    `peak` is `optimizer.lr`; `total` is the training budget in `cfg.unit` (the caller converts
    with `simulate_budget` when the budget is given in another unit). Everything in `cfg`
    (`warmup`, `period`, `milestones`) is counted in `cfg.unit` too.

    Each schedule starts with a linear warmup from 0 to `peak` over `cfg.warmup`, joined to a
    decay that spans the rest, `total - warmup`:

    - `constant`: `peak`.
    - `linear`, `polynomial`: to `min_lr`, power 1 or `cfg.power`.
    - `cosine`: to `min_lr`, power `cfg.power`.
    - `exponential`: `peak * gamma^(t/period)`, `period` defaulting to `total - warmup` (so it
      ends at `peak * gamma`); no `min_lr` floor: exponential is exponential.
    - `step`: times `gamma` every `period`, counted from the end of warmup; without a period,
      `(total - warmup) / 3`, i.e. three drops, the last at `total`.
    - `multistep`: times `gamma` at each milestone, given in absolute progress (each must lie
      after the warmup).
    - `wsd`: warmup, a plateau at `peak`, then a decay over the last `decay_fraction` of
      `total` down to `min_lr`, shaped `linear`, `cosine` or `1-sqrt` (`cfg.decay_shape`).
    - `inverse_sqrt`: `peak * sqrt(s / max(t, s))` with timescale `s = warmup` (after a linear
      warmup over it), or `s = 1` unit without warmup.
    - `one_cycle`: torch's OneCycleLR (cosine annealing, two phases) in optax's convention:
      a cosine rise from `peak / div_factor` to `peak` over `warmup` (default `0.3 * total`),
      then a cosine fall to `peak / (div_factor * final_div_factor)` at `total`. Here the
      warmup *is* the rise, not an extra ramp from 0. torch's OneCycleLR(total_steps=N,
      pct_start=p) counts LR values rather than the span, and equals this with
      `total = N - 1` and `warmup = p * N - 1`.

    >>> from regimen.strategy import LRConfig
    >>> lr = build_lr_schedule(LRConfig(schedule="cosine", warmup=10, min_lr=0.1), peak=1.0, total=100)
    >>> lr(0), lr(5), lr(10), round(lr(55), 6), lr(100)
    (0.0, 0.5, 1.0, 0.55, 0.1)
    """
    if total <= 0:
        raise UserError(f"the training budget must be > 0 {cfg.unit}, got {total:g}")
    if cfg.warmup >= total:
        raise UserError(f"lr.warmup = {cfg.warmup:g}: must be shorter than the budget ({total:g} {cfg.unit})")
    builder: Callable[[LRConfig, float, float], Schedule] = LR_SCHEDULES[cfg.schedule].load()
    return builder(cfg, peak, total)


# The builders of the registry's schedules (regimen.registry.LR_SCHEDULES names them): each is a
# composition of the pieces above; most are a decay piece after the common linear warmup.


def lr_constant(cfg: LRConfig, peak: float, total: float) -> Schedule:
    return _with_warmup(constant(peak), peak, cfg.warmup)


def lr_linear(cfg: LRConfig, peak: float, total: float) -> Schedule:
    return _with_warmup(linear(peak, cfg.min_lr, total - cfg.warmup), peak, cfg.warmup)


def lr_polynomial(cfg: LRConfig, peak: float, total: float) -> Schedule:
    return _with_warmup(polynomial(peak, cfg.min_lr, total - cfg.warmup, cfg.power), peak, cfg.warmup)


def lr_cosine(cfg: LRConfig, peak: float, total: float) -> Schedule:
    return _with_warmup(cosine(peak, cfg.min_lr, total - cfg.warmup, cfg.power), peak, cfg.warmup)


def lr_exponential(cfg: LRConfig, peak: float, total: float) -> Schedule:
    period = cfg.period if cfg.period is not None else total - cfg.warmup
    return _with_warmup(exponential(peak, cfg.gamma, period), peak, cfg.warmup)


def lr_step(cfg: LRConfig, peak: float, total: float) -> Schedule:
    period = cfg.period if cfg.period is not None else (total - cfg.warmup) / 3.0
    return _with_warmup(step(peak, cfg.gamma, period), peak, cfg.warmup)


def lr_multistep(cfg: LRConfig, peak: float, total: float) -> Schedule:
    warmup = cfg.warmup
    if any(m <= warmup for m in cfg.milestones):
        raise UserError(f"lr.milestones = {list(cfg.milestones)}: each must come after lr.warmup ({warmup:g} {cfg.unit})")
    # Milestones are absolute progress; the piece after warmup sees t - warmup.
    return _with_warmup(multistep(peak, cfg.gamma, [m - warmup for m in cfg.milestones]), peak, warmup)


def lr_inverse_sqrt(cfg: LRConfig, peak: float, total: float) -> Schedule:
    if cfg.warmup == 0:
        # A timescale of one unit: right for steps; in samples or tokens, give a warmup.
        return inverse_sqrt(peak, 1.0)
    # The decay piece is defined in absolute t (peak * sqrt(warmup / t)), so undo join's shift.
    return join([linear(0.0, peak, cfg.warmup), _shifted(inverse_sqrt(peak, cfg.warmup), cfg.warmup)], [cfg.warmup])


def lr_wsd(cfg: LRConfig, peak: float, total: float) -> Schedule:
    cooldown = cfg.decay_fraction * total
    decay_start = total - cooldown
    if decay_start < cfg.warmup:
        raise UserError(
            f"lr.decay_fraction = {cfg.decay_fraction:g}: the decay ({cooldown:g} {cfg.unit}) "
            f"overlaps the warmup ({cfg.warmup:g} of {total:g} {cfg.unit})"
        )
    shapes: dict[str, Callable[[float, float, float], Schedule]] = {"linear": linear, "cosine": cosine, "1-sqrt": one_minus_sqrt}
    stable = join([constant(peak), shapes[cfg.decay_shape](peak, cfg.min_lr, cooldown)], [decay_start - cfg.warmup])
    return _with_warmup(stable, peak, cfg.warmup)


def lr_one_cycle(cfg: LRConfig, peak: float, total: float) -> Schedule:
    rise = cfg.warmup if cfg.warmup > 0 else 0.3 * total
    initial = peak / cfg.div_factor
    final = initial / cfg.final_div_factor
    # torch's anneal_strategy="cos" shapes both phases as half cosines, the rise included.
    return join([cosine(initial, peak, rise), cosine(peak, final, total - rise)], [rise])


def build_lr_multiplier(cfg: LRConfig, peak: float, total: float) -> Schedule:
    """The LR as a multiple of its peak `optimizer.lr`: `build_lr_schedule` with the peak at 1.

    The trainer scales each parameter group's own peak by this multiplier, so groups with
    different peaks keep their ratio. `min_lr` stays absolute (its multiple is `min_lr / peak`).

    >>> from regimen.strategy import LRConfig
    >>> lr = build_lr_multiplier(LRConfig(schedule="cosine", min_lr=0.01), peak=0.1, total=100)
    >>> lr(0), round(lr(50), 6), round(lr(100), 6)
    (1.0, 0.55, 0.1)
    """
    return build_lr_schedule(dataclasses.replace(cfg, min_lr=cfg.min_lr / peak), 1.0, total)


def _with_warmup(main: Schedule, peak: float, warmup: float) -> Schedule:
    if warmup <= 0:
        return main
    return join([linear(0.0, peak, warmup), main], [warmup])


def lr_batch_scale(rule: Literal["none", "linear", "sqrt"], batch: int, reference: int) -> float:
    """The LR multiplier for a global batch `batch` vs `reference`: 1, `B/B_ref` or `sqrt(B/B_ref)`.

    Linear for SGD-like methods (Goyal et al. 2017), sqrt for adaptive ones (Malladi et al. 2022).

    >>> lr_batch_scale("none", 64, 32), lr_batch_scale("linear", 64, 32), lr_batch_scale("sqrt", 128, 32)
    (1.0, 2.0, 2.0)
    """
    if rule == "none":
        return 1.0
    if rule == "linear":
        return batch / reference
    if rule == "sqrt":
        return math.sqrt(batch / reference)
    raise UserError(f"lr.scale_with_batch = {rule!r}: allowed: none, linear, sqrt (resolve 'auto' first)")
