"""Batch-size schedules: reproducible, multiples of the rounding unit, exact at their boundaries."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from regimen.errors import UserError
from regimen.progress import Progress
from regimen.schedules import (
    AdaptiveBatch,
    FixedBatch,
    FullBatch,
    RampBatch,
    RandomBatch,
    budget_reached,
    build_batch_schedule,
    simulate_budget,
)
from regimen.strategy import BatchConfig

TOKENS_PER_SAMPLE = 16


def run(schedule, steps: int, start: Progress | None = None) -> list[tuple[Progress, int]]:
    """Step the schedule like the trainer does: the batch at each progress, then advance."""
    progress = start or Progress()
    out = []
    for _ in range(steps):
        b = schedule(progress)
        out.append((progress, b))
        progress = progress.advanced(b, TOKENS_PER_SAMPLE)
    return out


# ---- fixed and full ------------------------------------------------------------------------


def test_fixed():
    assert [FixedBatch(64, multiple=8)(Progress(step=s)) for s in (0, 1, 10_000)] == [64, 64, 64]
    with pytest.warns(UserWarning, match=r"batch\.size"):
        assert FixedBatch(30, multiple=8)(Progress()) == 32
    with pytest.warns(UserWarning):
        assert FixedBatch(3, multiple=8)(Progress()) == 8  # never below one multiple


def test_full_rounds_down_to_the_multiple():
    assert FullBatch(1000, multiple=16)(Progress()) == 992
    assert FullBatch(1000, multiple=8)(Progress()) == 1000
    assert FullBatch(1003, multiple=2)(Progress(step=5)) == 1002
    assert FullBatch(7, multiple=7)(Progress()) == 7
    with pytest.raises(UserError, match="smaller than"):
        FullBatch(5, multiple=8)


# ---- random --------------------------------------------------------------------------------


def test_random_is_a_pure_function_of_seed_and_step():
    fresh = RandomBatch(seed=3, min=8, max=64, multiple=8)
    in_sequence = RandomBatch(seed=3, min=8, max=64, multiple=8)
    from_zero = dict((p.step, b) for p, b in run(in_sequence, 201))
    # Resumed at step 100 with different sample counts: the draws depend on the step only.
    resumed = {p.step: b for p, b in run(fresh, 101, start=Progress(step=100, samples=12345, tokens=7))}
    assert resumed == {s: from_zero[s] for s in range(100, 201)}
    # In reverse order, too: no hidden stream.
    assert [fresh(Progress(step=s)) for s in range(200, 99, -1)] == [from_zero[s] for s in range(200, 99, -1)]
    other_seed = RandomBatch(seed=4, min=8, max=64, multiple=8)
    assert [other_seed(Progress(step=s)) for s in range(100)] != [from_zero[s] for s in range(100)]


def test_random_draws_are_pinned():
    # Changing the stream would change the batches of every existing run's resume: pin it.
    b = RandomBatch(seed=0, min=8, max=64, multiple=8)
    assert [b(Progress(step=s)) for s in range(10)] == PINNED_RANGE
    c = RandomBatch(seed=0, choices=[16, 32, 64], probs=[0.5, 0.25, 0.25])
    assert [c(Progress(step=s)) for s in range(10)] == PINNED_CHOICES


PINNED_RANGE = [24, 8, 40, 64, 40, 48, 8, 24, 56, 32]
PINNED_CHOICES = [32, 64, 16, 32, 16, 16, 64, 64, 16, 16]


def test_random_range_covers_the_multiples_and_nothing_else():
    b = RandomBatch(seed=1, min=10, max=60, multiple=8)  # multiples of 8 in [10, 60]: 16..56
    seen = Counter(b(Progress(step=s)) for s in range(3000))
    assert set(seen) == {16, 24, 32, 40, 48, 56}
    assert min(seen.values()) > 3000 / 6 * 0.8  # roughly uniform
    with pytest.raises(UserError, match="no multiple"):
        RandomBatch(seed=0, min=9, max=15, multiple=8)


def test_random_choices_honour_probs():
    b = RandomBatch(seed=7, choices=[16, 32, 64], probs=[0.7, 0.2, 0.1], multiple=8)
    n = 5000
    seen = Counter(b(Progress(step=s)) for s in range(n))
    assert set(seen) <= {16, 32, 64}
    for size, p in ((16, 0.7), (32, 0.2), (64, 0.1)):
        assert abs(seen[size] / n - p) < 0.03, (size, seen)
    uniform = Counter(RandomBatch(seed=7, choices=[8, 24])(Progress(step=s)) for s in range(2000))
    assert abs(uniform[8] / 2000 - 0.5) < 0.05


def test_random_choices_are_rounded_to_multiples():
    with pytest.warns(UserWarning, match=r"batch\.choices"):
        b = RandomBatch(seed=0, choices=[10, 30], multiple=8)
    assert {b(Progress(step=s)) for s in range(200)} == {8, 32}


# ---- ramp ----------------------------------------------------------------------------------


def test_linear_ramp_values():
    ramp = RampBatch(64, start=8, span=100, multiple=8)
    # 8 + 56 t/100, rounded to the nearest multiple of 8, halves up: 13.6 -> 16, 22 -> 24, 36 -> 40, 50 -> 48
    table = {0: 8, 10: 16, 25: 24, 50: 40, 75: 48, 99: 64, 100: 64, 500: 64}
    assert {s: ramp(Progress(step=s)) for s in table} == table
    values = [b for _, b in run(ramp, 150)]
    assert values == sorted(values) and all(v % 8 == 0 for v in values)


def test_linear_ramp_in_samples():
    ramp = RampBatch(32, start=8, span=1000, unit="samples", multiple=4)
    # 8 + 24 s/1000: s = 500 -> 20, s = 250 -> 14 -> 16 (half up), s = 900 -> 29.6 -> 28
    assert [ramp(Progress(step=1, samples=s)) for s in (0, 250, 500, 900, 1000, 5000)] == [8, 16, 20, 28, 32, 32]


STAGES = [{"until": 100, "size": 16}, {"until": 300, "size": 32}]


@pytest.mark.parametrize("unit", ["steps", "samples", "tokens"])
def test_ramp_stages_switch_exactly_at_their_boundaries(unit):
    ramp = RampBatch(64, stages=STAGES, unit=unit, multiple=8)
    for value, expected in ((0, 16), (99, 16), (100, 32), (299, 32), (300, 64), (10**9, 64)):
        progress = Progress(**{"steps": {"step": value}, "samples": {"samples": value}, "tokens": {"tokens": value}}[unit])
        assert ramp(progress) == expected, (unit, value)


# Stage tables that a run lands on exactly: 10 steps of 16 samples (160 samples, 2560 tokens),
# then 32s until step 20 (in steps) or for 5 steps (320 samples, 5120 tokens), then 64.
RUN_STAGES = {
    "steps": ([{"until": 10, "size": 16}, {"until": 20, "size": 32}], [16] * 10 + [32] * 10),
    "samples": ([{"until": 160, "size": 16}, {"until": 320, "size": 32}], [16] * 10 + [32] * 5 + [64] * 5),
    "tokens": ([{"until": 2560, "size": 16}, {"until": 5120, "size": 32}], [16] * 10 + [32] * 5 + [64] * 5),
}


@pytest.mark.parametrize("unit", ["steps", "samples", "tokens"])
def test_ramp_stages_in_a_run(unit):
    stages, expected = RUN_STAGES[unit]
    trace = run(RampBatch(64, stages=stages, unit=unit, multiple=8), 20)
    assert [b for _, b in trace] == expected
    for progress, b in trace:
        t = progress.value(unit)
        assert b == (16 if t < stages[0]["until"] else 32 if t < stages[1]["until"] else 64)


# ---- adaptive ------------------------------------------------------------------------------


def drive(batch: AdaptiveBatch, noise: list[float | None]) -> list[int]:
    """The batch at each step, observing `noise[i]` after step i (progress after the step)."""
    progress, sizes = Progress(), []
    for ns in noise:
        b = batch(progress)
        sizes.append(b)
        progress = progress.advanced(b, TOKENS_PER_SAMPLE)
        batch.observe(progress, ns)
    return sizes


def test_adaptive_grows_with_the_noise_scale_at_most_every_and_by_max_growth():
    b = AdaptiveBatch(32, max=256, every=10, max_growth=2.0, multiple=8)
    sizes = drive(b, [1000.0] * 50)
    # Changes after steps 10, 20, 30 (observed with progress.step = 10, ...), doubling, capped at 256.
    assert sizes == [32] * 10 + [64] * 10 + [128] * 10 + [256] * 20


def test_adaptive_follows_the_noise_scale_down_but_not_below_min():
    b = AdaptiveBatch(64, min=32, max=512, every=5, max_growth=4.0, multiple=8)
    sizes = drive(b, [300.0] * 10 + [70.0] * 10 + [1.0] * 10)
    # Each change 5 steps after the last: 64 -> 256 (x4 cap) -> 304 (300 rounds up) -> 80 (the
    # /4 floor, 76, rounds up) -> 72 (70 rounds to 72) -> 32 (18 clipped to min).
    assert sizes == [64] * 5 + [256] * 5 + [304] * 5 + [80] * 5 + [72] * 5 + [32] * 5


def test_adaptive_ignores_missing_and_non_finite_noise():
    b = AdaptiveBatch(32, every=1, multiple=8)
    sizes = drive(b, [None, math.nan, math.inf, -5.0, 0.0, None])
    assert sizes == [32] * 6
    assert b.state_dict() == {"size": 32, "last_change": 0}


def test_adaptive_defaults_and_bounds():
    b = AdaptiveBatch(32, every=1, max_growth=1000.0, multiple=8)
    assert drive(b, [1e9, 1e9, 1.0, 1.0]) == [32, 32 * 64, 32 * 64, 32]  # max 64 * size, min size
    with pytest.raises(UserError):
        AdaptiveBatch(32, min=9, max=15, multiple=8)


def test_adaptive_never_returns_a_non_multiple():
    rng = random.Random(0)
    b = AdaptiveBatch(48, min=20, max=1000, every=3, max_growth=1.5, multiple=12)
    noise = [rng.choice([None, rng.uniform(1, 2000)]) for _ in range(500)]
    sizes = drive(b, noise)
    assert all(s % 12 == 0 and 24 <= s <= 996 for s in sizes)
    changes = [(i, a, c) for i, (a, c) in enumerate(itertools.pairwise(sizes)) if a != c]
    assert len(changes) > 10
    steps = [i for i, _, _ in changes]
    assert all(later - earlier >= 3 for earlier, later in itertools.pairwise(steps))
    assert all(c / a <= 1.5 + 1e-9 and a / c <= 1.5 + 1e-9 for _, a, c in changes)


def test_adaptive_state_round_trip_continues_identically():
    rng = random.Random(1)
    noise = [rng.uniform(10, 3000) for _ in range(200)]
    whole = drive(AdaptiveBatch(32, every=7, max_growth=2.0, multiple=8), noise)

    first = AdaptiveBatch(32, every=7, max_growth=2.0, multiple=8)
    progress, sizes = Progress(), []
    for ns in noise[:93]:
        sizes.append(first(progress))
        progress = progress.advanced(sizes[-1], TOKENS_PER_SAMPLE)
        first.observe(progress, ns)
    state = first.state_dict()
    assert set(state) == {"size", "last_change"}

    resumed = AdaptiveBatch(32, every=7, max_growth=2.0, multiple=8)
    resumed.load_state_dict(dict(state))
    for ns in noise[93:]:
        sizes.append(resumed(progress))
        progress = progress.advanced(sizes[-1], TOKENS_PER_SAMPLE)
        resumed.observe(progress, ns)
    assert sizes == whole
    assert len(set(whole)) > 3


def test_stateless_schedules_have_empty_state():
    for sched in (FixedBatch(8), FullBatch(100), RandomBatch(seed=0, min=1, max=9), RampBatch(8, start=1, span=5)):
        assert sched.state_dict() == {}
        sched.load_state_dict({})
        sched.observe(Progress(step=1), 123.0)  # a no-op the trainer may always call
        assert sched.state_dict() == {}


# ---- from config ---------------------------------------------------------------------------


def test_build_batch_schedule():
    def build(dataset_size=None, **kw):
        cfg = BatchConfig(**kw)
        cfg.validate()
        return build_batch_schedule(cfg, seed=5, multiple=8, dataset_size=dataset_size)

    assert build(size=64)(Progress()) == 64
    assert build(schedule="full", dataset_size=1001)(Progress()) == 1000
    with pytest.raises(UserError, match="full"):
        build(schedule="full")
    r = build(schedule="random", min=16, max=64)
    assert r(Progress(step=9)) == RandomBatch(seed=5, min=16, max=64, multiple=8)(Progress(step=9))
    assert build(schedule="ramp", size=64, start=16, span=10)(Progress(step=5)) == 40
    assert build(schedule="ramp", size=64, stages=[{"until": 5, "size": 8}], unit="samples")(Progress(samples=4)) == 8
    a = build(schedule="adaptive", size=32, dataset_size=1000)
    assert isinstance(a, AdaptiveBatch) and (a.lo, a.hi) == (32, 1000)  # max capped by the data
    a = build(schedule="adaptive", size=32, min=16, max=128, every=3, max_growth=3.0)
    assert (a.lo, a.hi, a.every, a.max_growth) == (16, 128, 3, 3.0)


# ---- budgets -------------------------------------------------------------------------------


def test_budget_reached():
    p = Progress(step=31, samples=992, tokens=992 * 16)
    assert not budget_reached(p, "samples", 1000) and budget_reached(p, "steps", 31) and budget_reached(p, "tokens", 992 * 16)


def test_simulate_budget_fixed():
    b = FixedBatch(32)
    assert simulate_budget(b, "steps", 1000, "samples", 16) == 32_000
    assert simulate_budget(b, "steps", 1000, "tokens", 16) == 512_000
    assert simulate_budget(b, "samples", 1000, "steps", 16) == 32  # 31.25 steps: the run stops after 32
    assert simulate_budget(b, "samples", 1000, "samples", 16) == 1000
    assert simulate_budget(b, "tokens", 512_000, "steps", 16) == 1000
    assert simulate_budget(FullBatch(1000, multiple=16), "steps", 10, "samples", 1) == 9920


def test_simulate_budget_ramp():
    steps = RampBatch(64, stages=[{"until": 10, "size": 16}, {"until": 30, "size": 32}])
    # 10 * 16 + 20 * 32 + 20 * 64
    assert simulate_budget(steps, "steps", 50, "samples", 4) == 2080
    assert simulate_budget(steps, "steps", 50, "tokens", 4) == 2080 * 4
    assert simulate_budget(steps, "samples", 2080, "steps", 4) == 50
    assert simulate_budget(steps, "samples", 2081, "steps", 4) == 51

    samples = RampBatch(64, stages=[{"until": 160, "size": 16}, {"until": 800, "size": 32}], unit="samples")
    # 160 samples in 10 steps of 16, then 640 in 20 of 32, then 70 steps of 64: 800 + 4480
    assert simulate_budget(samples, "steps", 100, "samples", 4) == 5280
    assert simulate_budget(samples, "steps", 100, "tokens", 4) == 21_120

    linear = RampBatch(32, start=8, span=4, multiple=8)
    # 8, 14 -> 16, 20 -> 24 (halves up), 26 -> 24, then 32, 32
    assert simulate_budget(linear, "steps", 6, "samples", 1) == 8 + 16 + 24 + 24 + 32 + 32


def test_simulate_budget_random_matches_a_run():
    b = RandomBatch(seed=2, min=8, max=64, multiple=8)
    assert simulate_budget(b, "steps", 40, "samples", 4) == sum(s for _, s in run(b, 40))


def test_simulate_budget_refuses_adaptive():
    a = AdaptiveBatch(32)
    with pytest.raises(UserError, match="adaptive"):
        simulate_budget(a, "steps", 100, "samples", 16)
    assert simulate_budget(a, "samples", 100, "samples", 16) == 100
