"""Learning-rate schedules: tables of hand-computed values, in every progress unit.

Unless a row says otherwise: peak 1.0, a budget of 100 steps, warmup 20 (so the decay spans 80),
min_lr 0.1. The numbers are written out (cos(pi/4) = 0.7071..., sqrt(0.1) = 0.3162...) rather
than recomputed with the formula under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from regimen.errors import UserError
from regimen.progress import Progress
from regimen.schedules import (
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
from regimen.strategy import LRConfig

# One step is BATCH samples of CONTEXT tokens: the same table in steps, samples and tokens.
BATCH, CONTEXT = 32, 16
UNIT_SCALE = {"steps": 1, "samples": BATCH, "tokens": BATCH * CONTEXT}

WARMUP_20 = [(0, 0.0), (5, 0.25), (10, 0.5), (20, 1.0)]

# (name, LRConfig keywords in steps, total in steps, [(step, expected lr)])
TABLES = [
    ("constant", dict(schedule="constant", warmup=20), 100, [*WARMUP_20, (50, 1.0), (100, 1.0), (150, 1.0)]),
    ("constant-no-warmup", dict(schedule="constant"), 100, [(0, 1.0), (100, 1.0)]),
    (
        "linear",
        dict(schedule="linear", warmup=20, min_lr=0.1),
        100,
        [*WARMUP_20, (40, 0.775), (60, 0.55), (80, 0.325), (100, 0.1), (130, 0.1)],
    ),
    (
        "polynomial-2",  # DESIGN: lr_0 (1 - t/T)^d with t, T counted after warmup
        dict(schedule="polynomial", warmup=20, power=2.0),
        100,
        [*WARMUP_20, (40, 0.5625), (60, 0.25), (80, 0.0625), (100, 0.0), (120, 0.0)],
    ),
    (
        "polynomial-2-no-warmup",
        dict(schedule="polynomial", power=2.0),
        100,
        [(0, 1.0), (50, 0.25), (90, 0.01), (100, 0.0)],
    ),
    (
        "polynomial-0.5-min",
        dict(schedule="polynomial", power=0.5, min_lr=0.1),
        100,
        [(0, 1.0), (75, 0.55), (96, 0.28), (100, 0.1)],  # sqrt(0.25) = 0.5, sqrt(0.04) = 0.2
    ),
    (
        "exponential-default-period",  # DESIGN: lr_0 gamma^(t/T_decay); T_decay = 80, no floor
        dict(schedule="exponential", warmup=20, gamma=0.1, min_lr=0.5),
        100,
        [*WARMUP_20, (40, 0.5623413251903491), (60, 0.31622776601683794), (100, 0.1), (180, 0.01)],
    ),
    (
        "exponential-period",
        dict(schedule="exponential", gamma=0.5, period=10),
        100,
        [(0, 1.0), (5, 0.7071067811865476), (10, 0.5), (30, 0.125)],
    ),
    (
        "step-period",  # counted from the end of warmup: drops at 40, 60, 80, 100
        dict(schedule="step", warmup=20, gamma=0.5, period=20),
        100,
        [*WARMUP_20, (39, 1.0), (40, 0.5), (59, 0.5), (60, 0.25), (99, 0.125), (100, 0.0625)],
    ),
    (
        "step-default-period",  # (100 - 20) / 3 = 26.67: drops after steps 46, 73 and at 100
        dict(schedule="step", warmup=20, gamma=0.5),
        100,
        [*WARMUP_20, (46, 1.0), (47, 0.5), (73, 0.5), (74, 0.25), (99, 0.25), (100, 0.125)],
    ),
    (
        "multistep",  # milestones in absolute progress
        dict(schedule="multistep", warmup=20, gamma=0.1, milestones=[30, 60]),
        100,
        [*WARMUP_20, (29, 1.0), (30, 0.1), (59, 0.1), (60, 0.01), (100, 0.01)],
    ),
    (
        "cosine",  # cos(pi/4) = 0.70710678: (1 + c)/2 = 0.85355339, (1 - c)/2 = 0.14644661
        dict(schedule="cosine", warmup=20, min_lr=0.1),
        100,
        [*WARMUP_20, (40, 0.8681980515339464), (60, 0.55), (80, 0.23180194846605362), (100, 0.1), (200, 0.1)],
    ),
    (
        "cosine-power-2",
        dict(schedule="cosine", warmup=20, min_lr=0.1, power=2.0),
        100,
        [*WARMUP_20, (40, 0.7556980515339463), (60, 0.325), (80, 0.11930194846605362), (100, 0.1)],
    ),
    (
        "cosine-no-warmup",
        dict(schedule="cosine"),
        100,
        [(0, 1.0), (25, 0.8535533905932737), (50, 0.5), (75, 0.14644660940672624), (100, 0.0)],
    ),
    (
        "wsd-linear",  # plateau until 80, linear decay over the last 20
        dict(schedule="wsd", warmup=20, min_lr=0.1, decay_fraction=0.2),
        100,
        [*WARMUP_20, (50, 1.0), (80, 1.0), (85, 0.775), (90, 0.55), (95, 0.325), (100, 0.1)],
    ),
    (
        "wsd-cosine",
        dict(schedule="wsd", warmup=20, min_lr=0.1, decay_fraction=0.2, decay_shape="cosine"),
        100,
        [*WARMUP_20, (80, 1.0), (85, 0.8681980515339464), (90, 0.55), (95, 0.23180194846605362), (100, 0.1)],
    ),
    (
        "wsd-1-sqrt",  # 1 - sqrt(1/4) = 0.5, 1 - sqrt(1/2) = 0.29289322
        dict(schedule="wsd", warmup=20, min_lr=0.1, decay_fraction=0.2, decay_shape="1-sqrt"),
        100,
        [*WARMUP_20, (80, 1.0), (85, 0.55), (90, 0.3636038969321072), (100, 0.1)],
    ),
    (
        "wsd-no-warmup",
        dict(schedule="wsd", decay_fraction=0.5),
        100,
        [(0, 1.0), (50, 1.0), (75, 0.5), (100, 0.0)],
    ),
    (
        "inverse_sqrt",  # timescale = warmup = 25: peak * sqrt(25 / t)
        dict(schedule="inverse_sqrt", warmup=25),
        1000,
        [(0, 0.0), (10, 0.4), (25, 1.0), (100, 0.5), (400, 0.25), (1000, 0.15811388300841897)],
    ),
    (
        "one_cycle-default-rise",  # rise over 0.3 * 100 = 30, from 1/25 = 0.04; end 0.04 / 1e4
        dict(schedule="one_cycle"),
        100,
        [(0, 0.04), (15, 0.52), (30, 1.0), (65, 0.500002), (100, 4e-6)],
    ),
    (
        "one_cycle-warmup",
        dict(schedule="one_cycle", warmup=20, div_factor=10.0, final_div_factor=100.0),
        100,
        [(0, 0.1), (10, 0.55), (20, 1.0), (60, 0.5005), (100, 1e-3)],
    ),
]


def _scaled(kwargs: dict, factor: int) -> dict:
    """The config with everything counted in progress multiplied by `factor`."""
    out = dict(kwargs)
    for key in ("warmup", "period"):
        if key in out:
            out[key] = out[key] * factor
    if "milestones" in out:
        out["milestones"] = [m * factor for m in out["milestones"]]
    return out


@pytest.mark.parametrize("unit", ["steps", "samples", "tokens"])
@pytest.mark.parametrize(("name", "kwargs", "total", "table"), TABLES, ids=[t[0] for t in TABLES])
def test_lr_table(name, kwargs, total, table, unit):
    factor = UNIT_SCALE[unit]
    cfg = LRConfig(**_scaled(kwargs, factor), unit=unit)
    cfg.validate()
    lr = build_lr_schedule(cfg, peak=1.0, total=total * factor)
    for k, expected in table:
        # The progress after k steps of a fixed batch, read in the schedule's unit.
        t = Progress(step=k, samples=k * BATCH, tokens=k * BATCH * CONTEXT).value(unit)
        assert lr(t) == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, unit, k)


def test_peak_scales_every_schedule():
    for _, kwargs, total, table in TABLES:
        lr = build_lr_schedule(LRConfig(**kwargs), peak=3e-4, total=total)
        if "min_lr" in kwargs:
            continue  # min_lr is absolute, not a fraction of the peak
        for k, expected in table:
            assert lr(k) == pytest.approx(3e-4 * expected, rel=1e-9, abs=1e-15)


def test_inverse_sqrt_without_warmup_uses_a_unit_timescale():
    lr = build_lr_schedule(LRConfig(schedule="inverse_sqrt"), peak=1.0, total=1000)
    assert [lr(t) for t in (0, 1, 4, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.1])


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_cosine_decays_never_rises(power):
    lr = build_lr_schedule(LRConfig(schedule="cosine", warmup=10, min_lr=0.01, power=power), peak=1.0, total=100)
    values = [lr(t) for t in range(10, 101)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.01)
    assert all(b < a for a, b in itertools.pairwise(values))


def test_warmup_is_continuous_into_every_schedule():
    for name in ("constant", "linear", "polynomial", "exponential", "step", "cosine", "wsd", "inverse_sqrt"):
        lr = build_lr_schedule(LRConfig(schedule=name, warmup=10), peak=2.0, total=100)
        assert lr(0) == 0.0 and lr(9) == pytest.approx(1.8) and lr(10) == pytest.approx(2.0), name


def test_one_cycle_matches_torch_over_its_whole_length():
    # torch's OneCycleLR(total_steps=N, pct_start=p) counts N LR values: its rise ends at
    # p*N - 1 and its fall at N - 1, i.e. our total = N - 1 and warmup = p*N - 1.
    for n, pct, div, final_div in ((101, 31 / 101, 25.0, 1e4), (250, 0.25, 10.0, 100.0)):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=0.5)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=0.5,
            total_steps=n,
            pct_start=pct,
            anneal_strategy="cos",
            div_factor=div,
            final_div_factor=final_div,
            cycle_momentum=False,
        )
        expected = []
        for i in range(n):
            expected.append(sched.get_last_lr()[0])
            opt.step()
            if i < n - 1:
                sched.step()
        cfg = LRConfig(schedule="one_cycle", warmup=pct * n - 1, div_factor=div, final_div_factor=final_div)
        lr = build_lr_schedule(cfg, peak=0.5, total=n - 1)
        assert [lr(i) for i in range(n)] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_pieces():
    assert constant(0.3)(1e9) == 0.3
    assert [linear(2.0, 0.0, 4)(t) for t in (-1, 0, 1, 4, 9)] == [2.0, 2.0, 1.5, 0.0, 0.0]
    assert polynomial(1.0, 0.0, 10, 3)(5) == 0.125
    assert exponential(1.0, 0.5, 2)(6) == 0.125
    assert [step(1.0, 0.5, 3)(t) for t in (0, 2.9, 3, 6)] == [1.0, 1.0, 0.5, 0.25]
    assert [multistep(1.0, 0.5, [2, 5])(t) for t in (1, 2, 4, 5, 100)] == [1.0, 0.5, 0.5, 0.25, 0.25]
    assert cosine(1.0, 0.0, 10)(0) == 1.0 and cosine(1.0, 0.0, 10)(10) == 0.0 and cosine(1.0, 0.0, 10)(20) == 0.0
    assert [inverse_sqrt(2.0, 4)(t) for t in (0, 4, 16, 64)] == [2.0, 2.0, 1.0, 0.5]
    assert [one_minus_sqrt(1.0, 0.0, 16)(t) for t in (0, 4, 16, 32)] == [1.0, 0.5, 0.0, 0.0]


def test_join_feeds_each_piece_time_since_its_boundary():
    seen = []

    def spy(t):
        seen.append(t)
        return t

    sched = join([constant(-1.0), spy, constant(7.0)], [10, 30])
    assert [sched(t) for t in (0, 9.5, 10, 25, 30, 99)] == [-1.0, -1.0, 0.0, 15.0, 7.0, 7.0]
    assert seen == [0.0, 15.0]
    with pytest.raises(ValueError):
        join([constant(1.0)], [5])
    with pytest.raises(ValueError):
        join([constant(1.0), constant(2.0), constant(3.0)], [5, 1])


def test_bad_combinations_are_user_errors():
    with pytest.raises(UserError, match=r"lr\.warmup"):
        build_lr_schedule(LRConfig(warmup=100), peak=1.0, total=100)
    with pytest.raises(UserError, match=r"lr\.milestones"):
        build_lr_schedule(LRConfig(schedule="multistep", warmup=20, milestones=[10, 50]), peak=1.0, total=100)
    with pytest.raises(UserError, match=r"lr\.decay_fraction"):
        build_lr_schedule(LRConfig(schedule="wsd", warmup=50, decay_fraction=0.6), peak=1.0, total=100)
    with pytest.raises(UserError, match="budget"):
        build_lr_schedule(LRConfig(), peak=1.0, total=0)


def test_lr_batch_scale():
    assert lr_batch_scale("none", 256, 32) == 1.0
    assert lr_batch_scale("linear", 256, 32) == 8.0
    assert lr_batch_scale("linear", 16, 32) == 0.5
    assert lr_batch_scale("sqrt", 128, 32) == 2.0
    assert lr_batch_scale("sqrt", 64, 32) == pytest.approx(math.sqrt(2))
    assert lr_batch_scale("sqrt", 8, 32) == 0.5
    with pytest.raises(UserError, match="scale_with_batch"):
        lr_batch_scale("auto", 64, 32)  # type: ignore[arg-type]
