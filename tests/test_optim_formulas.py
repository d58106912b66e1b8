"""The torch-backed optimizers, as `build_optimizer` makes them, step by DESIGN.md's formulas.

Each algorithm is written out plainly in NumPy below, following torch's documented update, and
run next to the optimizer regimen builds for 20 steps of a fixed (seeded) sequence of gradients,
in float64; every step must agree to a relative error of 1e-6. Every registered name is covered,
and every option a strategy can set that changes the code path torch takes (momentum on and off,
dampening, Nesterov, weight decay on and off, AdaGrad's lr_decay and initial accumulator,
RMSprop's centered and momentum, AMSGrad, NAdam's momentum_decay, both branches of RAdam's
rectification, Adafactor's factored and unfactored second moments and its clipping), each under
every implementation `optimizer.implementation` selects: "auto" (the fused kernel on CPU where
torch has one, else torch's per-tensor loop), "foreach" and "loop". The slip tests show that the
tolerance is tight enough to catch the textbook mistakes DESIGN.md warns about, and that every
option above changes the result by far more than the tolerance (so an option dropped on its
way to torch would fail).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from regimen.optim import build_optimizer
from regimen.registry import OPTIMIZERS
from regimen.strategy import OptimizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# The names torch ships the algorithm of (the registry's entries whose target is in torch.optim).
TORCH_OPTIMIZERS = [e.name for e in OPTIMIZERS.entries() if e.target.startswith("torch.")]

STEPS = 20
TOL = 1e-6

# id -> (optimizer name, hyperparameters). Non-default values, so that a default silently used
# instead of the configured value fails; eps is large enough that where it enters matters at 1e-6.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gd": ("gd", {"lr": 0.1}),
    "sgd": ("sgd", {"lr": 0.1}),
    "sgd-decay": ("sgd", {"lr": 0.1, "weight_decay": 0.2}),
    "sgd-momentum-dampening": ("sgd", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3}),
    "sgd-nesterov-decay": ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    "momentum": ("momentum", {"lr": 0.05}),  # momentum unset: pins the 0.9 the name implies
    "momentum-dampening": ("momentum", {"lr": 0.05, "momentum": 0.7, "dampening": 0.5}),
    "nesterov": ("nesterov", {"lr": 0.05, "momentum": 0.7}),
    "adagrad": ("adagrad", {"lr": 0.1, "eps": 1e-3}),
    "adagrad-decays": ("adagrad", {"lr": 0.1, "eps": 1e-3, "lr_decay": 0.05, "initial_accumulator_value": 0.5, "weight_decay": 0.1}),
    "rmsprop": ("rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-3}),
    "rmsprop-centered": ("rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "centered": True}),
    "rmsprop-momentum-decay": ("rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "momentum": 0.8, "weight_decay": 0.1}),
    "rmsprop-centered-momentum": ("rmsprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "centered": True, "momentum": 0.5}),
    "adam": ("adam", {"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-3}),
    "adam-amsgrad-decay": ("adam", {"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-3, "amsgrad": True, "weight_decay": 0.2}),
    "adamw": ("adamw", {"lr": 0.01, "betas": [0.85, 0.99], "eps": 1e-4, "weight_decay": 0.5}),
    "adamw-amsgrad": ("adamw", {"lr": 0.01, "betas": [0.85, 0.8], "eps": 1e-4, "weight_decay": 0.5, "amsgrad": True}),
    "nadam": ("nadam", {"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-3}),
    "nadam-momentum-decay": ("nadam", {"lr": 0.01, "betas": [0.8, 0.95], "eps": 1e-3, "momentum_decay": 0.05, "weight_decay": 0.1}),
    # beta2 = 0.9: the SMA length rho_t passes 5 at step 6, so both branches run in 20 steps.
    "radam": ("radam", {"lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-3}),
    "radam-decay": ("radam", {"lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-3, "weight_decay": 0.2}),
    "adafactor": ("adafactor", {"lr": 0.05}),
    "adafactor-options": ("adafactor", {"lr": 0.05, "beta2_decay": -0.5, "d": 1.2, "eps": 1e-2, "weight_decay": 0.1}),
}
# The options of a case that select a code path: without them the step must differ (see the slips).
FLAGS = ("weight_decay", "momentum", "dampening", "nesterov", "lr_decay", "initial_accumulator_value", "centered", "amsgrad")
FLAGS += ("momentum_decay", "beta2_decay", "d")
# What "auto" picks on CPU: the fused kernel where torch has one.
FUSED_ON_CPU = {"gd", "sgd", "momentum", "nesterov", "adagrad", "adam", "adamw"}
IMPLEMENTATIONS = ["auto", "foreach", "loop"]


def test_every_torch_optimizer_has_a_case() -> None:
    assert {name for name, _ in CASES.values()} == set(TORCH_OPTIMIZERS)


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


def _sgd(hp: dict[str, Any], name: str, slip: str, s: dict[str, Any], g: np.ndarray, t: int) -> np.ndarray:
    """The step direction of torch.optim.SGD: buf = g at the first step, then mu*buf + (1 - dampening)*g."""
    mu = hp.get("momentum", 0.9 if name in ("momentum", "nesterov") else 0.0)
    if mu == 0.0:
        return g
    s["buf"] = g.copy() if t == 1 else mu * s["buf"] + (1 - hp.get("dampening", 0.0)) * g
    nesterov = hp.get("nesterov", name == "nesterov") and slip != "nesterov_as_momentum"
    return g + mu * s["buf"] if nesterov else s["buf"]


def _adafactor(hp: dict[str, Any], s: dict[str, Any], theta: np.ndarray, g: np.ndarray, t: int) -> np.ndarray:
    """Adafactor's update (torch's variant: relative step, factored second moment, RMS clipping); theta is updated in place."""
    eps1, eps2 = np.finfo(np.float64).eps, hp.get("eps", 1e-3)
    one_minus_beta2 = t ** hp.get("beta2_decay", -0.8)
    rho = min(hp["lr"], 1 / t**0.5)
    alpha = max(eps2, np.sqrt(np.mean(theta**2))) * rho  # from theta before the decay
    if theta.ndim > 1:  # factored: a row and a column average of g^2
        s["row"] = s.get("row", 0.0) * (1 - one_minus_beta2) + one_minus_beta2 * np.mean(g**2, axis=-1, keepdims=True)
        s["col"] = s.get("col", 0.0) * (1 - one_minus_beta2) + one_minus_beta2 * np.mean(g**2, axis=-2, keepdims=True)
        v = s["row"] @ s["col"] / max(np.mean(s["row"]), eps1)
    else:
        s["v"] = s.get("v", 0.0) * (1 - one_minus_beta2) + one_minus_beta2 * g**2
        v = s["v"]
    u = g / np.sqrt(np.maximum(v, eps1 * eps1))
    return alpha / max(1.0, np.sqrt(np.mean(u**2)) / hp.get("d", 1.0)) * u


def reference(
    name: str, hp: dict[str, Any], theta0: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]], slip: str = ""
) -> list[dict[str, np.ndarray]]:
    """The parameters after each step, by the formulas; `slip` injects a known mistake."""
    lr = hp["lr"]
    eps = hp.get("eps", 1e-8)
    b1, b2 = hp.get("betas", (0.9, 0.999))
    rho = hp.get("alpha", 0.99)
    theta = {k: v.copy() for k, v in theta0.items()}
    state: dict[str, dict[str, Any]] = {k: {"m": 0.0, "v": 0.0, "g": 0.0, "vmax": 0.0, "mu_product": 1.0} for k in theta}
    out = []
    for t, step_grads in enumerate(grads, start=1):
        for k, g in step_grads.items():
            s = state[k]
            wd = hp.get("weight_decay", 0.0) if k == "weight" or slip == "decay_bias" else 0.0
            if name in ("adamw", "adafactor") or slip == "l2_instead_of_decoupled":
                decoupled, g = True, g
            else:
                decoupled, g = False, g + wd * theta[k]  # L2: the decay is part of the gradient (torch's default)
            if name in ("gd", "sgd", "momentum", "nesterov"):
                theta[k] -= lr * _sgd(hp, name, slip, s, g, t)
            elif name == "adagrad":
                s["v"] = (hp.get("initial_accumulator_value", 0.0) if t == 1 else s["v"]) + g**2
                denom = np.sqrt(s["v"] + 1.0) if slip == "sqrt_G_plus_1" else np.sqrt(s["v"]) + eps
                theta[k] -= lr / (1 + (t - 1) * hp.get("lr_decay", 0.0)) * g / denom
            elif name == "rmsprop":
                s["v"] = rho * s["v"] + (1 - rho) * g**2
                v = s["v"]
                if hp.get("centered"):
                    s["g"] = rho * s["g"] + (1 - rho) * g
                    v = v - s["g"] ** 2
                denom = np.sqrt(v + eps) if slip == "eps_inside_sqrt" else np.sqrt(v) + eps
                if hp.get("momentum", 0.0) > 0:
                    s["m"] = hp["momentum"] * s["m"] + g / denom
                    theta[k] -= lr * s["m"]
                else:
                    theta[k] -= lr * g / denom
            elif name in ("adam", "adamw", "nadam", "radam"):
                if decoupled and slip == "l2_instead_of_decoupled":
                    g = g + wd * theta[k]
                elif decoupled:
                    theta[k] *= 1 - lr * wd  # decoupled, before the step (as torch.optim.AdamW)
                s["m"] = b1 * s["m"] + (1 - b1) * g
                s["v"] = b2 * s["v"] + (1 - b2) * g**2
                bias1, bias2 = (1.0, 1.0) if slip == "no_bias_correction" else (1 - b1**t, 1 - b2**t)
                if name == "nadam":
                    psi = hp.get("momentum_decay", 4e-3)
                    mu, mu_next = b1 * (1 - 0.5 * 0.96 ** (t * psi)), b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
                    s["mu_product"] *= mu
                    denom = np.sqrt(s["v"] / bias2) + eps
                    theta[k] -= lr * (1 - mu) / (1 - s["mu_product"]) * g / denom
                    theta[k] -= lr * mu_next / (1 - s["mu_product"] * mu_next) * s["m"] / denom
                elif name == "radam":
                    rho_inf = 2 / (1 - b2) - 1
                    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
                    m_hat = s["m"] / bias1
                    if rho_t > 5 and slip != "never_rectified":
                        rect = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                        theta[k] -= lr * m_hat * rect * np.sqrt(bias2) / (np.sqrt(s["v"]) + eps)
                    else:
                        theta[k] -= lr * m_hat
                else:
                    if hp.get("amsgrad"):
                        s["vmax"] = np.maximum(s["vmax"], s["v"])  # the running maximum of v, not of v_hat
                    v = s["vmax"] if hp.get("amsgrad") else s["v"]
                    theta[k] -= lr * (s["m"] / bias1) / (np.sqrt(v / bias2) + eps)
            elif name == "adafactor":
                update = _adafactor(hp, s, theta[k], g, t)
                theta[k] *= 1 - lr * wd
                theta[k] -= update
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


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_numpy_formula(case: str, implementation: str) -> None:
    name, hp = CASES[case]
    got = run_regimen(name, hp, implementation)
    theta0, grads = _problem()
    want = reference(name, hp, theta0, grads)
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for k in w_step:
            err = rel_error(g_step[k], w_step[k])
            assert err < TOL, f"{case} ({implementation}) step {t}, {k}: relative error {err:.3g} vs the formula"
    # The parameters moved (a no-op optimizer would match a no-op reference only by accident).
    assert rel_error(got[-1]["weight"], theta0["weight"]) > 1e-2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
def test_implementation_is_what_was_asked(name: str, implementation: str) -> None:
    """ "auto" is fused on CPU where torch has it, else torch's default loop (faster there than foreach)."""
    opt = build_optimizer(Raw(np.zeros((2, 2)), np.zeros(2)), OptimizerConfig(name=name, implementation=implementation))
    fused, foreach = bool(opt.defaults.get("fused")), bool(opt.defaults.get("foreach"))
    expected = {"auto": (name in FUSED_ON_CPU, False), "foreach": (False, True), "loop": (False, False)}[implementation]
    assert (fused, foreach) == expected


