"""`regimen lr-find`: the LR range test on problems whose stable LR range is known.

The problem is a noisy quadratic, f(w) = mean_i h/2 (w - x_i)^2, written as a one-parameter
model under the `mse` loss: its curvature is h whatever the data, so plain SGD is stable iff
lr < 2/h, and heavy-ball momentum beta iff lr < 2(1 + beta)/h. The noise in x_i gives SGD a
noise floor that grows with the LR, like a real network's, so the loss has a minimum inside the
stable range instead of creeping towards zero up to its edge.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from regimen.errors import UserError
from regimen.lr_find import Sweep, centred_average, lr_find, plot, suggestions
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Quadratic(nn.Module):
    """Outputs sqrt(h/2) w for every sample: under mse against sqrt(h/2) x, the loss is h/2 (w - x)^2."""

    calls: torch.Tensor

    def __init__(self, curvature: float = 10.0, start: float = 3.0) -> None:
        super().__init__()
        self.scale = math.sqrt(curvature / 2)
        self.w = nn.Parameter(torch.tensor([start]))
        self.register_buffer("calls", torch.zeros(()))  # a buffer the forward changes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return (self.scale * self.w).expand(len(x))


def quadratic(curvature: float = 10.0) -> Quadratic:
    """The factory (usable as `model.name = "tests.test_lr_find:quadratic"`)."""
    return Quadratic(curvature)


def quadratic_data(curvature: float, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.zeros(n, 1), math.sqrt(curvature / 2) * torch.randn(n, generator=g)


@pytest.mark.parametrize("curvature", [0.5, 40.0])
@pytest.mark.parametrize(("optimizer", "stable"), [("sgd", 2.0), ("momentum", 2.0 * 1.9)])
def test_suggestion_is_inside_the_stable_range(curvature: float, optimizer: str, stable: float) -> None:
    edge = stable / curvature  # sgd: lr < 2/h; momentum 0.9: lr < 2 (1 + 0.9) / h
    model = quadratic(curvature)
    result = lr_find(
        model,
        quadratic_data(curvature),
        loss="mse",
        overrides={"optimizer.name": optimizer, "batch.size": 16},
        sweep=Sweep(min_lr=1e-6 / curvature, max_lr=100 / curvature, steps=100),
    )
    assert result.stopped in ("diverged", "non-finite")
    assert result.lrs[-1] > edge, "the sweep stops only once past the edge of stability"
    assert result.steepest is not None and result.minimum is not None
    for lr in (result.steepest, result.tenth_of_minimum, result.minimum):
        assert lr is not None and 0 < lr < edge, (lr, edge)
    assert result.steepest < result.minimum
    assert result.override() == f"optimizer.lr={result.steepest:.2g}"


def test_model_and_state_are_left_as_they_were() -> None:
    model = quadratic(10.0)
    model.w.grad = torch.tensor([0.25])
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    result = lr_find(model, quadratic_data(10.0), loss="mse", overrides={"optimizer.name": "adam"}, sweep=Sweep(steps=40))
    assert len(result.lrs) > 5
    assert model.calls.item() == 0  # the forward passes happened, on a model restored afterwards
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(model.w.grad, torch.tensor([0.25]))
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_plot(tmp_path: Path) -> None:
    result = lr_find(quadratic(1.0), quadratic_data(1.0), loss="mse", overrides={"optimizer.name": "sgd"}, sweep=Sweep(steps=50))
    path = plot(result, tmp_path / "lr_find.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_smoothing_has_no_lag_and_suggestions() -> None:
    # A step at index 5: a centred window keeps it there (an EMA would move it right).
    values = [1.0] * 5 + [0.0] * 5
    smoothed = centred_average(values, 3)
    assert smoothed[4] == pytest.approx(2 / 3) and smoothed[5] == pytest.approx(1 / 3)
    assert smoothed[:4] == [1.0] * 4 and smoothed[6:] == [0.0] * 4
    lrs = [10.0**k for k in range(-6, 0)]
    assert suggestions(lrs, [1.0, 0.99, 0.95, 0.6, 0.5, 2.0]) == (1e-3, 1e-2)
    assert suggestions(lrs, [1.0, 1.1, 1.2, 1.5, 3.0, 9.0]) == (None, None)  # never went down


def test_sweep_checks() -> None:
    assert Sweep(min_lr=1e-6, max_lr=1.0, steps=7).lr(0) == pytest.approx(1e-6)
    assert Sweep(min_lr=1e-6, max_lr=1.0, steps=7).lr(6) == pytest.approx(1.0)
    for bad in (Sweep(min_lr=0.0), Sweep(min_lr=1.0, max_lr=0.5), Sweep(steps=2)):
        with pytest.raises(UserError):
            bad.validate()


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "lr"
    args = ["model.name=mlp", "model.hidden=[32]", "data.source=synthetic", "data.num_samples=2000", "optimizer.name=sgd"]
    r = run_cli("lr-find", *args, "--steps", "60", "--out", str(out))
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"suggested: optimizer\.lr=([0-9.e+-]+)", last)
    assert match, r.stdout
    assert 1e-7 < float(match.group(1)) < 10
    assert (out / "lr_find.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "lr_find.json").is_file()
    assert str(out / "lr_find.png") in r.stdout


def test_cli_bad_range(tmp_path: Path) -> None:
    r = run_cli("lr-find", "--min", "1", "--max", "0.1", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--max" in r.stderr
