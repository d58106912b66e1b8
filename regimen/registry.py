"""Everything regimen knows by name: one registry per component, each name in one place.

| registry | a strategy's key | an entry's target is |
| --- | --- | --- |
| `OPTIMIZERS` | `optimizer.name` | a `torch.optim.Optimizer` class (its keys, family and kernels in `meta`) |
| `LR_SCHEDULES` | `lr.schedule` | a builder `(cfg, peak, total) -> Schedule` (regimen.schedules.lr) |
| `BATCH_SCHEDULES` | `batch.schedule` | a `BatchSchedule` class with `from_config` (regimen.schedules.batch) |
| `DATA_SOURCES` | `data.source` | a loader `(cfg, context) -> TaskData` (regimen.data) |
| `MODELS` | `model.name` | a builder `(cfg, data) -> nn.Module` (regimen.models) |

An entry names its target as `"module:attribute"` and imports it on first use, so this module
(and the strategy, which validates names against it) never imports torch: `regimen --help` and
`--print-config` stay fast. Adding an optimizer, a schedule, a source or a model is one `add`
here plus its implementation; the strategy's validation, `--help` texts and docs read the names
from here.

Example:
    >>> OPTIMIZERS["lion"].meta["keys"]
    frozenset({'betas'})
    >>> LR_SCHEDULES.names()[:3]
    ('constant', 'linear', 'polynomial')
    >>> BATCH_SCHEDULES["ramps"]
    Traceback (most recent call last):
    regimen.errors.UserError: batch.schedule = 'ramps': unknown; allowed: fixed, full, random, ramp, adaptive (did you mean 'ramp'?)
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from regimen.errors import UserError


@dataclass(frozen=True)
class Entry:
    """One name of a registry: what it builds (imported on first use) and facts about it."""

    name: str
    target: str  # "package.module:attribute"
    summary: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        """The target itself (a class or a function)."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry:
    """Names -> entries for one component; an unknown name is a one-line `UserError` naming the key."""

    def __init__(self, key: str) -> None:
        self.key = key  # the strategy key that names an entry, for error messages
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, target: str, summary: str = "", **meta: Any) -> Entry:
        assert name not in self._entries, f"{self.key}: {name!r} registered twice"
        entry = Entry(name, target, summary, meta)
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{self.key} = {name!r}: unknown; allowed: {', '.join(self._entries)}{hint}")
        return self._entries[name]

    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries.values())


# --------------------------------------------------------------------------------------------
# Optimizers. meta: `keys`, the torch-named hyperparameters it takes (others are refused);
# `family`, "sgd" (LR scales linearly with the batch) or "adaptive" (sqrt); `implied`, keyword
# arguments the name implies; `fused` / `foreach`, torch's kernels for it (`fused_dtensor`: the
# fused one also takes FSDP2's DTensor shards); `hidden_only`, an
# optimizer for hidden weight matrices (AdamW takes the rest); `fsdp = False`, an optimizer that
# reads whole-tensor norms on the host, which FSDP2's sharded DTensors do not support.
# --------------------------------------------------------------------------------------------

