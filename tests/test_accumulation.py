"""Gradient accumulation through the real Trainer: any micro-batch split of a global batch is the same step.

DESIGN.md, principle 2: "The gradient is the mean over the global batch, however it is split."
A global batch of 32 run as micro = 32, 8 and 1 must give the same parameters after 5 steps
(float64, 1e-6) and log the same loss, for SGD (whose step is linear in the gradient, so a
wrong micro-batch weight shows at once) and Adam (whose state carries any error forward).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from regimen.data import SampleOrder, TaskData, TensorSamples
from regimen.strategy import Strategy
from regimen.task import Task, mse
from regimen.trainer import Trainer

STEPS = 5
BATCH = 32
N_SAMPLES = 100  # 5 x 32 = 160 samples: the run crosses an epoch boundary
SEED = 3
LR = {"sgd": 0.1, "adam": 0.01}


pytestmark = pytest.mark.usefixtures("float64_one_thread")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 5, generator=g)
    y = torch.sin(x[:, :2].sum(dim=1, keepdim=True)) + 0.1 * torch.randn(N_SAMPLES, 1, generator=g)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))


def _strategy(optimizer: str, micro: int) -> Strategy:
    return Strategy.from_dict(
        {
            "optimizer": {"name": optimizer, "lr": LR[optimizer]},
            "lr": {"schedule": "constant"},
            "batch": {"size": BATCH, "micro": micro},
            "train": {"steps": STEPS, "clip": 0.0, "log_every": 1, "eval_every": 1000, "seed": SEED, "device": "cpu"},
            "observe": {"progress": "none"},
        }
    )


def _fit(optimizer: str, micro: int, model: nn.Module) -> tuple[list[torch.Tensor], list[float], int]:
    """(parameters after the run, loss logged per step, number of forward passes)."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(count)
    x, y = _data()
    task = Task(model, TaskData(TensorSamples((x, y)), None), loss=mse)
    result = Trainer(_strategy(optimizer, micro), task).fit()
    assert result.progress.step == STEPS
    losses = [row["loss"] for row in result.history]
    return [p.detach().clone() for p in model.parameters()], losses, calls[0]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_micro_batches_give_the_same_run(optimizer: str) -> None:
    initial = _model()
    assert next(initial.parameters()).dtype == torch.float64
    runs = {micro: _fit(optimizer, micro, copy.deepcopy(initial)) for micro in (32, 8, 1)}
    params32, losses32, _ = runs[32]
    for micro, (params, losses, calls) in runs.items():
        # The split really happened: one forward per micro-batch.
        assert calls == STEPS * BATCH // micro, f"micro={micro}: {calls} forward passes"
        for i, (a, b) in enumerate(zip(params, params32, strict=True)):
            err = (a - b).abs().max().item()
            assert err < 1e-6, f"{optimizer}, micro={micro}: parameter {i} differs from micro=32 by {err:.3g}"
        assert len(losses) == STEPS
        for step, (a, b) in enumerate(zip(losses, losses32), start=1):
            # The logged loss goes through float32 (the trainer's one host read), hence relative 1e-6.
            assert abs(a - b) <= 1e-6 * abs(b), f"{optimizer}, micro={micro}: step {step} logged loss {a} vs {b}"
    # The parameters moved, so equal parameters mean equal steps.
    moved = max((a - b).abs().max().item() for a, b in zip(params32, initial.parameters()))
    assert moved > 1e-3


def test_logged_loss_is_the_global_batch_mean() -> None:
    # Step 1's loss is the mean over the first 32 samples of the order, not one micro-batch's.
    initial = _model()
    x, y = _data()
    ids = torch.from_numpy(SampleOrder(N_SAMPLES, SEED).take(0, BATCH))
    with torch.no_grad():
        want = nn.functional.mse_loss(initial(x[ids]), y[ids]).item()
    _, losses, _ = _fit("sgd", 8, copy.deepcopy(initial))
    assert abs(losses[0] - want) <= 1e-6 * want, f"logged {losses[0]}, the batch's mean loss is {want}"
