"""A model factory whose process stops itself (SIGSTOP) where a test says, for the kill tests.

`model.name=tests.freezing_model:factory` builds the tiny GPT of the resume tests, weight for
weight (`model.kwargs` as `tests.failing_model.factory`'s sizes). The environment variable
`FREEZE` names the point where the process of rank 0 stops, so that the test's SIGKILL lands
exactly there on any speed of machine; the strategy, and so the run, is the same in every attempt:

- `forward:N`: the N-th training forward of this process (one per step without micro-batches);
  `forward:N:PATH`: the same, once PATH exists (a checkpoint the test expects published: saved in
  the background, it may still be in flight a step or two after its save began);
- `save:DIR`: a save whose temporary directory DIR exists takes the model's state (the save has
  begun, nothing of it is published);
- `write:DIR:N`: DCP's writer is about to write the tensors into DIR, and this process has run
  its N-th training forward: with `checkpoint.async_save`, the background write waits there while
  the step loop trains on to step N, then the process stops, the write in flight (a synchronous
  save would never get there: its step loop waits for the write, and the test times out).

The other ranks wait for rank 0 in their next collective. Without `FREEZE` nothing stops.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from regimen.models import GPT, GPTConfig

ENV = "FREEZE"
FORWARDS = [0]  # training forwards of this process


def _stop_if(point: str) -> None:
    if os.environ.get(ENV) == point and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGSTOP)


def wait_for(path: Path, timeout: float = 60.0) -> None:
    """Sleep until `path` exists (a checkpoint published by a background save), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


class FreezingGPT(GPT):
    """The built-in GPT, stopping its own process at the point `FREEZE` names."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__(cfg)
        self.calls = 0  # training forwards of this process

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            FORWARDS[0] += 1
            point = os.environ.get(ENV, "")
            if point.startswith(f"forward:{self.calls}:"):
                wait_for(Path(point.split(":", 2)[2]))
                _stop_if(point)
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


def _freeze_background_writes() -> None:
    """`write:DIR:N`: DCP's writer waits (up to a minute) for the N-th forward, then the process stops."""
    point = os.environ.get(ENV, "")
    if not point.startswith("write:"):
        return
    directory, after = point[len("write:") :].rsplit(":", 1)
    real = dcp.FileSystemWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        if Path(str(self.path)) == Path(directory):
            deadline = time.monotonic() + 60
            while FORWARDS[0] < int(after) and time.monotonic() < deadline:
                time.sleep(0.005)
            _stop_if(point)
        return real(self, plan, planner)

    dcp.FileSystemWriter.write_data = write_data  # type: ignore[method-assign]


_freeze_background_writes()
