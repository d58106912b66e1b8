"""A model factory that fails on purpose, for the distributed fault tests.

`model.name=tests.failing_model:factory` with `model.kwargs={mode = "raise", rank = 1, step = 3}`
builds a small GPT whose training forward on rank `rank` raises (`mode = "raise"`), blocks
forever (`mode = "hang"`, a stuck rank) or SIGKILLs its own process (`mode = "kill"`, a lost
worker; only in torchrun's first attempt, so that the restarted group trains on) at optimizer
step `step`; every other rank trains on and must be stopped by the failure, never left waiting.
With `after = PATH`, the fault waits until PATH exists (a checkpoint the test expects published:
saved in the background, it may still be in flight a step or two after its save began).
The fault is tied to a step, not to a moment, so a test sees the same run on any speed of machine.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Literal

import torch

from regimen.models import GPT, GPTConfig

MESSAGE = "tests.failing_model: deliberate failure"

Mode = Literal["raise", "hang", "kill"]


class FailingGPT(GPT):
    """The built-in GPT (so FSDP2 finds its `blocks`) with a fault at one step on one rank."""

    def __init__(self, cfg: GPTConfig, mode: Mode, rank: int, step: int, after: str = "") -> None:
        super().__init__(cfg)
        self.mode, self.fail_rank, self.fail_step, self.after = mode, rank, step, after
        self.calls = 0  # training forwards so far: one per step with one micro-batch

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.fail_step and int(os.environ.get("RANK", "0")) == self.fail_rank:
                if self.after:
                    from tests.freezing_model import wait_for

                    wait_for(Path(self.after))
                if self.mode == "raise":
                    raise RuntimeError(f"{MESSAGE} on rank {self.fail_rank} at step {self.fail_step}")
                if self.mode == "kill":
                    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                        os.kill(os.getpid(), signal.SIGKILL)
                else:
                    time.sleep(3600)  # a stuck rank: the others must time out, not wait an hour
        return super().forward(idx)


def factory(
    mode: Mode = "raise",
    rank: int = 1,
    step: int = 3,
    context: int = 16,
    n_layer: int = 1,
    d_model: int = 32,
    dropout: float = 0.0,
    after: str = "",
) -> FailingGPT:
    """A byte-level `FailingGPT` (vocab 256, the built-in corpora's): the built-in GPT of these sizes, weight for weight."""
    return FailingGPT(GPTConfig(256, context, n_layer, 2, d_model, dropout), mode, rank, step, after)
