"""The plan of a search: the candidates, the rungs of the race, and the compute each phase spends.

Everything here is a pure function of the inputs (CONFIG, the space, the budget) and, for the
LRs and the batch, of the probe's results, so every `regimen tune` process working on one
study computes the same plan.

The race is successive halving (Jamieson & Talwalkar 2016; Li et al. 2018) in rungs of growing
budgets `T_r = T / eta^(R-1-r)` (in samples), where `T` is one full run of CONFIG: every
candidate runs rung 0, and the best `1/eta` of each rung (at least one) run the next. The top
rung is the full budget, so the winner's last measurement *is* the run `best.toml` describes.

The hedged final (`Plan.hedge`, chosen whenever the budget allows it): the last rung does not
halve; every candidate of the rung before it runs the full budget, and with each one the same
strategy at the next lower LR (`lower_neighbour`), even if that one was stopped earlier. Short
rungs favour high LRs (the short-horizon bias, Wu et al. 2018: the best LR falls as the run
grows), so a survivor's lower-LR neighbour is the likeliest strategy to beat it at the full
budget. On the benchmark tasks (`benchmarks/tune_policy.py`, docs/tune.md) the best strategy at
the full budget was 5th-6th of 19 at a third of it (MLP) and 3rd (conv net): plain halving chose
strategies 8-105% worse than the grid's best, the hedged final chose the grid's best.

How a candidate is measured at budget `T_r` depends on its LR schedule (`measure_kind`):

- `branch` (WSD): a *trunk* trains in the stable phase, at the peak LR (`lr.schedule =
  constant`, same warmup); to measure `T_r`, a *branch* resumes from the trunk's checkpoint at
  the start of the cooldown of a WSD run of total `T_r` (the first step boundary at or past
  `(1 - decay_fraction) x T_r` in `lr.unit`) and cools down to `T_r` in its own run directory.
  Up to that point the trunk's and the branch's LRs are the same numbers (the LR of a step is
  read from the progress before it), so the branch is exactly a WSD run of length `T_r`
  (Hägele et al. 2024). A promoted candidate continues its trunk instead of starting again.
- `prefix` (a constant schedule, schedule-free optimizers): any point of one run is the end of
  a run of that length, so the rung reads the run's loss at `T_r` and the run continues. Exact
  as long as nothing depends on the total (warmup is absolute): no bias.
- `restart` (cosine and every other decaying schedule): the schedule depends on the total from
  the first step, so each rung is its own run of length `T_r`, from scratch. Unbiased (a
  shorter cosine is what is measured), at the price of no reuse: a candidate reaching the top
  rung pays `sum T_r`, about `1 + 1/(eta - 1)` full runs. The alternative, a full-length cosine
  read early, is cheaper but biased against cosine (its LR has not decayed at `T_r`, so its loss
  there is higher than a run of that length would reach), which would eliminate it unfairly.

Example:
    >>> rung_budgets(9000, eta=3, rungs=3)
    [1000, 3000, 9000]
    >>> survivors(18, eta=3, rungs=4)
    [18, 6, 2, 1]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from regimen.errors import UserError
from regimen.registry import DATA_SOURCES
from regimen.search.space import Space
from regimen.strategy import Strategy

MeasureKind = Literal["branch", "prefix", "restart"]
MAX_RUNGS = 5
# The shortest rung: fewer steps than this measure noise, not a strategy.
MIN_RUNG_STEPS = 20
# The LR range test of each family that probes its LR: steps of the sweep and its range. Six and
# a half decades in 40 steps (lr-find's default is 100 steps over eight): the probe of six
# families then costs 240 steps, a quarter of the default task's full run, not 0.6 of it.
PROBE_STEPS = 40
PROBE_MIN_LR = 1e-6
PROBE_MAX_LR = 3.0
# What centres a family's LRs: the LR at the minimum of the range test's smoothed loss divided by
# PROBE_DIVISOR. lr-find's own suggestion, the steepest descent, lags in a sweep this short (six
# steps a decade: the loss still falls from earlier steps when the LR is already too high). On
# 18 family/task pairs (benchmarks/lr_finder.py, docs/tune.md) the steepest point was within 2x
# of the best LR of a sweep in 2, a tenth of the minimum in 4, a fifth of it in 9; with tune's
# three LRs a factor 3 apart around a fifth, one candidate was within 2x in 13.
PROBE_DIVISOR = 5.0


def measure_kind(strategy: Strategy) -> MeasureKind:
    """How a strategy's loss at a shorter budget is measured (see the module docstring).

    >>> measure_kind(Strategy.from_dict({"lr": {"schedule": "wsd"}})), measure_kind(Strategy.from_dict({"lr": {"schedule": "cosine"}}))
    ('branch', 'restart')
    """
    if strategy.lr.schedule == "wsd":
        return "branch"
    if strategy.lr.schedule == "constant":
        return "prefix"
    return "restart"


def probe_groups(base: Strategy, space: Space) -> dict[str, str]:
    """Each probing family -> the family whose range test it shares.

    The range test replaces the LR schedule (lr-find sweeps a constant LR), so families that
    differ only in `[lr]` keys (AdamW + cosine and AdamW + WSD) get the same curve: it runs once.

    >>> from regimen.search.space import default_space
    >>> groups = probe_groups(Strategy.default(), default_space(Strategy.default()))
    >>> groups["adamw-wsd"], len(set(groups.values()))
    ('adamw-cosine', 5)
    """
    seen: dict[str, str] = {}
    out: dict[str, str] = {}
    for family in space.families:
        if not family.probes_lr:
            continue
        tree = base.replace(family.points()[0]).to_dict()
        tree.pop("lr")
        key = repr(sorted(tree.items()))
        out[family.name] = seen.setdefault(key, family.name)
    return out


def rung_budgets(total: int, eta: int, rungs: int) -> list[int]:
    """`T_r = T / eta^(R-1-r)` samples, rounded down, the last exactly `total`."""
    return [total // eta ** (rungs - 1 - r) for r in range(rungs)]


def survivors(n: int, eta: int, rungs: int) -> list[int]:
    """Candidates at each rung: all at rung 0, then the best `1/eta` (at least one)."""
    out = [n]
    for _ in range(rungs - 1):
        out.append(max(1, out[-1] // eta))
    return out


def tokens_per_sample(strategy: Strategy) -> int:
    """Tokens in one sample: the context for token sources, else 1 (no data is read)."""
    return strategy.model.context if DATA_SOURCES[strategy.data.kind].meta["kind"] == "tokens" else 1


@dataclass(frozen=True)
class Candidate:
    """One strategy the race may train: a family's point and an LR (a factor of the probe's suggestion, or given)."""

    name: str
    family: str
    keys: Mapping[str, Any]  # the strategy keys over the base, the LR among them when given
    lr_factor: float | None  # times the family's probed LR; None when the LR is in `keys`
    kind: MeasureKind

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "keys": dict(self.keys), "lr_factor": self.lr_factor, "kind": self.kind}


@dataclass
class Plan:
    """The candidates, the rungs, and the compute (samples) of the probe and each rung, before any training."""

    base: Strategy
    space: Space
    candidates: list[Candidate]
    full: int  # samples of one full run of CONFIG
    budget: int  # samples the whole search may spend
    rungs: list[int]  # samples of each rung's measurement
    keep: list[int]  # candidates at each rung
    probe_cost: int
    rung_costs: list[int]
    hedge: bool = False  # the last rung: every candidate of the rung before, each with its lower-LR neighbour
    unit_note: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.probe_cost + sum(self.rung_costs)

    def probing(self) -> list[str]:
        """The families whose range test runs (one per group of `probe_groups`)."""
        return sorted(set(probe_groups(self.base, self.space).values()), key=[f.name for f in self.space.families].index)

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {
            "base": self.base.resolve().to_dict(),
            "space": self.space.to_json(),
            "rungs": self.rungs,
            "keep": self.keep,
            "hedge": self.hedge,
            "candidates": [c.to_json() for c in self.candidates],
        }


def full_run_samples(strategy: Strategy, train_size: int | None = None, world: int = 1) -> int:
    """Samples one run of `strategy` trains on: its budget, converted with its batch schedule."""
    from regimen.schedules.batch import build_batch_schedule, simulate_budget

    s = strategy.resolve()
    unit, amount = s.train.budget()
    if unit == "epochs":
        if train_size is None:
            raise UserError("train.epochs: tune needs the training set's size for an epoch budget; give train.samples instead")
        unit, amount = "samples", amount * train_size
    micro = s.batch.micro if isinstance(s.batch.micro, int) else 1  # "auto" is chosen when the run starts
    multiple = world * (1 if s.batch.schedule == "full" else micro)
    schedule = build_batch_schedule(s.batch, seed=s.train.seed, multiple=multiple, dataset_size=train_size)
    return int(simulate_budget(schedule, unit, amount, "samples", tokens_per_sample(s)))  # type: ignore[arg-type]


def make_candidates(base: Strategy, space: Space) -> list[Candidate]:
    """Every family's points times its LRs, in the order of the space; names are unique and file-safe."""
    out: list[Candidate] = []
    for family in space.families:
        points = family.points()
        varied = [k for k in family.grid]
        for point in points:
            suffix = "".join(f"-{_component(k, point[k])}" for k in varied if k != "optimizer.lr")
            if "optimizer.lr" in point:
                name = f"{family.name}{suffix}.lr{_number(point['optimizer.lr'])}"
                out.append(Candidate(name, family.name, point, None, measure_kind(base.replace(point))))
                continue
            mid = (space.lr_points - 1) / 2
            kind = measure_kind(base.replace(point))
            for i, factor in enumerate(space.lr_factors()):
                # lr+0 is the probe's suggestion, lr-1 and lr+1 a factor lr_spread below and above it.
                out.append(Candidate(f"{family.name}{suffix}.lr{i - mid:+g}", family.name, point, factor, kind))
    return out


