"""Optimizers by name, built on `torch.optim` wherever torch ships the algorithm.

`build_optimizer(model, cfg)` turns the `[optimizer]` section into a `torch.optim.Optimizer`
with regimen's parameter groups (no weight decay on biases, norms and embeddings; Muon on the
hidden matrices and AdamW on the rest). Each group remembers its peak LR as `initial_lr`; the
trainer sets `group["lr"] = initial_lr * factor` every step, so the schedule is a function of
progress and never of how often something was stepped.

Implementation: on CPU torch defaults to a per-tensor loop (foreach is used on CUDA only);
`implementation = "auto"` asks for the fused kernel where torch has one (SGD, Adagrad, Adam,
AdamW, on CPU and CUDA) and for foreach elsewhere. `benchmarks/optimizer_step.py` measures the
gain.

Example:
    >>> from torch import nn
    >>> from regimen.strategy import OptimizerConfig
    >>> opt = build_optimizer(nn.Linear(3, 1), OptimizerConfig(name="sgd", lr=0.1))
    >>> type(opt).__name__, opt.param_groups[0]["lr"]
    ('SGD', 0.1)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from regimen.optim.closure import evaluate_closure
from regimen.optim.cpu import is_dtensor
from regimen.optim.groups import decay_groups, muon_split, split_decay
from regimen.registry import OPTIMIZERS
from regimen.strategy import OptimizerConfig

NAMES = OPTIMIZERS.names()


def _implementation(name: str, choice: str, params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """torch keyword arguments for the implementation asked for.

    `auto`: fused where torch has a kernel; foreach on CUDA otherwise; on CPU without a fused
    kernel, torch's default per-tensor loop, which measures faster there than foreach
    (benchmarks/optimizer_step.py). regimen's own optimizers pick their own (see regimen.optim.cpu).
    """
    meta = OPTIMIZERS[name].meta
    on_cuda = all(p.device.type == "cuda" for p in params)
    # Of torch's fused kernels only Adam's take FSDP2's DTensor shards (SGD's and Adagrad's have
    # no sharding rule): other sharded models get foreach, which DTensor runs op by op.
    plain = not any(is_dtensor(p) for p in params)  # (a fake tensor of `regimen plan`'s trace is plain)
    fused_ok = meta.get("fused", False) and (plain or meta.get("fused_dtensor", False))
    fused_ok = fused_ok and all(p.device.type in ("cpu", "cuda") for p in params)
    if choice == "loop":
        return {"foreach": False} if meta.get("foreach") else {}
    if choice in ("auto", "fused") and fused_ok:
        return {"fused": True}
    if choice == "fused":
        where = "" if plain else " for FSDP2's sharded parameters"
        warnings.warn(f"optimizer.implementation = 'fused': torch has no fused {name}{where}; using foreach", stacklevel=3)
    if (choice == "foreach" or choice == "fused" or on_cuda or not plain) and meta.get("foreach"):
        return {"foreach": True}
    return {}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names (regimen.registry.OPTIMIZERS), over the model's parameters in regimen's groups."""
    entry = OPTIMIZERS[cfg.name]
    if entry.meta.get("hidden_only"):
        return _build_hidden_and_rest(model, cfg, entry.load())
    kwargs = {**entry.meta.get("implied", {}), **cfg.kwargs()}
    if cfg.name == "adafactor" and "eps" in kwargs:
        kwargs["eps"] = (None, kwargs["eps"])  # torch's Adafactor takes (eps1, eps2)
    torch_kernels = entry.target.startswith("torch.")
    if not torch_kernels and cfg.implementation not in ("auto", "foreach"):
        warnings.warn(f"optimizer.implementation = {cfg.implementation!r} is ignored for {cfg.name}: it picks its own", stacklevel=2)
    groups = decay_groups(model, cfg.weight_decay, cfg.decay_all)
    params = [p for g in groups for p in g["params"]]
    if torch_kernels:
        kwargs.update(_implementation(cfg.name, cfg.implementation, params))
    optimizer = entry.load()(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
    _remember_peak(optimizer)
    return optimizer


def _build_hidden_and_rest(model: nn.Module, cfg: OptimizerConfig, ctor: Callable[..., torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """Muon (`ctor`) on the hidden weight matrices, AdamW on the rest, stepped as one."""
    hidden, rest = muon_split(model)
    kwargs = cfg.kwargs()
    adam_keys = {k: kwargs.pop(k) for k in ("betas", "eps") if k in kwargs}
    # torch.optim.Muon rejects eps of AdamW's meaning; keep the two key sets apart.
    # One peak LR for both halves: scale Muon's update to AdamW's RMS (Moonshot's rule), so the
    # embeddings, head and norms on AdamW are not driven at a Muon-sized LR.
    kwargs.setdefault("adjust_lr_fn", "match_rms_adamw")
    muon_groups = split_decay(hidden, model, cfg.weight_decay, cfg.decay_all)
    muon = ctor(muon_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs) if muon_groups else None
    adamw_groups = split_decay(rest, model, cfg.weight_decay, cfg.decay_all)
    impl = _implementation("adamw", cfg.implementation, rest)
    adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **adam_keys, **impl) if adamw_groups else None
    combined = CombinedOptimizer([o for o in (muon, adamw) if o is not None])
    _remember_peak(combined)
    return combined


def _remember_peak(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one (Muon + AdamW).

    `param_groups` is the concatenation of the inner optimizers' groups (the same dicts), so
    setting a group's `lr` reaches the optimizer that owns it.

    Example:
        >>> a = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
        >>> b = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=0.01)
        >>> len(CombinedOptimizer([a, b]).param_groups)
        2
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        # Deliberately not calling Optimizer.__init__: the groups and state belong to the
        # inner optimizers; these attributes are views over them.
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(state_dict[str(i)])

    def __repr__(self) -> str:
        return "CombinedOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"


def set_train_mode(optimizer: torch.optim.Optimizer, train: bool) -> None:
    """Switch optimizers that have a train/eval mode (schedule-free) to the given mode."""
    inner = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for o in inner:
        method = getattr(o, "train" if train else "eval", None)
        if callable(method):
            method()


__all__ = ["NAMES", "CombinedOptimizer", "build_optimizer", "set_train_mode"]