# The textbook slips DESIGN.md names (and a few more): each must miss the real optimizer by far
# more than the tolerance, or the tests above could not tell them apart.
SLIPS = [
    ("adagrad", "sqrt_G_plus_1"),
    ("rmsprop", "eps_inside_sqrt"),
    ("adam", "no_bias_correction"),
    ("adamw", "no_bias_correction"),
    ("adamw", "l2_instead_of_decoupled"),
    ("adamw", "decay_bias"),
    ("sgd-decay", "decay_bias"),
    ("nesterov", "nesterov_as_momentum"),
    ("radam", "never_rectified"),
]


def _worst(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> float:
    return max(rel_error(g[k], w[k]) for g, w in zip(got, want, strict=True) for k in w)


@pytest.mark.parametrize(("case", "slip"), SLIPS, ids=[f"{n}-{s}" for n, s in SLIPS])
def test_tolerance_catches_slip(case: str, slip: str) -> None:
    name, hp = CASES[case]
    theta0, grads = _problem()
    worst = _worst(run_regimen(name, hp, "auto"), reference(name, hp, theta0, grads, slip=slip))
    assert worst > 100 * TOL, f"{case} with slip {slip!r} is within {worst:.3g} of the optimizer: the test cannot see it"


FLAGGED = [(case, flag) for case, (_, hp) in CASES.items() for flag in FLAGS if flag in hp]


@pytest.mark.parametrize(("case", "flag"), FLAGGED, ids=[f"{c}-{f}" for c, f in FLAGGED])
def test_every_option_changes_the_step(case: str, flag: str) -> None:
    """The formula without the option misses the optimizer: the option reached torch and took its path."""
    name, hp = CASES[case]
    theta0, grads = _problem()
    without = {k: v for k, v in hp.items() if k != flag}
    worst = _worst(run_regimen(name, hp, "auto"), reference(name, without, theta0, grads))
    assert worst > 100 * TOL, f"{case}: {flag} changes the step by only {worst:.3g}"