OPTIMIZERS = Registry("optimizer.name")
_SGD, _ADAPTIVE = "sgd", "adaptive"
_TORCH_KERNELS = {"fused": True, "foreach": True}
OPTIMIZERS.add("gd", "torch.optim:SGD", "full-batch gradient descent", keys=frozenset(), family=_SGD, **_TORCH_KERNELS)
OPTIMIZERS.add(
    "sgd",
    "torch.optim:SGD",
    "stochastic gradient descent",
    keys=frozenset({"momentum", "dampening", "nesterov"}),
    family=_SGD,
    **_TORCH_KERNELS,
)
OPTIMIZERS.add(
    "momentum",
    "torch.optim:SGD",
    "SGD with heavy-ball momentum",
    keys=frozenset({"momentum", "dampening"}),
    family=_SGD,
    implied={"momentum": 0.9},
    **_TORCH_KERNELS,
)
OPTIMIZERS.add(
    "nesterov",
    "torch.optim:SGD",
    "SGD with Nesterov momentum",
    keys=frozenset({"momentum"}),
    family=_SGD,
    implied={"momentum": 0.9, "nesterov": True},
    **_TORCH_KERNELS,
)
OPTIMIZERS.add(
    "adagrad",
    "torch.optim:Adagrad",
    "AdaGrad",
    keys=frozenset({"eps", "lr_decay", "initial_accumulator_value"}),
    family=_ADAPTIVE,
    **_TORCH_KERNELS,
)
OPTIMIZERS.add(
    "rmsprop", "torch.optim:RMSprop", "RMSprop", keys=frozenset({"alpha", "eps", "momentum", "centered"}), family=_ADAPTIVE, foreach=True
)
OPTIMIZERS.add(
    "adam", "torch.optim:Adam", "Adam", keys=frozenset({"betas", "eps", "amsgrad"}), family=_ADAPTIVE, fused_dtensor=True, **_TORCH_KERNELS
)
OPTIMIZERS.add(
    "adamw",
    "torch.optim:AdamW",
    "Adam with decoupled weight decay",
    keys=frozenset({"betas", "eps", "amsgrad"}),
    family=_ADAPTIVE,
    fused_dtensor=True,
    **_TORCH_KERNELS,
)
OPTIMIZERS.add(
    "nadam",
    "torch.optim:NAdam",
    "Adam with Nesterov momentum",
    keys=frozenset({"betas", "eps", "momentum_decay"}),
    family=_ADAPTIVE,
    foreach=True,
)
OPTIMIZERS.add("radam", "torch.optim:RAdam", "rectified Adam", keys=frozenset({"betas", "eps"}), family=_ADAPTIVE, foreach=True)
OPTIMIZERS.add(
    "adafactor",
    "torch.optim:Adafactor",
    "Adafactor (factored second moments)",
    keys=frozenset({"beta2_decay", "eps", "d"}),
    family=_ADAPTIVE,
    foreach=True,
    fsdp=False,  # torch's Adafactor squares a row norm in place, which DTensor refuses (tests/test_optim_fsdp.py)
)
OPTIMIZERS.add(
    "muon",
    "regimen.optim.muon:Muon",
    "Muon on hidden matrices, AdamW on the rest",
    keys=frozenset({"momentum", "nesterov", "ns_steps", "ns_dtype", "adjust_lr_fn", "betas", "eps"}),
    family=_ADAPTIVE,
    hidden_only=True,
)
OPTIMIZERS.add("lion", "regimen.optim.lion:Lion", "Lion (sign of an interpolated momentum)", keys=frozenset({"betas"}), family=_ADAPTIVE)
OPTIMIZERS.add(
    "lamb",
    "regimen.optim.lamb:LAMB",
    "LAMB (layer-wise trust ratio on Adam)",
    keys=frozenset({"betas", "eps"}),
    family=_ADAPTIVE,
    fsdp=False,
)
OPTIMIZERS.add(
    "lars",
    "regimen.optim.lars:LARS",
    "LARS (layer-wise trust ratio on momentum SGD)",
    keys=frozenset({"momentum", "nesterov", "trust_coefficient", "eps"}),
    family=_SGD,
    fsdp=False,
)
OPTIMIZERS.add(
    "schedulefree_adamw",
    "regimen.optim.schedulefree:ScheduleFreeAdamW",
    "schedule-free AdamW",
    keys=frozenset({"betas", "eps", "warmup_steps", "r", "weight_lr_power"}),
    family=_ADAPTIVE,
)
OPTIMIZERS.add(
    "schedulefree_sgd",
    "regimen.optim.schedulefree:ScheduleFreeSGD",
    "schedule-free SGD",
    keys=frozenset({"momentum", "warmup_steps", "r", "weight_lr_power"}),
    family=_SGD,
)


