"""A model factory that fails on purpose, for the distributed fault tests.

`model.name=tests.failing_model:factory` with `model.kwargs={mode = "raise", rank = 1, step = 3}`
builds a small GPT whose training forward on rank `rank` raises (`mode = "raise"`) or blocks
forever (`mode = "hang"`, a stuck rank) at optimizer step `step`; every other rank trains on
and must be stopped by the failure, never left waiting.
"""

from __future__ import annotations

import os
import time
from typing import Literal

import torch

from regimen.models import GPT, GPTConfig

MESSAGE = "tests.failing_model: deliberate failure"


class FailingGPT(GPT):
    """The built-in GPT (so FSDP2 finds its `blocks`) with a fault at one step on one rank."""

    def __init__(self, cfg: GPTConfig, mode: Literal["raise", "hang"], rank: int, step: int) -> None:
        super().__init__(cfg)
        self.mode, self.fail_rank, self.fail_step = mode, rank, step
        self.calls = 0  # training forwards so far: one per step with one micro-batch

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.fail_step and int(os.environ.get("RANK", "0")) == self.fail_rank:
                if self.mode == "raise":
                    raise RuntimeError(f"{MESSAGE} on rank {self.fail_rank} at step {self.fail_step}")
                time.sleep(3600)  # a stuck rank: the others must time out, not wait an hour
        return super().forward(idx)


def factory(
    mode: Literal["raise", "hang"] = "raise", rank: int = 1, step: int = 3, context: int = 16, n_layer: int = 1, d_model: int = 32
) -> FailingGPT:
    """A byte-level `FailingGPT` (vocab 256, the built-in corpora's)."""
    return FailingGPT(GPTConfig(256, context, n_layer, 2, d_model, 0.0), mode, rank, step)
