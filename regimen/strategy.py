"""A training strategy as data: typed sections, read from TOML, overridable by dotted keys.

A `Strategy` is a tree of small dataclasses, one per section (`[model]`, `[data]`,
`[optimizer]`, `[lr]`, `[batch]`, `[train]`, `[parallel]`, `[checkpoint]`, `[observe]`).
Every value is checked when the tree is built; a mistake raises `UserError` with one line that
names the key, the value and what is allowed. `Strategy.to_toml()` writes the fully resolved
tree, which every run directory keeps, so two runs can be diffed key by key.

This module imports no torch: `regimen --help` and `--print-config` stay fast.

Example:
    >>> s = Strategy.load(None, ["optimizer.lr=3e-4", "train.steps=100"])
    >>> s.optimizer.lr, s.train.steps
    (0.0003, 100)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from regimen.errors import UserError
from regimen.registry import BATCH_SCHEDULES, DATA_SOURCES, LR_SCHEDULES, MODELS, OPTIMIZERS

Unit = Literal["steps", "samples", "tokens"]

# The one built-in default task: what `regimen train`, `compare --vary`, `lr-find`, `tune` and
# `plan` run when no CONFIG is given (`Strategy.default()`).
DEFAULT_TASK = Path(__file__).with_name("default_task.toml")


def optimizer_keys(name: str) -> frozenset[str]:
    """The optional [optimizer] keys (torch's argument names) an algorithm takes; others are refused."""
    return OPTIMIZERS[name].meta["keys"]


# Every algorithm-specific key any optimizer takes.
ALGORITHM_KEYS = frozenset().union(*(e.meta["keys"] for e in OPTIMIZERS.entries()))

# Muon's Newton-Schulz dtype: "auto" is bfloat16 where the hardware multiplies it natively.
NS_DTYPES = ("auto", "bfloat16", "float32")
BUDGET_UNITS = ("steps", "samples", "tokens", "epochs")


def _in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


# What each algorithm key may be, checked when the strategy is read (torch and the own
# optimizers would otherwise refuse a bad value deep inside, with a traceback). Each rule is
# (test, what is allowed); a key has the same meaning in every optimizer that takes it.
KEY_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "betas": (lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)"),
    "eps": (_in(0.0, math.inf), "must be >= 0"),
    "momentum": (_in(0.0, 1.0, hi_open=True), "must be in [0, 1)"),
    "dampening": (_in(0.0, 1.0), "must be in [0, 1]"),
    "lr_decay": (_in(0.0, math.inf), "must be >= 0"),
    "initial_accumulator_value": (_in(0.0, math.inf), "must be >= 0"),
    "alpha": (_in(0.0, 1.0), "must be in [0, 1] (the smoothing constant of the squared gradients)"),
    "momentum_decay": (_in(0.0, math.inf), "must be >= 0"),
    "beta2_decay": (_in(-math.inf, 0.0), "must be <= 0 (Adafactor's decay exponent, -0.8 by default)"),
    "d": (_in(1.0, math.inf), "must be >= 1 (Adafactor's clipping threshold)"),
    "ns_steps": (_in(1, 100), "must be an integer in [1, 100] (Newton-Schulz iterations; 5 is usual)"),
    "ns_dtype": (lambda v: v in NS_DTYPES, "allowed: " + ", ".join(NS_DTYPES)),
    "adjust_lr_fn": (lambda v: v in ("original", "match_rms_adamw"), "allowed: original, match_rms_adamw"),
    "trust_coefficient": (_in(0.0, math.inf, lo_open=True), "must be > 0"),
    "warmup_steps": (_in(0, math.inf), "must be >= 0"),
    "r": (_in(0.0, math.inf), "must be >= 0"),
    "weight_lr_power": (_in(0.0, math.inf), "must be >= 0"),
}


