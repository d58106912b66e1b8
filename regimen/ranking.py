"""Comparing runs: the strategy diff, the ranking, time to a target loss, the units of the axes.

Pure functions of `regimen.rundir.Run`s; the report's figures and pages are built on them, and
`regimen compare` and `regimen tune` rank with them.

Decisions (the report's pages state them too):

- Runs are ranked by best validation loss; runs that never evaluated come after them, ranked
  by final training loss.
- The target loss for "time to target" is the given one, else the worst best validation loss
  among the runs: the lowest loss every evaluated run reached, so the column compares all of
  them. Time is the wall clock from the start of training to the first logged evaluation at or
  below the target.
- Loss against data is plotted against tokens when every run saw more tokens than samples
  (sequence models), else against samples. The loss unit is nats/token for sequence models and
  nats/sample otherwise, unless the summary names it (`loss_unit`).
- The strategy diff shows, for each run, the keys (`section.key`) whose value differs from
  `base`; without a base, the keys on which the runs differ from each other.

Example:
    >>> from pathlib import Path
    >>> a = Run("a", Path("a"), {}, [{"step": 1, "loss": 2.0, "val_loss": 2.5}])
    >>> b = Run("b", Path("b"), {}, [{"step": 1, "loss": 3.0, "val_loss": 2.2}])
    >>> [r.name for r in rank_runs([a, b])], ranked_on(b)
    (['b', 'a'], ('val', 2.2))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from regimen.rundir import Run, flatten_strategy
from regimen.strategy import same_value

DataUnit = Literal["samples", "tokens"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


# A key a run's strategy does not set (TOML has no null: None-valued keys are left out).
MISSING: Any = _Missing()


def strategy_diff(runs: Sequence[Run], base: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """For each run (by name), the strategy keys that differ from `base`, with the run's value.

    `base` is a flat (`section.key`) or nested mapping; None means "what all runs share", so
    every run lists the keys on which the runs differ from each other. A key a run does not set
    has the value `MISSING`.

    Example:
        >>> from pathlib import Path
        >>> a = Run("a", Path("a"), {"optimizer": {"name": "adam", "lr": 0.001}}, [])
        >>> b = Run("b", Path("b"), {"optimizer": {"name": "sgd", "lr": 0.001}}, [])
        >>> strategy_diff([a, b])
        {'a': {'optimizer.name': 'adam'}, 'b': {'optimizer.name': 'sgd'}}
    """
    flats = [run.flat_strategy for run in runs]
    keys = _ordered_keys(flats + ([flatten_strategy(base)] if base is not None else []))
    if base is None:
        varied = [k for k in keys if len({_hashable(f.get(k, MISSING)) for f in flats}) > 1]
        return {run.name: {k: flat.get(k, MISSING) for k in varied} for run, flat in zip(runs, flats)}
    flat_base = flatten_strategy(base)
    return {
        run.name: {k: flat.get(k, MISSING) for k in keys if not same_value(flat.get(k, MISSING), flat_base.get(k, MISSING))}
        for run, flat in zip(runs, flats)
    }


def shared_strategy(runs: Sequence[Run]) -> dict[str, Any]:
    """The `section.key` values every run has in common."""
    flats = [run.flat_strategy for run in runs]
    return {k: flats[0][k] for k in _ordered_keys(flats) if all(k in f and same_value(f[k], flats[0][k]) for f in flats)}


def rank_runs(runs: Sequence[Run]) -> list[Run]:
    """Runs best first: by best validation loss, then (never evaluated) by final train loss.

    Runs with neither come last; ties keep the given order.

    Example:
        >>> from pathlib import Path
        >>> a = Run("a", Path("a"), {}, [{"step": 1, "loss": 2.0, "val_loss": 2.5}])
        >>> b = Run("b", Path("b"), {}, [{"step": 1, "loss": 3.0, "val_loss": 2.2}])
        >>> [r.name for r in rank_runs([a, b])]
        ['b', 'a']
    """
    return sorted(runs, key=_rank_key)


def ranked_on(run: Run) -> tuple[str, float] | None:
    """What a run is ranked on: `("val", best val loss)`, `("train", final loss)` or None."""
    if run.best_val_loss is not None:
        return "val", run.best_val_loss
    final = run.final_loss
    if final is not None and math.isfinite(final):
        return "train", final
    return None


def _rank_key(run: Run) -> tuple[int, float]:
    on = ranked_on(run)
    if on is None:
        return 2, 0.0
    return (0 if on[0] == "val" else 1), on[1]


def auto_target(runs: Sequence[Run]) -> tuple[float, str] | None:
    """The default target loss and the rule that chose it (see the module docstring)."""
    vals = [v for v in (r.best_val_loss for r in runs) if v is not None]
    if vals:
        return max(vals), "the worst best validation loss among the runs, so every evaluated run reaches it"
    finals = [v for v in (r.final_loss for r in runs) if v is not None and math.isfinite(v)]
    if finals:
        return max(finals), "no run evaluated: the worst final training loss among the runs"
    return None


def time_to_loss(run: Run, target: float) -> tuple[float, int, str] | None:
    """`(seconds, step, "val" | "train")` when the run first logged a loss <= target, else None.

    Validation loss when the run has any, else training loss.
    """
    key, kind = ("val_loss", "val") if run.has("val_loss") else ("loss", "train")
    for step, seconds, value in run.series(key, "time"):
        if value <= target:
            return seconds, int(step), kind
    return None


def _ordered_keys(flats: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for flat in flats:
        seen.update(dict.fromkeys(flat))
    return list(seen)


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ("{", tuple((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("[", tuple(_hashable(v) for v in value))
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def data_unit(runs: Sequence[Run]) -> DataUnit:
    """`tokens` when every run with data saw more tokens than samples, else `samples`."""
    with_data = [r for r in runs if r.metrics]
    return "tokens" if with_data and all(r.token_level for r in with_data) else "samples"


def loss_unit(runs: Sequence[Run]) -> str:
    """The loss's unit for axis labels (nats/token, nats/sample, or the summary's `loss_unit`)."""
    named = {str(r.summary["loss_unit"]) for r in runs if r.summary and r.summary.get("loss_unit")}
    if len(named) == 1:
        return named.pop()
    return "nats/token" if data_unit(runs) == "tokens" else "nats/sample"


def unique_names(runs: Sequence[Run]) -> None:
    """Make run names unique (two `runs/*/adam` directories) by adding parent folders."""
    for depth in range(1, 4):
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.name] = counts.get(run.name, 0) + 1
        dupes = {n for n, c in counts.items() if c > 1}
        if not dupes:
            return
        for run in runs:
            if run.name in dupes:
                parts = run.path.resolve().parts
                run.name = "/".join(parts[-1 - depth :])
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} #{seen[run.name]}"


@dataclass
class Comparison:
    """Everything a comparison page states about a set of runs (`compare_runs` builds it)."""

    runs: list[Run]
    ranked: list[Run]
    winner: str | None
    unit: str
    data: DataUnit
    target: tuple[float, str] | None  # the target loss and the rule that chose it
    diff: dict[str, dict[str, Any]]
    shared: dict[str, Any]
    base_given: bool


def compare_runs(runs: Sequence[Run], base: Mapping[str, Any] | None = None, target: float | None = None) -> Comparison:
    """Rank `runs`, choose the target loss, and diff their strategies against `base` (or each other).

    Example:
        >>> from pathlib import Path
        >>> a = Run("a", Path("a"), {"optimizer": {"lr": 0.1}}, [{"step": 1, "loss": 2.0, "val_loss": 2.5}])
        >>> b = Run("b", Path("b"), {"optimizer": {"lr": 0.2}}, [{"step": 1, "loss": 3.0, "val_loss": 2.2}])
        >>> c = compare_runs([a, b])
        >>> c.winner, c.target[0], c.diff["a"]
        ('b', 2.5, {'optimizer.lr': 0.1})
    """
    ranked = rank_runs(runs)
    rule = (target, "given with --target-loss") if target is not None else auto_target(runs)
    return Comparison(
        runs=list(runs),
        ranked=ranked,
        winner=ranked[0].name if ranked and ranked_on(ranked[0]) is not None else None,
        unit=loss_unit(runs),
        data=data_unit(runs),
        target=rule,
        diff=strategy_diff(runs, base),
        shared=shared_strategy(runs),
        base_given=base is not None,
    )