def promote(plan: Plan, r: int, ranked: Sequence[Candidate]) -> list[Candidate]:
    """Who runs rung `r` (>= 1): from rung r-1's candidates with a finite loss, best first.

    The best `plan.keep[r]`; in a hedged final, each of them followed by its lower-LR neighbour.
    """
    going = list(ranked[: plan.keep[r]])
    if plan.hedge and r == len(plan.rungs) - 1:
        for c in list(going):
            n = lower_neighbour(c, plan.candidates)
            if n is not None and n not in going:
                going.append(n)
    return going


def lower_neighbour(c: Candidate, candidates: Sequence[Candidate]) -> Candidate | None:
    """The same strategy as `c` at the next lower LR (its family, its other keys), or None.

    >>> from regimen.search.space import default_space
    >>> base = Strategy.default(["train.steps=50"])
    >>> cands = make_candidates(base, default_space(base))
    >>> lower_neighbour(cands[1], cands).name, lower_neighbour(cands[0], cands)
    ('adamw-cosine.lr-1', None)
    """
    mine = _lr_rank(c)
    if mine is None:
        return None
    rest = {k: v for k, v in c.keys.items() if k != "optimizer.lr"}
    below = [
        x
        for x in candidates
        if x.family == c.family
        and {k: v for k, v in x.keys.items() if k != "optimizer.lr"} == rest
        and (lr := _lr_rank(x)) is not None
        and lr < mine
    ]
    return max(below, key=lambda x: _lr_rank(x) or 0.0) if below else None


