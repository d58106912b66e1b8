"""A model factory whose process stops itself (SIGSTOP) where a test says, for the kill tests.

`model.name=tests.freezing_model:factory` builds the tiny GPT of the resume tests, weight for
weight (`model.kwargs` as `tests.failing_model.factory`'s sizes). The environment variable
`FREEZE` names the point where the process of rank 0 stops, so that the test's SIGKILL lands
exactly there on any speed of machine; the strategy, and so the run, is the same in every attempt:

- `forward:N`: the N-th training forward of this process (one per step without micro-batches);
- `save:DIR`: a save whose temporary directory DIR exists takes the model's state (the save has
  begun, nothing of it is published).

The other ranks wait for rank 0 in their next collective. Without `FREEZE` nothing stops.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch

from regimen.models import GPT, GPTConfig

ENV = "FREEZE"


def _stop_if(point: str) -> None:
    if os.environ.get(ENV) == point and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGSTOP)


class FreezingGPT(GPT):
    """The built-in GPT, stopping its own process at the point `FREEZE` names."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg)
        self.calls = 0  # training forwards of this process

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            _stop_if(f"forward:{self.calls}")
        return super().forward(idx)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        point = os.environ.get(ENV, "")
        if point.startswith("save:") and Path(point[len("save:") :]).is_dir():
            _stop_if(point)
        return super().state_dict(*args, **kwargs)


def factory(context: int = 16, n_layer: int = 1, d_model: int = 32, dropout: float = 0.0) -> FreezingGPT:
    """A byte-level `FreezingGPT` (vocab 256, the built-in corpora's): the built-in GPT of these sizes."""
    return FreezingGPT(GPTConfig(256, context, n_layer, 2, d_model, dropout))
