"""Model factories that are wrong in the ways a user's can be, for the one-line error tests."""

from __future__ import annotations

import torch
from torch import nn

from regimen.models import GPT, GPTConfig

not_callable = 42  # `model.name = "tests.user_models:not_callable"`


def no_parameters() -> nn.Module:
    """A model with nothing to train."""
    return nn.Identity()


class Bigram(nn.Module):
    """Next-token logits from the current token only, over `vocab` outputs."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(256, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx)


def too_few_outputs() -> nn.Module:
    """100 outputs per position for byte data (256 tokens)."""
    return Bigram(100)


def tiny(width: int = 16) -> nn.Module:
    """A tiny byte-level GPT; takes `width` only."""
    return GPT(GPTConfig(256, 16, 1, 2, width, 0.0))