def _lr_rank(c: Candidate) -> float | None:
    """What orders a family's LRs: the factor of the probe's LR, or the LR given."""
    if c.lr_factor is not None:
        return c.lr_factor
    lr = c.keys.get("optimizer.lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def _number(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _component(key: str, value: Any) -> str:
    short = key.split(".")[1]
    text = _number(value) if not isinstance(value, (list, tuple)) else "x".join(_number(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "", f"{short}{text}")


def unit_cost(kind: MeasureKind, rungs: Sequence[int], r: int, decay_fraction: float, since: int | None = None) -> int:
    """Samples one candidate trains at rung r (its trunk's extension and its measurement).

    `since`: the last rung it ran before (default r - 1; -1 for none, as for a hedged final's
    neighbour stopped early): a trunk continues from there.

    >>> unit_cost("branch", [100, 300, 900], 2, 0.2), unit_cost("branch", [100, 300, 900], 2, 0.2, since=0)
    (660, 820)
    """
    last = r - 1 if since is None else since
    before = rungs[last] if last >= 0 else 0
    if kind == "restart":
        return rungs[r]
    if kind == "prefix":
        return rungs[r] - before
    stable = (1 - decay_fraction) * (rungs[r] - before)
    return math.ceil(stable + decay_fraction * rungs[r])


def make_plan(base: Strategy, space: Space, budget: int, train_size: int | None = None, world: int = 1) -> Plan:
    """Choose the number of rungs: the fewest (the longest first rung) whose probe and race fit in `budget` samples.

    A budget too small for the shortest race (`MAX_RUNGS` rungs, or a first rung of
    `MIN_RUNG_STEPS` steps) is a `UserError` saying what it would need.
    """
    candidates = make_candidates(base, space)
    full = full_run_samples(base, train_size, world)
    batch = base.batch.size
    probing = set(probe_groups(base, space).values())
    best: Plan | None = None
    smallest: Plan | None = None
    # In order of preference: the grid itself (one rung, every candidate at the full budget: exact),
    # then the hedged final (on the benchmark tasks it chose the grid's best where plain halving at
    # the same compute did not), then plain halving; within each, the fewest rungs that fit.
    orders = [(False, range(1, 2))]
    if any(lower_neighbour(c, candidates) for c in candidates):
        orders.append((True, range(2, MAX_RUNGS + 1)))
    orders.append((False, range(2, MAX_RUNGS + 1)))
    noise = max(MIN_RUNG_STEPS * batch, full // 27) if space.batch == "probe" else 0
    probe = len(probing) * PROBE_STEPS * _family_batch(base, space, probing) + noise
    for hedge, rung_counts in orders:
        for n_rungs in rung_counts:
            rungs = rung_budgets(full, space.eta, n_rungs)
            if rungs[0] < MIN_RUNG_STEPS * batch:
                break
            keep = survivors(len(candidates), space.eta, n_rungs)
            if hedge:
                if keep[-2] == len(candidates):
                    continue  # a final of every candidate is the grid and more
                keep[-1] = keep[-2]
            if 1 in keep[:-1]:
                break  # a rung with one candidate left decides nothing: fewer rungs
            costs = []
            for r in range(n_rungs):
                # Who reaches a rung is unknown before the race: cost it with the average candidate (the
                # report shows what was spent; a race of only restart candidates spends up to ~15% more).
                per = [unit_cost(c.kind, rungs, r, decay_fraction(base, c)) for c in candidates]
                costs.append(math.ceil(keep[r] * sum(per) / len(per)))
            if hedge:
                # Each finalist's neighbour may have stopped at rung 0: cost it a whole run.
                costs[-1] += keep[-1] * full
            plan = Plan(base, space, candidates, full, budget, rungs, keep, probe, costs, hedge=hedge)
            smallest = plan if smallest is None or plan.total < smallest.total else smallest
            if plan.total <= budget:
                best = plan
                break
        if best is not None:
            break
    if best is None:
        if smallest is None:
            raise UserError(
                f"tune: one full run of CONFIG is {full:,} samples, too short for a first rung of {MIN_RUNG_STEPS} steps "
                f"at batch {batch}; give CONFIG a longer budget"
            )
        raise UserError(
            f"tune: the budget ({budget:,} samples, {budget / full:.2g}x one full run) is too small for one race: the cheapest plan "
            f"({len(smallest.rungs)} rungs, {len(candidates)} candidates at {smallest.rungs[0]:,} samples first) needs "
            f"{smallest.total:,} samples ({smallest.total / full:.2g}x); raise --budget or narrow --space "
            "(fewer families, or search.lr_points)"
        )
    return best


def decay_fraction(base: Strategy, c: Candidate) -> float:
    """The WSD decay fraction a candidate trains with (its own key, else CONFIG's)."""
    return float(c.keys.get("lr.decay_fraction", base.lr.decay_fraction))


def _family_batch(base: Strategy, space: Space, probing: set[str]) -> int:
    sizes = [int(f.fixed.get("batch.size", base.batch.size)) for f in space.families if f.name in probing]
    return max(sizes) if sizes else base.batch.size


def format_plan(plan: Plan, unit: str = "samples", per_sample: int = 1) -> str:
    """The lines `regimen tune --dry-run` prints: candidates, rungs, and the compute of each phase."""
    full = plan.full

    def amount(samples: float) -> str:
        return f"{samples * per_sample:,.0f} {unit} ({samples / full:.2f}x a full run)"

    lines = [
        f"regimen tune: {len(plan.candidates)} candidates in {len(plan.space.families)} families, "
        f"successive halving (eta {plan.space.eta}) over {len(plan.rungs)} rung(s); budget {amount(plan.budget)}",
        "candidates:",
    ]
    width = max(len(c.name) for c in plan.candidates)
    for c in plan.candidates:
        keys = ", ".join(f"{k}={_number(v)}" for k, v in c.keys.items())
        lr = f"lr = {c.lr_factor:.3g} x the probe's suggestion" if c.lr_factor is not None else "lr given"
        lines.append(f"  {c.name:<{width}}  {keys}; {lr}; measured by {c.kind}")
    lines.append("phases:")
    probing = plan.probing()
    if plan.probe_cost:
        what = [f"{len(probing)} LR range test(s)"] if probing else []
        what += ["noise scale"] if plan.space.batch == "probe" else []
        lines.append(f"  probe   {' + '.join(what)}: {amount(plan.probe_cost)}")
    for r, (budget, keep, cost) in enumerate(zip(plan.rungs, plan.keep, plan.rung_costs)):
        who = f"{keep} candidate(s)"
        if plan.hedge and r == len(plan.rungs) - 1:
            who += " and the next lower LR of each (the hedged final)"
        lines.append(f"  rung {r}  {who} at {amount(budget)} each: about {amount(cost)}")
    lines.append(f"  total   about {amount(plan.total)}")
    return "\n".join(lines)
