"""Built-in models: a nanoGPT-like byte-level GPT and an MLP classifier.

Any `torch.nn.Module` trains with regimen; these two are the models of the built-in tasks.
`build_model(cfg, vocab_size=..., num_features=..., num_classes=...)` makes one from the
`[model]` section; a `package.module:factory` name calls that factory with `[model] kwargs`.

Example:
    >>> import torch
    >>> gpt = GPT(GPTConfig(vocab_size=256, context=16, n_layer=1, n_head=2, d_model=32))
    >>> gpt(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from regimen.errors import UserError
from regimen.registry import MODELS
from regimen.strategy import ModelConfig


@dataclass
class GPTConfig:
    """The shape of a GPT: vocabulary, context length, depth, heads, width, dropout."""

    vocab_size: int = 256
    context: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (b, heads, t, head_dim): the layout scaled_dot_product_attention expects.
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer with learned positions and tied input/output embeddings.

    `forward(idx)` returns logits of shape (batch, time, vocab). The blocks are in
    `self.blocks` so that FSDP2 can shard each one.

    Example:
        >>> m = GPT(GPTConfig(context=8, n_layer=1, n_head=1, d_model=16))
        >>> sum(p.numel() for p in m.parameters()) > 0
        True
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: fewer parameters, better small models
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance
        # independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        assert t <= self.cfg.context, f"sequence of {t} exceeds the context {self.cfg.context}"
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class MLP(nn.Module):
    """Dense layers with ReLU between them: `MLP(100, [128], 10)` is Dense 100 -> 128 ReLU -> 10.

    Example:
        >>> MLP(4, [8], 3)(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, num_features: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Conv 3x3 + ReLU + 2x2 max-pool per width in `channels`, then a linear classifier: a small vision net.

    Example:
        >>> CNN(16, [8, 16], 10)(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, image_size: int, channels: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width, side = 1, image_size
        for ch in channels:
            layers += [nn.Conv2d(width, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width, side = ch, max(1, side // 2)
        layers += [nn.Flatten(), nn.Linear(width * side * side, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(cfg: ModelConfig, *, vocab_size: int = 256, num_features: int = 100, num_classes: int = 10) -> nn.Module:
    """The model the `[model]` section names, sized for the data it will see.

    A registered name (regimen.registry.MODELS) or `package.module:factory`, called with
    `[model] kwargs`; any failure of a user's factory is one line naming it.
    """
    sizes = {"vocab_size": vocab_size, "num_features": num_features, "num_classes": num_classes}
    if cfg.name in MODELS:
        return MODELS[cfg.name].load()(cfg, **sizes)
    return _user_model(cfg)


def build_gpt(cfg: ModelConfig, *, vocab_size: int, num_features: int, num_classes: int) -> nn.Module:
    """`gpt`: the built-in GPT for a token vocabulary."""
    return GPT(GPTConfig(vocab_size, cfg.context, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.dropout))


def build_mlp(cfg: ModelConfig, *, vocab_size: int, num_features: int, num_classes: int) -> nn.Module:
    """`mlp`: the built-in classifier for feature vectors."""
    return MLP(num_features, list(cfg.hidden), num_classes)


def build_cnn(cfg: ModelConfig, *, vocab_size: int, num_features: int, num_classes: int) -> nn.Module:
    """`cnn`: the built-in conv net for square single-channel images (`num_features` pixels), `model.hidden` channels."""
    side = math.isqrt(num_features)
    return CNN(side, list(cfg.hidden), num_classes)


def _user_model(cfg: ModelConfig) -> nn.Module:
    """`package.module:factory`: import it (this runs the module's code, like any import) and call it with `[model] kwargs`."""
    module_name, _, attr = cfg.name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"model.name = {cfg.name!r}: cannot import it ({e})") from None
    if not callable(factory):
        raise UserError(f"model.name = {cfg.name!r}: {attr} is a {type(factory).__name__}, not a callable that builds a model")
    try:
        inspect.signature(factory).bind(**cfg.kwargs)
    except TypeError as e:
        raise UserError(f"model.kwargs = {cfg.kwargs}: {cfg.name} does not take them ({e})") from None
    except ValueError:
        pass  # a builtin without a signature: let the call decide
    model = factory(**cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name = {cfg.name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"model.name = {cfg.name!r}: the model has no trainable parameters")
    return model


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
