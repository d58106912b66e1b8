"""Parameter groups: which parameters get weight decay, and which are Muon's.

Weight decay pulls weights towards zero; on biases, normalisation gains and embeddings that
only hurts (it shrinks scales the network needs), so by default they get none. A weight
shared between modules (the GPT's tied embedding and output head) counts once, as an embedding.

Muon orthogonalises updates of 2-D weight matrices; it is meant for the hidden layers only.
Embeddings, the output layer (the last `nn.Linear` of the model), biases and norms go to
AdamW, as in Keller Jordan's reference setup.

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    >>> [len(g["params"]) for g in decay_groups(m, weight_decay=0.1)]
    [2, 4]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

_NO_DECAY_MODULES = (
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _params_of(model: nn.Module, kinds: tuple[type, ...]) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)}


def decay_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict[str, Any]]:
    """[decayed weights, undecayed rest]: biases, norms and embeddings get no decay."""
    return split_decay([p for _, p in _unique_params(model)], model, weight_decay, decay_all)


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden 2-D weight matrices for Muon, everything else for AdamW)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    output = {id(linears[-1].weight)} if linears else set()
    excluded = _params_of(model, _NO_DECAY_MODULES) | output
    hidden: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for _, p in _unique_params(model):
        (hidden if p.ndim == 2 and id(p) not in excluded else rest).append(p)
    return hidden, rest


def split_decay(params: Sequence[torch.Tensor], model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """Groups over a subset of the model's parameters, with the same decay rule."""
    if decay_all or weight_decay == 0:
        return [{"params": params, "weight_decay": weight_decay}] if params else []
    no_decay = _params_of(model, _NO_DECAY_MODULES)
    decay = [p for p in params if p.ndim >= 2 and id(p) not in no_decay]
    rest = [p for p in params if not (p.ndim >= 2 and id(p) not in no_decay)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]
