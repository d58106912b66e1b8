"""The torch-backed optimizers, as `build_optimizer` makes them, against DESIGN.md's formulas.

Each algorithm is written out plainly in NumPy below and run next to the optimizer regimen builds
for 20 steps of a fixed (seeded) sequence of gradients, in float64; every step must agree to a
relative error of 1e-6. Both implementations are checked: "auto" (the fused kernel on CPU where
torch has one, else foreach) and "loop". The slip tests show that the tolerance is tight enough
to catch the textbook mistakes DESIGN.md warns about.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from regimen.optim import build_optimizer
from regimen.strategy import OptimizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20
TOL = 1e-6

# Non-default hyperparameters, so that a default silently used instead of the configured value
# fails; eps is large enough that where it enters the formula matters at 1e-6.
CASES: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1},
    "momentum": {"lr": 0.05},  # momentum unset: pins the 0.9 the name implies
    "nesterov": {"lr": 0.05, "momentum": 0.7},
    "adagrad": {"lr": 0.1, "eps": 1e-3},
    "rmsprop": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3},
    "adam": {"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-3},
    "adamw": {"lr": 0.01, "betas": [0.85, 0.99], "eps": 1e-4, "weight_decay": 0.5},
}
# What "auto" must pick on CPU (torch has fused CPU kernels for these four algorithms).
FUSED_ON_CPU = {"sgd", "momentum", "nesterov", "adagrad", "adam", "adamw"}


class Raw(nn.Module):
    """A 2-D weight and a 1-D bias: regimen decays the first and never the second."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(weight.copy()))
        self.bias = nn.Parameter(torch.from_numpy(bias.copy()))


def _problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Initial parameters and a fixed sequence of gradients (some tiny, so eps matters)."""
    rng = np.random.default_rng(0)
    theta = {"weight": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}
    grads = []
    for _ in range(STEPS):
        step = {k: rng.normal(size=v.shape) for k, v in theta.items()}
        step["weight"][0] *= 1e-3
        grads.append(step)
    return theta, grads


def reference(
    name: str, hp: dict[str, Any], theta0: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]], slip: str = ""
) -> list[dict[str, np.ndarray]]:
    """The parameters after each step, by DESIGN.md's formulas; `slip` injects a known mistake."""
    lr = hp["lr"]
    wd = hp.get("weight_decay", 0.0)
    eps = hp.get("eps", 1e-8)
    b1, b2 = hp.get("betas", (0.9, 0.999))
    mu = hp.get("momentum", 0.9)
    rho = hp.get("alpha", 0.99)
    theta = {k: v.copy() for k, v in theta0.items()}
    # State per parameter: momentum buffer / sum of squares / first and second moments.
    buf = {k: np.zeros_like(v) for k, v in theta.items()}
    sq = {k: np.zeros_like(v) for k, v in theta.items()}
    out = []
    for t, step_grads in enumerate(grads, start=1):
        for k, g in step_grads.items():
            if name == "sgd":
                theta[k] -= lr * g
            elif name in ("momentum", "nesterov"):
                # torch.optim.SGD: buf = mu*buf + g (buf = g at the first step, the same from 0).
                buf[k] = mu * buf[k] + g
                nesterov = name == "nesterov" and slip != "nesterov_as_momentum"
                theta[k] -= lr * (g + mu * buf[k] if nesterov else buf[k])
            elif name == "adagrad":
                sq[k] += g**2
                denom = np.sqrt(sq[k] + 1.0) if slip == "sqrt_G_plus_1" else np.sqrt(sq[k]) + eps
                theta[k] -= lr * g / denom
            elif name == "rmsprop":
                sq[k] = rho * sq[k] + (1 - rho) * g**2
                denom = np.sqrt(sq[k] + eps) if slip == "eps_inside_sqrt" else np.sqrt(sq[k]) + eps
                theta[k] -= lr * g / denom
            elif name in ("adam", "adamw"):
                decayed = k == "weight" or slip == "decay_bias"
                if name == "adamw" and decayed and slip != "l2_instead_of_decoupled":
                    theta[k] *= 1 - lr * wd  # decoupled, before the Adam step (as torch.optim.AdamW)
                if slip == "l2_instead_of_decoupled" and decayed:
                    g = g + wd * theta[k]
                buf[k] = b1 * buf[k] + (1 - b1) * g
                sq[k] = b2 * sq[k] + (1 - b2) * g**2
                if slip == "no_bias_correction":
                    m_hat, v_hat = buf[k], sq[k]
                else:
                    m_hat, v_hat = buf[k] / (1 - b1**t), sq[k] / (1 - b2**t)
                theta[k] -= lr * m_hat / (np.sqrt(v_hat) + eps)
            else:
                raise AssertionError(name)
        out.append({k: v.copy() for k, v in theta.items()})
    return out