# --------------------------------------------------------------------------------------------
# Sections. Field order is the order of the written TOML. `None` means "derived" (resolved by
# `Strategy.resolve`) or "the algorithm's own default".
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """`[model]`: `gpt`, `mlp`, or `package.module:factory` (called with `kwargs`)."""

    name: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context: int = 64
    dropout: float = 0.0
    hidden: list[int] = field(default_factory=lambda: [128])
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _positive("model", "n_layer", self.n_layer)
        _positive("model", "n_head", self.n_head)
        _positive("model", "d_model", self.d_model)
        _positive("model", "context", self.context)
        _in_range("model", "dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if self.d_model % self.n_head:
            _fail("model", "d_model", self.d_model, f"must be a multiple of model.n_head ({self.n_head})")
        if self.name not in MODELS:
            module, sep, attr = self.name.partition(":")
            dotted = all(part.isidentifier() for part in module.split("."))
            if not sep or not dotted or not attr.isidentifier():
                allowed = ", ".join(MODELS.names())
                _fail("model", "name", self.name, f"allowed: {allowed}, or package.module:factory (a Python import path and a name)")
        for h in self.hidden:
            if h <= 0:
                _fail("model", "hidden", self.hidden, "every width must be > 0")


@dataclass
class DataConfig:
    """`[data]`: `stdlib`, `text:PATH`, `tokens:PATH` (uint16 nanoGPT .bin), `synthetic` or `shapes`."""

    source: str = "stdlib"
    val_fraction: float = 0.1
    # The synthetic classification set (see regimen.data.synthetic_classification).
    num_samples: int = 12000
    num_features: int = 100
    num_classes: int = 10

    @property
    def kind(self) -> str:
        """The source's registry name: `text` for `text:PATH`."""
        return self.source.partition(":")[0]

    @property
    def path(self) -> str:
        """The PATH of `text:PATH` / `tokens:PATH` ('' for sources without one)."""
        return self.source.partition(":")[2]

    def validate(self) -> None:
        _in_range("data", "val_fraction", self.val_fraction, 0.0, 1.0, lo_open=False, hi_open=True)
        if self.kind not in DATA_SOURCES:
            listed = ", ".join(f"{e.name}:PATH" if e.meta["path"] else e.name for e in DATA_SOURCES.entries() if e.name != "python")
            _fail("data", "source", self.source, f"allowed: {listed}")
        takes_path = DATA_SOURCES[self.kind].meta["path"]
        if takes_path and not self.path.strip():
            _fail("data", "source", self.source, f"give a path: {self.kind}:PATH")
        if not takes_path and self.path:
            _fail("data", "source", self.source, f"{self.kind} takes no path")
        _positive("data", "num_samples", self.num_samples)
        _positive("data", "num_features", self.num_features)
        if self.num_classes < 2:
            _fail("data", "num_classes", self.num_classes, "must be >= 2")
        if self.kind == "shapes" and self.num_classes > 10:
            _fail("data", "num_classes", self.num_classes, "the shapes set has 10 shapes: at most 10 classes")


@dataclass
class OptimizerConfig:
    """`[optimizer]`: the algorithm, its peak LR, and its own torch-named hyperparameters."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Decay also biases, norms and embeddings (off by default: decaying them hurts).
    decay_all: bool = False
    # torch-named hyperparameters; None keeps the algorithm's default.
    betas: list[float] | None = None
    eps: float | None = None
    momentum: float | None = None
    dampening: float | None = None
    nesterov: bool | None = None
    alpha: float | None = None
    centered: bool | None = None
    amsgrad: bool | None = None
    lr_decay: float | None = None
    initial_accumulator_value: float | None = None
    momentum_decay: float | None = None
    beta2_decay: float | None = None
    d: float | None = None
    ns_steps: int | None = None
    # Muon's Newton-Schulz dtype: "auto" (bfloat16 where the hardware has it), "bfloat16", "float32".
    ns_dtype: str | None = None
    adjust_lr_fn: str | None = None
    trust_coefficient: float | None = None
    warmup_steps: int | None = None
    r: float | None = None
    weight_lr_power: float | None = None
    # Implementation: "auto" picks the fastest the device supports (fused, then foreach).
    implementation: Literal["auto", "fused", "foreach", "loop"] = "auto"

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            _fail("optimizer", "name", self.name, "allowed: " + ", ".join(OPTIMIZERS.names()), options=OPTIMIZERS.names())
        _positive("optimizer", "lr", self.lr)
        if self.weight_decay < 0:
            _fail("optimizer", "weight_decay", self.weight_decay, "must be >= 0")
        allowed = optimizer_keys(self.name)
        for key in self.algorithm_keys():
            value = getattr(self, key)
            if value is None:
                continue
            if key not in allowed:
                what = ", ".join(sorted(allowed)) or "none"
                _fail("optimizer", key, value, f"{self.name} has no such parameter (it takes: {what})")
            test, rule = KEY_RULES.get(key, (lambda v: True, ""))
            if not test(value):
                _fail("optimizer", key, value, rule)
        if self.nesterov and self.name in ("sgd", "lars"):
            if not self.momentum:
                _fail("optimizer", "nesterov", True, "Nesterov momentum needs optimizer.momentum > 0")
            if self.dampening:
                _fail("optimizer", "dampening", self.dampening, "must be 0 with nesterov = true")

    def algorithm_keys(self) -> list[str]:
        """The optional algorithm-specific keys (those that default to None)."""
        fixed = {"name", "lr", "weight_decay", "decay_all", "implementation"}
        return [f.name for f in dataclasses.fields(self) if f.name not in fixed]

    def kwargs(self) -> dict[str, Any]:
        """The algorithm-specific keys that are set, as torch keyword arguments."""
        out = {k: getattr(self, k) for k in self.algorithm_keys() if getattr(self, k) is not None}
        if "betas" in out:
            out["betas"] = tuple(out["betas"])
        return out


@dataclass
class LRConfig:
    """`[lr]`: the learning-rate schedule, as a function of progress counted in `unit`.

    The peak value is `optimizer.lr`. `warmup`, `period`, `milestones` and budgets of the
    schedule are counted in `unit`, so a changing batch size never moves warmup or decay when
    the unit is samples or tokens.
    """

    schedule: str = "cosine"
    unit: Unit = "steps"
    warmup: float = 0.0
    min_lr: float = 0.0
    power: float = 1.0
    gamma: float = 0.1
    period: float | None = None
    milestones: list[float] = field(default_factory=list)
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    scale_with_batch: Literal["auto", "none", "linear", "sqrt"] = "auto"
    reference_batch: int | None = None

    def validate(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            _fail("lr", "schedule", self.schedule, "allowed: " + ", ".join(LR_SCHEDULES.names()), options=LR_SCHEDULES.names())
        if self.warmup < 0:
            _fail("lr", "warmup", self.warmup, "must be >= 0")
        if self.min_lr < 0:
            _fail("lr", "min_lr", self.min_lr, "must be >= 0")
        _positive("lr", "power", self.power)
        _in_range("lr", "gamma", self.gamma, 0.0, 1.0, lo_open=True, hi_open=False)
        if self.period is not None:
            _positive("lr", "period", self.period)
        _in_range("lr", "decay_fraction", self.decay_fraction, 0.0, 1.0, lo_open=True, hi_open=False)
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            _fail("lr", "milestones", self.milestones, "positive and increasing")
        if self.schedule == "multistep" and not self.milestones:
            _fail("lr", "milestones", self.milestones, "multistep needs at least one milestone")
        _positive("lr", "div_factor", self.div_factor)
        _positive("lr", "final_div_factor", self.final_div_factor)
        if self.reference_batch is not None:
            _positive("lr", "reference_batch", self.reference_batch)


@dataclass
class BatchConfig:
    """`[batch]`: the global batch size (in samples) as a schedule, and the micro-batch.

    `size` is the global batch of `fixed`, the final size of `ramp` and the starting size of
    `adaptive`. `micro` is the largest micro-batch one rank runs at once (gradient accumulation
    covers the rest); None means the whole rank share in one go; "auto" the largest that fits
    in the memory of a device (chosen by the planner when the run starts, saved as a number).
    """

    schedule: str = "fixed"  # a name of regimen.registry.BATCH_SCHEDULES
    size: int = 32
    micro: int | Literal["auto"] | None = None
    # random: uniform over multiples of the rounding unit in [min, max], or `choices` / `probs`.
    # adaptive: the clip range of the batch.
    min: int | None = None
    max: int | None = None
    choices: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    # ramp: linear from `start` to `size` over `span` (counted in `unit`), or a stage table.
    start: int | None = None
    span: float | None = None
    unit: Unit = "steps"
    stages: list[dict[str, int | float]] = field(default_factory=list)
    # adaptive: follow the measured critical batch size.
    every: int = 50
    max_growth: float = 2.0

    def validate(self) -> None:
        if self.schedule not in BATCH_SCHEDULES:
            _fail("batch", "schedule", self.schedule, "allowed: " + ", ".join(BATCH_SCHEDULES.names()), options=BATCH_SCHEDULES.names())
        _positive("batch", "size", self.size)
        if isinstance(self.micro, int):
            _positive("batch", "micro", self.micro)
            if self.schedule == "fixed" and self.micro > self.size:
                _fail("batch", "micro", self.micro, f"must be <= batch.size ({self.size})")
        for key in ("min", "max", "start"):
            if getattr(self, key) is not None:
                _positive("batch", key, getattr(self, key))
        if self.min is not None and self.max is not None and self.min > self.max:
            _fail("batch", "min", self.min, f"must be <= batch.max ({self.max})")
        if self.schedule == "random":
            if self.choices:
                if any(c <= 0 for c in self.choices):
                    _fail("batch", "choices", self.choices, "every size must be > 0")
                if self.probs and len(self.probs) != len(self.choices):
                    _fail("batch", "probs", self.probs, f"one probability per choice ({len(self.choices)})")
                if self.probs and (any(p < 0 for p in self.probs) or not math.isclose(sum(self.probs), 1.0, rel_tol=1e-6)):
                    _fail("batch", "probs", self.probs, "non-negative and summing to 1")
            elif self.min is None or self.max is None:
                _fail("batch", "schedule", "random", "needs batch.min and batch.max, or batch.choices")
        if self.schedule == "ramp":
            if self.stages:
                last = 0.0
                for i, stage in enumerate(self.stages):
                    if set(stage) != {"until", "size"}:
                        _fail("batch", f"stages[{i}]", stage, "each stage is {until = N, size = B}")
                    if stage["until"] <= last or stage["size"] <= 0:
                        _fail("batch", f"stages[{i}]", stage, "`until` increasing and > 0, `size` > 0")
                    last = stage["until"]
            elif self.start is None or self.span is None:
                _fail("batch", "schedule", "ramp", "needs batch.start and batch.span, or batch.stages")
            elif self.span <= 0:
                _fail("batch", "span", self.span, "must be > 0")
        _positive("batch", "every", self.every)
        if self.max_growth < 1.0:
            _fail("batch", "max_growth", self.max_growth, "must be >= 1")
        if isinstance(self.micro, int):
            largest = {"ramp": self.size, "random": self.max or max(self.choices, default=0), "adaptive": self.max}.get(self.schedule)
            if largest and self.micro > largest:
                _fail("batch", "micro", self.micro, f"must be <= the largest batch of the {self.schedule} schedule ({largest})")
        # A key another schedule reads is ignored here: say so (torchtitan's rule) rather than drop it silently.
        readers = {"stages": "ramp", "start": "ramp", "span": "ramp", "choices": "random", "probs": "random"}
        ignored = [k for k, schedule in readers.items() if getattr(self, k) not in (None, []) and self.schedule != schedule]
        ignored += [k for k in ("min", "max") if getattr(self, k) is not None and self.schedule not in ("random", "adaptive")]
        if ignored:
            warnings.warn(
                f"batch.{', batch.'.join(ignored)} ignored: batch.schedule = {self.schedule!r} does not read "
                f"{'it' if len(ignored) == 1 else 'them'}",
                stacklevel=4,
            )

    @property
    def micro_size(self) -> int | None:
        """`micro` as the trainer runs it: a number or None, once "auto" is chosen (`regimen.micro`)."""
        assert self.micro != "auto", "batch.micro = 'auto' is chosen when the run starts (regimen.micro.choose_micro)"
        return self.micro


@dataclass
class TrainConfig:
    """`[train]`: the budget (exactly one of steps, samples, tokens, epochs) and the loop."""

    steps: int | None = None
    samples: int | None = None
    tokens: int | None = None
    epochs: float | None = None
    seed: int = 0
    eval_every: int = 100
    # Validation reads the same fixed samples for every strategy (whatever its batch size),
    # so val losses compare across runs; 0 = the whole validation set.
    eval_samples: int = 512
    log_every: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"
    clip: float = 1.0
    compile: bool = False
    device: str = "auto"
    # Non-finite loss or gradients: skip the step; after this many in a row, roll back.
    max_skips_in_row: int = 3
    lr_backoff: float = 0.5
    max_rollbacks: int = 3

    def validate(self) -> None:
        set_budgets = [k for k in ("steps", "samples", "tokens", "epochs") if getattr(self, k) is not None]
        if len(set_budgets) > 1:
            _fail("train", set_budgets[1], getattr(self, set_budgets[1]), f"give one budget only (train.{set_budgets[0]} is set too)")
        for key in set_budgets:
            _positive("train", key, getattr(self, key))
        if not 0 <= self.seed < 2**63:
            _fail("train", "seed", self.seed, "must be an integer in [0, 2^63)")
        _positive("train", "eval_every", self.eval_every)
        if self.eval_samples < 0:
            _fail("train", "eval_samples", self.eval_samples, "must be >= 0 (0 = the whole validation set)")
        _positive("train", "log_every", self.log_every)
        if self.clip < 0:
            _fail("train", "clip", self.clip, "must be >= 0 (0 disables clipping)")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            _fail("train", "device", self.device, "allowed: auto, cpu, cuda, cuda:N, mps")
        _positive("train", "max_skips_in_row", self.max_skips_in_row)
        _in_range("train", "lr_backoff", self.lr_backoff, 0.0, 1.0, lo_open=True, hi_open=False)
        if self.max_rollbacks < 0:
            _fail("train", "max_rollbacks", self.max_rollbacks, "must be >= 0")

    def budget(self) -> tuple[str, float]:
        """The budget as (unit, amount); steps = 1000 when none is given."""
        for key in ("steps", "samples", "tokens", "epochs"):
            if getattr(self, key) is not None:
                return key, float(getattr(self, key))
        return "steps", 1000.0


@dataclass
class ParallelConfig:
    """`[parallel]`: how the model is spread over the ranks, and the memory strategies.

    `activation_checkpointing` recomputes activations in the backward pass instead of keeping
    them: "block" recomputes the whole of each checkpointed module, "selective" all but its
    matmul outputs. The modules are the model's `blocks` (the built-in GPT), or those whose
    class is named in `checkpoint_modules`. `cpu_offload` keeps FSDP2's parameters, gradients
    and optimizer state in host memory. `memory_gib` is the memory of one device that
    `batch.micro = "auto"` plans for (default: measured, see `regimen.devices`).
    """

    mode: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    # FSDP2 mixed precision: parameters cast to bf16 for compute, gradients reduced in fp32.
    fsdp_bf16: bool = False
    activation_checkpointing: Literal["none", "block", "selective"] = "none"
    checkpoint_modules: list[str] = field(default_factory=list)
    cpu_offload: bool = False
    memory_gib: float | None = None

    def validate(self) -> None:
        if self.cpu_offload and self.mode != "fsdp":
            _fail("parallel", "cpu_offload", True, f"offloads FSDP2's shards: needs parallel.mode = 'fsdp', not {self.mode!r}")
        if self.memory_gib is not None:
            _positive("parallel", "memory_gib", self.memory_gib)
        for name in self.checkpoint_modules:
            if not name.isidentifier():
                _fail("parallel", "checkpoint_modules", self.checkpoint_modules, "module class names, e.g. ['Block']")


@dataclass
class CheckpointConfig:
    """`[checkpoint]`: cadence (steps and/or minutes; 0 = only at the end), how many to keep, and how they are written."""

    every: int = 0
    every_minutes: float = 0.0
    keep: int = 2
    # Write the tensors on a background thread: the step loop pays for a copy of the model and
    # optimizer state, not for the write (docs/reliability.md, "Checkpoints"). Unset: in the
    # background on CUDA, synchronously on CPU, where the step's threads use every core and a
    # write beside them slows the steps it overlaps by more than it saves.
    async_save: bool | None = None

    def validate(self) -> None:
        if self.every < 0:
            _fail("checkpoint", "every", self.every, "must be >= 0 (0 = only at the end)")
        if self.every_minutes < 0:
            _fail("checkpoint", "every_minutes", self.every_minutes, "must be >= 0")
        _positive("checkpoint", "keep", self.keep)


@dataclass
class ObserveConfig:
    """`[observe]`: what is measured and where it goes besides metrics.jsonl."""

    noise_scale: bool = False
    noise_ema: float = 0.95
    tensorboard: bool = False
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    report: bool = True
    # Tokens of text the built-in GPT writes after each evaluation, on text sources (0 = none).
    samples: int = 64
    # More loggers beside metrics.jsonl and TensorBoard (the same rows; docs/data.md, "Loggers").
    mlflow: bool = False
    mlflow_uri: str = ""  # "" = a file store in the run directory (mlruns/); else a tracking URI
    mlflow_experiment: str = "regimen"
    wandb: bool = False
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: files under the run directory, `wandb sync` later
    wandb_project: str = "regimen"

    def validate(self) -> None:
        _in_range("observe", "noise_ema", self.noise_ema, 0.0, 1.0, lo_open=False, hi_open=True)
        if self.samples < 0:
            _fail("observe", "samples", self.samples, "must be >= 0 (0 = no samples)")
        for key in ("mlflow_experiment", "wandb_project"):
            if not getattr(self, key).strip():
                _fail("observe", key, getattr(self, key), "must not be empty")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "lr": LRConfig,
    "batch": BatchConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "observe": ObserveConfig,
}


@dataclass
class Strategy:
    """The whole training strategy: optimizer x LR schedule x batch schedule x parallelism.

    Example:
        >>> s = Strategy.from_dict({"optimizer": {"name": "sgd", "lr": 0.1}})
        >>> s.optimizer.name
        'sgd'
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any], where: str = "") -> Strategy:
        """Build and validate a strategy from a nested mapping (a parsed TOML file)."""
        sections: dict[str, Any] = {}
        for name, table in tree.items():
            if name not in SECTIONS:
                _unknown(where, name, SECTIONS, what="section")
            if not isinstance(table, Mapping):
                _fail(name, "", table, "must be a table of keys")
            sections[name] = _build_section(name, SECTIONS[name], table)
        strategy = cls(**sections)
        strategy.validate()
        return strategy

    @classmethod
    def default(cls, overrides: Sequence[str] = ()) -> Strategy:
        """The built-in default task (`regimen/default_task.toml`), what every command runs without a CONFIG.

        >>> Strategy.default(["train.steps=20"]).optimizer.name, Strategy.default(["train.steps=20"]).train.steps
        ('muon', 20)
        """
        return cls.load(DEFAULT_TASK, overrides)

    @classmethod
    def for_python(cls, tree: Mapping[str, Any]) -> Strategy:
        """A strategy for a model and data handed over from Python (`rg.fit`, `rg.tune`, `lr_find`): `tree`'s
        sections beside the two that say so.

        >>> Strategy.for_python({"optimizer": {"name": "adam"}}).model.name
        'python:module'
        """
        return cls.from_dict({"model": {"name": "python:module"}, "data": {"source": "python"}, **tree})

    @classmethod
    def from_cli(cls, config: str | Path | None, overrides: Sequence[str] = ()) -> Strategy:
        """A command's strategy: CONFIG with its overrides, or the default task when no CONFIG is given."""
        return cls.load(config, overrides) if config is not None else cls.default(overrides)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Strategy:
        """Read a TOML file and apply `section.key=value` overrides (`apply_overrides`).

        `path = None` starts from the sections' own defaults (a blank strategy, for building one
        in code); commands use `from_cli`, whose "no CONFIG" is the default task.
        """
        tree: dict[str, Any] = read_toml(path) if path is not None else {}
        apply_overrides(tree, overrides)
        return cls.from_dict(tree)

    def replace(self, overrides: Mapping[str, Any]) -> Strategy:
        """A copy with dotted keys set, e.g. `{"optimizer.lr": 0.1}`; validated.

        As on the command line, a new `optimizer.name` drops the hyperparameters it does not take.
        """
        tree = self.to_dict()
        if "optimizer.name" in overrides:
            _drop_foreign_keys(tree, str(overrides["optimizer.name"]), overrides.keys())
        for key, value in overrides.items():
            _set_dotted(tree, key, value)
        return Strategy.from_dict(tree)

    def validate(self) -> None:
        """Check each section, then the combinations no single section can judge."""
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.optimizer.name == "gd" and self.batch.schedule != "full":
            _fail(
                "batch",
                "schedule",
                self.batch.schedule,
                "optimizer gd is full-batch gradient descent: use batch.schedule = 'full' (or optimizer sgd)",
            )
        unit, amount = self.train.budget()
        if unit == self.lr.unit and self.lr.warmup >= amount and self.lr.warmup > 0:
            _fail("lr", "warmup", self.lr.warmup, f"must be shorter than the budget (train.{unit} = {amount:g})")
        if self.optimizer.name.startswith("schedulefree") and self.lr.schedule != "constant":
            warnings.warn(
                f"optimizer {self.optimizer.name} replaces the LR schedule (it averages iterates); "
                f"lr.schedule = {self.lr.schedule!r} multiplies it: use lr.schedule = 'constant' unless you mean to",
                stacklevel=3,
            )
        if self.parallel.mode == "fsdp" and not OPTIMIZERS[self.optimizer.name].meta.get("fsdp", True):
            _fail(
                "optimizer",
                "name",
                self.optimizer.name,
                "it reads whole-tensor norms, which FSDP2's shards do not have: use parallel.mode = 'ddp'",
            )
        # A built-in model needs its kind of data: the GPT token windows, the MLP feature vectors.
        needs = MODELS[self.model.name].meta["data"] if self.model.name in MODELS else "any"
        has = DATA_SOURCES[self.data.kind].meta["kind"]
        if needs != "any" and has not in (needs, "any"):
            fitting = " or ".join(
                repr(f"{e.name}:PATH" if e.meta["path"] else e.name) for e in DATA_SOURCES.entries() if e.meta["kind"] == needs
            )
            _fail("model", "name", self.model.name, f"it needs {needs} data: use data.source = {fitting}, not {self.data.source!r}")

    # ---- derived values ----------------------------------------------------------------

    def resolve(self) -> Strategy:
        """Fill every derived value (None / "auto") so that the saved strategy is explicit."""
        s = copy_strategy(self)
        if s.lr.scale_with_batch == "auto":
            # Linear for SGD-like methods (Goyal et al. 2017), sqrt for adaptive ones (Malladi et al. 2022).
            s.lr.scale_with_batch = "linear" if OPTIMIZERS[s.optimizer.name].meta["family"] == "sgd" else "sqrt"
        if s.lr.reference_batch is None:
            s.lr.reference_batch = s.batch.size
        if s.train.budget()[0] == "steps" and s.train.steps is None:
            s.train.steps = int(s.train.budget()[1])
        return s

    # ---- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A nested plain-data mapping (None values dropped: TOML has no null)."""
        return {name: _drop_none(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    def to_toml(self) -> str:
        """The strategy as TOML text, one table per section."""
        return dumps_toml(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write `to_toml()` to `path`."""
        Path(path).write_text(self.to_toml())

    def flat(self) -> dict[str, Any]:
        """`{"section.key": value}` for every key (for diffs between runs)."""
        return flatten(self.to_dict())


# Keys a resumed run may change without `--allow-change`: they decide how long it trains, how
# often it logs, evaluates and saves, and what it shows, never what a step computes. (The
# budget moves a decaying LR schedule's end: that is what extending a run means.)
SAFE_TO_CHANGE = frozenset(
    {
        "train.steps",
        "train.samples",
        "train.tokens",
        "train.epochs",
        "train.log_every",
        "train.eval_every",
        "checkpoint.every",
        "checkpoint.every_minutes",
        "checkpoint.keep",
        "parallel.memory_gib",  # read only to choose batch.micro = "auto" at the start; a resume keeps that choice
        "checkpoint.async_save",
    }
)
# ... and every observe key but the noise estimator's, which is part of the training state.
_UNSAFE_OBSERVE = frozenset({"observe.noise_scale", "observe.noise_ema"})


def safe_to_change(key: str) -> bool:
    """Whether a resumed run may change `key` (`section.key`) without `--allow-change`.

    >>> safe_to_change("train.steps"), safe_to_change("observe.progress"), safe_to_change("optimizer.lr")
    (True, True, False)
    """
    return key in SAFE_TO_CHANGE or (key.startswith("observe.") and key not in _UNSAFE_OBSERVE)


def same_value(a: Any, b: Any) -> bool:
    """Strategy values equal (`1 == 1.0`, but `true != 1`).

    >>> same_value(1, 1.0), same_value(True, 1)
    (True, False)
    """
    # In Python 1 == 1.0 == True; in a strategy a bool is never the same as a number.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested tables to dotted keys, down to `section.key`: the one flattener of strategies.

    A key's own value may be a table (`model.kwargs`), and keys already dotted are kept, so a
    `[[strategies]]` table that mixes both forms flattens too.

    >>> flatten({"optimizer": {"name": "sgd", "lr": 0.1}, "model.kwargs": {"h": 2}})
    {'optimizer.name': 'sgd', 'optimizer.lr': 0.1, 'model.kwargs': {'h': 2}}
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if "." not in key and isinstance(value, Mapping):
            for name, item in value.items():
                flat[f"{key}.{name}"] = item
        else:
            flat[key] = value
    return flat


def copy_strategy(s: Strategy) -> Strategy:
    """A deep copy (the sections are small)."""
    import copy

    return copy.deepcopy(s)


# --------------------------------------------------------------------------------------------
# TOML reading, overrides and writing
# --------------------------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a `UserError`."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {str(p)!r} is a directory; give a strategy TOML file")
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def parse_value(text: str) -> Any:
    """Parse an override's value as a TOML value, falling back to a bare string.

    >>> parse_value("3e-4"), parse_value("[0.9, 0.95]"), parse_value("adam")
    (0.0003, [0.9, 0.95], 'adam')
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> None:
    """Apply command-line overrides to a parsed strategy file, in place, as `Strategy.load` does.

    A budget given as an override (`train.tokens=1e6`) replaces the file's budget in another unit
    rather than clashing with it; an `optimizer.name` given as an override drops the file's
    hyperparameters that the new algorithm does not take (`betas` for sgd).
    """
    budget_keys = {f"train.{k}" for k in BUDGET_UNITS}
    overridden = {item.partition("=")[0].strip(): item.partition("=")[2].strip() for item in overrides}
    if overridden.keys() & budget_keys:
        for key in budget_keys - overridden.keys():
            tree.get("train", {}).pop(key.split(".")[1], None)
    if "optimizer.name" in overridden:
        _drop_foreign_keys(tree, str(parse_value(overridden["optimizer.name"])), overridden.keys())
    for item in overrides:
        apply_override(tree, item)


def _drop_foreign_keys(tree: dict[str, Any], name: str, overridden: Iterable[str]) -> None:
    """Another algorithm named over a file keeps only the file's keys it takes (not AdamW's betas for sgd)."""
    table = tree.get("optimizer", {})
    for key in list(table):
        foreign = key in ALGORITHM_KEYS and key not in (optimizer_keys(name) if name in OPTIMIZERS else ALGORITHM_KEYS)
        if foreign and f"optimizer.{key}" not in overridden:
            del table[key]


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override to a nested mapping, in place."""
    if "=" not in item:
        raise UserError(f"override {item!r}: expected section.key=value")
    key, _, text = item.partition("=")
    _set_dotted(tree, key.strip(), parse_value(text.strip()))


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"override key {key!r}: expected section.key, e.g. optimizer.lr")
    section, name = parts
    if section not in SECTIONS:
        _unknown("", section, SECTIONS, what="section")
    table = tree.setdefault(section, {})
    table[name] = value


def dumps_toml(tree: Mapping[str, Mapping[str, Any]]) -> str:
    """Write a two-level tree (sections of scalars, lists, inline tables) as TOML."""
    lines: list[str] = []
    for section, table in tree.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _drop_none(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if v is not None}


# --------------------------------------------------------------------------------------------
# Typed section building and the one-line errors
# --------------------------------------------------------------------------------------------


def _build_section(section: str, cls: type, table: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, raw in table.items():
        if key not in hints:
            _unknown(section, key, names)
        values[key] = _coerce(section, key, raw, hints[key])
    return cls(**values)


def _coerce(section: str, key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting int -> float where harmless."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and value.lower() == "none" and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(section, key, value, option)
            except UserError as e:
                errors.append(e)
        choices = [a for o in options if get_origin(o) is Literal for a in get_args(o)]
        if choices:  # e.g. `int | Literal["auto"]`: name both forms, not just the first that failed
            forms = [_KIND.get(o, str(o)) for o in options if o is not type(None) and get_origin(o) is not Literal]
            nullable = ", or none" if type(None) in options else ""
            _fail(section, key, value, f"expected {' or '.join(forms)}, {', '.join(map(repr, choices))}{nullable}")
        raise errors[0]
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            _fail(section, key, value, "allowed: " + ", ".join(map(str, allowed)), options=[str(a) for a in allowed])
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(section, key, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(section, key, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(section, key, value, "expected a number")
        if not math.isfinite(value):
            _fail(section, key, value, "expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(section, key, value, "expected a string")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(section, key, value, "expected a list, e.g. [1, 2]")
        (item_tp,) = get_args(tp)
        return [_coerce(section, key, v, item_tp) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            _fail(section, key, value, "expected a table, e.g. {a = 1}")
        _, item_tp = get_args(tp)
        if item_tp is Any:
            return dict(value)
        return {k: _coerce(section, key, v, item_tp) for k, v in value.items()}
    if tp is Any:
        return value
    raise AssertionError(f"unsupported annotation {tp!r} for {section}.{key}")


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _fail(section: str, key: str, value: Any, allowed: str, options: Any = None) -> typing.NoReturn:
    where = f"{section}.{key}" if key else section
    hint = ""
    if options is not None and isinstance(value, str):
        close = difflib.get_close_matches(value, list(options), n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise UserError(f"{where} = {_fmt(value)}: {allowed}{hint}")


def _unknown(section: str, key: str, known: Any, what: str = "key") -> typing.NoReturn:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f"{section}.{key}" if section else key
    raise UserError(f"unknown {what} {where!r}{hint} (known: {', '.join(known)})")


def _positive(section: str, key: str, value: float) -> None:
    if value <= 0:
        _fail(section, key, value, "must be > 0")


def _in_range(section: str, key: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        _fail(section, key, value, f"must be in {left}{lo:g}, {hi:g}{right}")