# --------------------------------------------------------------------------------------------
# LR schedules: builders `(cfg, peak, total) -> Schedule` in regimen.schedules.lr.
# --------------------------------------------------------------------------------------------

LR_SCHEDULES = Registry("lr.schedule")
for _name, _summary in (
    ("constant", "the peak, after the warmup"),
    ("linear", "linear decay to lr.min_lr"),
    ("polynomial", "(1 - t/T)^power decay to lr.min_lr"),
    ("exponential", "peak x gamma^(t/period)"),
    ("step", "times gamma every period"),
    ("multistep", "times gamma at each of lr.milestones"),
    ("cosine", "cosine decay to lr.min_lr"),
    ("wsd", "warmup, stable, decay over the last decay_fraction"),
    ("inverse_sqrt", "peak x sqrt(warmup / t)"),
    ("one_cycle", "cosine rise then cosine fall (torch's OneCycleLR)"),
):
    LR_SCHEDULES.add(_name, f"regimen.schedules.lr:lr_{_name}", _summary)


# --------------------------------------------------------------------------------------------
# Batch schedules: `BatchSchedule` classes with `from_config(cfg, seed, multiple, dataset_size)`.
# --------------------------------------------------------------------------------------------

BATCH_SCHEDULES = Registry("batch.schedule")
BATCH_SCHEDULES.add("fixed", "regimen.schedules.batch:FixedBatch", "batch.size every step")
BATCH_SCHEDULES.add("full", "regimen.schedules.batch:FullBatch", "the whole training set every step")
BATCH_SCHEDULES.add("random", "regimen.schedules.batch:RandomBatch", "drawn per step from [min, max] or choices")
BATCH_SCHEDULES.add("ramp", "regimen.schedules.batch:RampBatch", "grows from start to size over span, or by stages")
BATCH_SCHEDULES.add("adaptive", "regimen.schedules.batch:AdaptiveBatch", "follows the measured gradient noise scale")


# --------------------------------------------------------------------------------------------
# Data sources: `data.source = "<name>"` or `"<name>:PATH"`. meta: `path` (takes one), `kind`
# ("tokens" for language-model windows, "features" for vectors with class labels, "any").
# --------------------------------------------------------------------------------------------

DATA_SOURCES = Registry("data.source")
DATA_SOURCES.add("stdlib", "regimen.data:load_stdlib", "Python's standard library as bytes", path=False, kind="tokens")
DATA_SOURCES.add("text", "regimen.data:load_text", "a text file's bytes", path=True, kind="tokens")
DATA_SOURCES.add(
    "tokens", "regimen.data:load_tokens", "token ids: a .bin file or a directory of train.bin / val.bin", path=True, kind="tokens"
)
DATA_SOURCES.add("synthetic", "regimen.data:load_synthetic", "a seeded Gaussian-mixture classification set", path=False, kind="features")
DATA_SOURCES.add("shapes", "regimen.data:load_shapes", "seeded 16x16 images of ten shapes (a small vision task)", path=False, kind="images")
DATA_SOURCES.add("python", "regimen.data:load_python", "data given in Python (rg.fit)", path=False, kind="any")


# --------------------------------------------------------------------------------------------
# Models: `model.name = "<name>"`, or `"package.module:factory"` for a user's own. meta: `data`,
# the kind of data source it needs.
# --------------------------------------------------------------------------------------------

MODELS = Registry("model.name")
MODELS.add("gpt", "regimen.models:build_gpt", "a decoder-only transformer (nanoGPT-like)", data="tokens")
MODELS.add("mlp", "regimen.models:build_mlp", "dense layers with ReLU (a classifier)", data="features")
MODELS.add("cnn", "regimen.models:build_cnn", "conv layers (model.hidden channels) with max-pooling, then a classifier", data="images")