def run_regimen(name: str, hp: dict[str, Any], implementation: str) -> list[dict[str, np.ndarray]]:
    """The optimizer `build_optimizer` makes, stepped on the same gradients; parameters per step."""
    theta0, grads = _problem()
    model = Raw(theta0["weight"], theta0["bias"])
    opt = build_optimizer(model, OptimizerConfig(name=name, implementation=implementation, **hp))
    out = []
    for step_grads in grads:
        for k, p in model.named_parameters():
            p.grad = torch.from_numpy(step_grads[k].copy())
        opt.step()
        out.append({k: p.detach().numpy().copy() for k, p in model.named_parameters()})
    return out


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("implementation", ["auto", "loop"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_formula(name: str, implementation: str) -> None:
    hp = CASES[name]
    got = run_regimen(name, hp, implementation)
    theta0, grads = _problem()
    want = reference(name, hp, theta0, grads)
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for k in w_step:
            err = rel_error(g_step[k], w_step[k])
            assert err < TOL, f"{name} ({implementation}) step {t}, {k}: relative error {err:.3g} vs the formula"
    # The parameters moved (a no-op optimizer would match a no-op reference only by accident).
    assert rel_error(got[-1]["weight"], theta0["weight"]) > 1e-2


@pytest.mark.parametrize("name", list(CASES))
def test_implementation_is_what_was_asked(name: str) -> None:
    """ "auto" is fused on CPU where torch has it (else torch's default loop, faster there than foreach); "loop" is neither."""
    auto = build_optimizer(Raw(np.zeros((2, 2)), np.zeros(2)), OptimizerConfig(name=name, implementation="auto", **CASES[name]))
    loop = build_optimizer(Raw(np.zeros((2, 2)), np.zeros(2)), OptimizerConfig(name=name, implementation="loop", **CASES[name]))
    if name in FUSED_ON_CPU:
        assert auto.defaults.get("fused") is True
    else:
        assert not auto.defaults.get("fused") and not auto.defaults.get("foreach")
    assert not loop.defaults.get("fused") and not loop.defaults.get("foreach")


# The textbook slips DESIGN.md names (and a few more): each must miss the real optimizer by far
# more than the tolerance, or the tests above could not tell them apart.
SLIPS = [
    ("adagrad", "sqrt_G_plus_1"),
    ("rmsprop", "eps_inside_sqrt"),
    ("adam", "no_bias_correction"),
    ("adamw", "no_bias_correction"),
    ("adamw", "l2_instead_of_decoupled"),
    ("adamw", "decay_bias"),
    ("nesterov", "nesterov_as_momentum"),
]


@pytest.mark.parametrize(("name", "slip"), SLIPS, ids=[f"{n}-{s}" for n, s in SLIPS])
def test_tolerance_catches_slip(name: str, slip: str) -> None:
    got = run_regimen(name, CASES[name], "auto")
    theta0, grads = _problem()
    wrong = reference(name, CASES[name], theta0, grads, slip=slip)
    worst = max(rel_error(got[t][k], wrong[t][k]) for t in range(STEPS) for k in theta0)
    assert worst > 100 * TOL, f"{name} with slip {slip!r} is within {worst:.3g} of the optimizer: the test cannot see it"
