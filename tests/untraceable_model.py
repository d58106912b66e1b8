"""A model that runs on real tensors but not on fake ones, for `regimen plan`'s bad-input test.

`model.name=tests.untraceable_model:factory`: its forward reads its input's data through NumPy,
which a fake tensor (shape without data) cannot give.
"""

from __future__ import annotations

import torch
from torch import nn


class ReadsData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embed(torch.from_numpy(idx.numpy()))


def factory() -> nn.Module:
    return ReadsData()
