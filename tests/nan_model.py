"""A model factory whose loss turns NaN on bad data, for the non-finite-loss tests.

`model.name=tests.nan_model:factory` builds a small byte-level GPT whose training forward
returns NaN logits for every sample that contains the byte `poison` (255 by default: it never
occurs in UTF-8 text). A test writes that byte into the samples that chosen steps read, so the
bad data, not a step counter, causes the NaN: a rollback that did not skip the offending data
would meet it again.
"""

from __future__ import annotations

import torch

from regimen.models import GPT, GPTConfig

POISON = 255


class NaNGPT(GPT):
    """The built-in GPT, with NaN logits for training samples that hold the poison byte."""

    def __init__(self, cfg: GPTConfig, poison: int) -> None:
        super().__init__(cfg)
        self.poison = poison

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = super().forward(idx)
        if self.training:
            bad = (idx == self.poison).any(dim=1)
            logits = torch.where(bad[:, None, None], torch.full_like(logits, float("nan")), logits)
        return logits


def factory(poison: int = POISON, context: int = 16, n_layer: int = 1, d_model: int = 32) -> NaNGPT:
    """A byte-level `NaNGPT` (vocab 256, the built-in corpora's)."""
    return NaNGPT(GPTConfig(256, context, n_layer, 2, d_model, 0.0), poison)
