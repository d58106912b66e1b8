"""The search space of `regimen tune`: families of strategies, and the TOML file that names them.

A *family* is a set of strategy keys that belong together (an optimizer and its schedule:
`optimizer.name = "adamw"`, `lr.schedule = "wsd"`), written over the base strategy (CONFIG). A
key with a list of values is searched (every combination inside the family); `optimizer.lr`
may be left out, and then the LR range test centres `lr_points` LRs on its suggestion, a factor
`lr_spread` apart. A family is one candidate per combination of values and LR.

The default space has the families that matter (at least AdamW + cosine, AdamW + WSD, Muon +
WSD, Lion + WSD, schedule-free AdamW and SGD with Nesterov momentum + cosine), each with three
LRs found by the probe, not guessed, and CONFIG itself at its own LR (`search.config`).

`--space SPACE.toml`:

```toml
[search]                   # optional; these are the defaults
families = ["adamw-wsd", "muon-wsd"]   # only these default families (omit: all of them, unless [[family]] is given)
lr_points = 3              # LRs per family, centred on the probe's suggestion
lr_spread = 3.0            # the factor between neighbouring LRs
eta = 3                    # successive halving keeps the best 1/eta at each rung
batch = "probe"            # "probe": the noise scale decides the batch; "keep": CONFIG's batch, no noise probe
config = true              # race CONFIG itself too (at its own LR)

[[family]]                 # a family of your own (any strategy keys, dotted)
name = "adamw-wsd-wd"
optimizer.name = "adamw"
lr.schedule = "wsd"
optimizer.weight_decay = [0.0, 0.1]    # a list: both are tried
optimizer.lr = [1e-3, 3e-3]            # LRs given: no probe for this family
```

A key whose own value is a list (`optimizer.betas`) is searched with a list of lists.

Example:
    >>> from regimen.strategy import Strategy
    >>> space = default_space(Strategy.default(["train.steps=50"]))
    >>> [f.name for f in space.families][:3], space.lr_points
    (['adamw-cosine', 'adamw-wsd', 'muon-wsd'], 3)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regimen.errors import UserError
from regimen.strategy import SECTIONS, Strategy, flatten, read_toml

# The default families, in the order they are listed. Each sets only the keys that make it that
# family; the rest (weight decay, warmup, decay fraction and shape, batch, budget) is CONFIG's.
DEFAULT_FAMILIES: dict[str, dict[str, Any]] = {
    "adamw-cosine": {"optimizer.name": "adamw", "lr.schedule": "cosine"},
    "adamw-wsd": {"optimizer.name": "adamw", "lr.schedule": "wsd"},
    "muon-wsd": {"optimizer.name": "muon", "lr.schedule": "wsd"},
    "lion-wsd": {"optimizer.name": "lion", "lr.schedule": "wsd"},
    "schedulefree-adamw": {"optimizer.name": "schedulefree_adamw", "lr.schedule": "constant"},
    "sgd-nesterov-cosine": {"optimizer.name": "sgd", "optimizer.momentum": 0.9, "optimizer.nesterov": True, "lr.schedule": "cosine"},
}
SETTINGS = ("families", "lr_points", "lr_spread", "eta", "batch", "config")
# CONFIG itself races too (the incumbent, at its own LR): a search then loses to CONFIG only if
# the race's shorter rungs misjudge it.
CONFIG_FAMILY = "config"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Family:
    """A named set of strategy keys; `grid` holds the keys searched (their lists of values).

    Example:
        >>> f = Family("sgd", {"optimizer.name": "sgd"}, {"optimizer.momentum": [0.0, 0.9]})
        >>> [p for p in f.points()]
        [{'optimizer.name': 'sgd', 'optimizer.momentum': 0.0}, {'optimizer.name': 'sgd', 'optimizer.momentum': 0.9}]
    """

    name: str
    fixed: Mapping[str, Any]
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    @property
    def probes_lr(self) -> bool:
        """Whether the LR range test chooses this family's LRs (no `optimizer.lr` given)."""
        return "optimizer.lr" not in self.fixed and "optimizer.lr" not in self.grid

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the searched keys, over the fixed ones, in file order."""
        keys = list(self.grid)
        return [{**self.fixed, **dict(zip(keys, values))} for values in itertools.product(*(self.grid[k] for k in keys))]


@dataclass(frozen=True)
class Space:
    """The families to search and how: LRs per family, their spread, the halving rate."""

    families: tuple[Family, ...]
    lr_points: int = 3
    lr_spread: float = 3.0
    eta: int = 3
    batch: str = "probe"

    def lr_factors(self) -> list[float]:
        """The probe's suggestion times these: `lr_points` factors `lr_spread` apart, centred on 1.

        >>> Space((), lr_points=3, lr_spread=3.0).lr_factors()
        [0.3333333333333333, 1.0, 3.0]
        """
        mid = (self.lr_points - 1) / 2
        return [self.lr_spread ** (i - mid) for i in range(self.lr_points)]

    def to_json(self) -> dict[str, Any]:
        return {
            "families": [{"name": f.name, "fixed": dict(f.fixed), "grid": {k: list(v) for k, v in f.grid.items()}} for f in self.families],
            "lr_points": self.lr_points,
            "lr_spread": self.lr_spread,
            "eta": self.eta,
            "batch": self.batch,
        }


def default_space(base: Strategy) -> Space:
    """Every default family and CONFIG itself, checked against `base` (a family the base cannot take is a `UserError`)."""
    families = (*(Family(name, keys) for name, keys in DEFAULT_FAMILIES.items()), config_family(base))
    for family in families:
        check_family(base, family, "the default space")
    return Space(families)


def config_family(base: Strategy) -> Family:
    """CONFIG as a candidate: no key changed, its own LR (so no range test).

    >>> config_family(Strategy.default()).grid
    {'optimizer.lr': [0.01]}
    """
    return Family(CONFIG_FAMILY, {}, {"optimizer.lr": [base.optimizer.lr]})


def read_space(path: str | Path, base: Strategy) -> Space:
    """Read and check a `--space` file against `base`: one line naming the file and the key on any mistake."""
    where = f"--space {str(path)!r}"
    tree = read_toml(path)
    unknown = [k for k in tree if k not in ("search", "family")]
    if unknown:
        raise UserError(f"{where}: unknown table [{unknown[0]}] (allowed: [search], [[family]])")
    settings = tree.get("search", {})
    if not isinstance(settings, Mapping):
        raise UserError(f"{where}: [search] must be a table")
    for key in settings:
        if key not in SETTINGS:
            raise UserError(f"{where}: unknown key search.{key} (allowed: {', '.join(SETTINGS)})")
    raw = tree.get("family", [])
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise UserError(f"{where}: `family` must be an array of tables ([[family]])")
    chosen = settings.get("families", None if raw else list(DEFAULT_FAMILIES))
    if chosen is None:
        chosen = []
    if not isinstance(chosen, list) or not all(isinstance(n, str) for n in chosen):
        raise UserError(f'{where}: search.families must be a list of names, e.g. ["adamw-wsd"]')
    families: list[Family] = []
    for name in chosen:
        if name not in DEFAULT_FAMILIES:
            raise UserError(f"{where}: unknown family {name!r} in search.families (known: {', '.join(DEFAULT_FAMILIES)})")
        families.append(Family(name, DEFAULT_FAMILIES[name]))
    for i, table in enumerate(raw):
        families.append(_read_family(dict(table), f"{where}: family[{i}]"))
    include = settings.get("config", True)
    if not isinstance(include, bool):
        raise UserError(f"{where}: search.config = {include!r}: expected true or false (race CONFIG itself too)")
    if include and CONFIG_FAMILY not in [f.name for f in families]:
        families.append(config_family(base))
    names = [f.name for f in families]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"{where}: two families are named {duplicate!r}; names must be unique")
    if not [f for f in families if f.name != CONFIG_FAMILY or not include]:
        raise UserError(f"{where}: the space is empty; name default families in search.families or add [[family]] tables")
    space = Space(
        tuple(families),
        lr_points=_setting(settings, "lr_points", 3, int, where, lambda v: 1 <= v <= 9, "an integer in [1, 9]"),
        lr_spread=_setting(settings, "lr_spread", 3.0, float, where, lambda v: 1.0 < v <= 100.0, "a number in (1, 100]"),
        eta=_setting(settings, "eta", 3, int, where, lambda v: 2 <= v <= 10, "an integer in [2, 10]"),
    )
    batch = settings.get("batch", "probe")
    if batch not in ("probe", "keep"):
        raise UserError(f"{where}: search.batch = {batch!r}: allowed: probe, keep")
    space = dataclasses.replace(space, batch=batch)
    for family in space.families:
        check_family(base, family, where)
    return space


def _setting(settings: Mapping[str, Any], key: str, default: Any, kind: type, where: str, ok: Any, allowed: str) -> Any:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise UserError(f"{where}: search.{key} = {value!r}: expected {allowed}")
    value = kind(value)
    if not ok(value) or not math.isfinite(value):
        raise UserError(f"{where}: search.{key} = {value!r}: expected {allowed}")
    return value


def _read_family(table: dict[str, Any], where: str) -> Family:
    name = table.pop("name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{where}: name = {name!r}: give each family a name of letters, digits, '.', '_' or '-'")
    keys = flatten(table)
    if not keys:
        raise UserError(f"{where} ({name}): sets no strategy key")
    fixed: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    for key, value in keys.items():
        section, _, short = key.partition(".")
        if section not in SECTIONS or not short:
            raise UserError(f"{where} ({name}): key {key!r}: expected section.key with a section of {', '.join(SECTIONS)}")
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        if short not in fields:
            raise UserError(f"{where} ({name}): unknown key {key!r} (the [{section}] keys: {', '.join(fields)})")
        if key.startswith("train.") and short in ("steps", "samples", "tokens", "epochs"):
            raise UserError(f"{where} ({name}): {key} is the budget; tune sets it (use --budget for the search's own)")
        if isinstance(value, list) and (not _takes_list(section, short) or (value and all(isinstance(v, list) for v in value))):
            if not value:
                raise UserError(f"{where} ({name}): {key} = []: give at least one value to try")
            grid[key] = value
        else:
            fixed[key] = value
    return Family(name, fixed, grid)


def _takes_list(section: str, key: str) -> bool:
    """Whether a strategy key's own value is a list (`optimizer.betas`, `model.hidden`)."""
    hint = typing.get_type_hints(SECTIONS[section])[key]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) else (hint,)
    return any(typing.get_origin(o) is list for o in options)


def check_family(base: Strategy, family: Family, where: str) -> None:
    """Every point of a family must make a valid strategy over `base`: one line naming the family if not."""
    for point in family.points():
        try:
            base.replace(point)
        except UserError as e:
            raise UserError(f"{where}: family {family.name!r}: {e}") from None
