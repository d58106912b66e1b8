"""Reference versions of regimen's own optimizers, for tests only.

Each follows its paper's pseudo-code line by line, one parameter at a time, with no foreach and
no memory tricks; the fast versions (`lion`, `lamb`, `lars`, `schedulefree`) are tested against
these step by step. Do not train with them: they are slow on purpose.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer


class LionReference(Optimizer):
    """Lion, Chen et al. 2023, Algorithm 2 (decoupled weight decay)."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]  # no closure: these are test references
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                g = theta.grad
                state = self.state[theta]
                if not state:
                    state["exp_avg"] = torch.zeros_like(theta)
                m = state["exp_avg"]
                c = beta1 * m + (1 - beta1) * g
                theta.copy_(theta - lr * (torch.sign(c) + wd * theta))
                m.copy_(beta2 * m + (1 - beta2) * g)


class LAMBReference(Optimizer):
    """LAMB, You et al. 2019, Algorithm 2 (Adam moments, trust ratio ||theta|| / ||u||)."""

    def __init__(
        self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]  # no closure: these are test references
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                g = theta.grad
                state = self.state[theta]
                if not state:
                    state["t"] = 0
                    state["exp_avg"] = torch.zeros_like(theta)
                    state["exp_avg_sq"] = torch.zeros_like(theta)
                state["t"] += 1
                t, m, v = state["t"], state["exp_avg"], state["exp_avg_sq"]
                m.copy_(beta1 * m + (1 - beta1) * g)
                v.copy_(beta2 * v + (1 - beta2) * g * g)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                u = m_hat / (torch.sqrt(v_hat) + eps) + wd * theta
                theta_norm, u_norm = theta.norm().item(), u.norm().item()
                r = theta_norm / u_norm if theta_norm > 0 and u_norm > 0 else 1.0
                theta.copy_(theta - lr * r * u)


class LARSReference(Optimizer):
    """LARS, You et al. 2017, Algorithm 1 (momentum; Nesterov as torch.optim.SGD), with `lars_exclude`."""

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "nesterov": nesterov,
            "lars_exclude": None,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]  # no closure: these are test references
        for group in self.param_groups:
            lr, mu, eta, eps = group["lr"], group["momentum"], group["trust_coefficient"], group["eps"]
            for theta in group["params"]:
                if theta.grad is None:
                    continue
                g = theta.grad
                exclude = group["lars_exclude"]
                excluded = theta.ndim <= 1 if exclude is None else exclude
                wd = 0.0 if excluded else group["weight_decay"]
                theta_norm, g_norm = theta.norm().item(), g.norm().item()
                if excluded or theta_norm == 0 or g_norm == 0:
                    local_lr = 1.0
                else:
                    local_lr = eta * theta_norm / (g_norm + wd * theta_norm + eps)
                state = self.state[theta]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(theta)
                v = state["momentum_buffer"]
                v.copy_(mu * v + local_lr * (g + wd * theta))
                if group["nesterov"]:
                    theta.copy_(theta - lr * (local_lr * (g + wd * theta) + mu * v))
                else:
                    theta.copy_(theta - lr * v)


class _ScheduleFreeReference(Optimizer):
    """Schedule-free, Defazio et al. 2024, Algorithm 1, storing x, y and z explicitly."""

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0] if "betas" in group else group["momentum"]

    def _direction(self, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def eval(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "x" in self.state[p]:
                    p.copy_(self.state[p]["x"])
            group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "y" in self.state[p]:
                    p.copy_(self.state[p]["y"])
            group["train_mode"] = True

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]  # no closure: these are test references
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("step() in eval mode")
            t = group["k"] + 1
            warmup = group["warmup_steps"]
            lr = group["lr"] * (t / warmup if t <= warmup else 1.0)
            group["lr_max"] = max(group["lr_max"], lr)
            w = t ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
            group["weight_sum"] += w
            c = w / group["weight_sum"] if group["weight_sum"] > 0 else 0.0
            group["k"] = t
            beta = self._beta(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["x"], state["y"], state["z"] = p.clone(), p.clone(), p.clone()
                x, y, z = state["x"], state["y"], state["z"]
                d = self._direction(y, p.grad, state, group)  # gradient at y
                z.copy_(z - lr * d)
                x.copy_((1 - c) * x + c * z)
                y.copy_(beta * x + (1 - beta) * z)
                p.copy_(y)


class ScheduleFreeSGDReference(_ScheduleFreeReference):
    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "r": r}
        defaults |= {"weight_lr_power": weight_lr_power, "k": 0, "train_mode": True, "weight_sum": 0.0, "lr_max": -1.0}
        super().__init__(params, defaults)

    def _direction(self, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        return g + group["weight_decay"] * theta


class ScheduleFreeAdamWReference(_ScheduleFreeReference):
    def __init__(
        self,
        params: Any,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "r": r}
        defaults |= {"weight_lr_power": weight_lr_power, "k": 0, "train_mode": True, "weight_sum": 0.0, "lr_max": -1.0}
        super().__init__(params, defaults)

    def _direction(self, theta: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        beta2 = group["betas"][1]
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(theta)
        v = state["exp_avg_sq"]
        v.copy_(beta2 * v + (1 - beta2) * g * g)
        v_hat = v / (1 - beta2 ** group["k"])
        return g / (torch.sqrt(v_hat) + group["eps"]) + group["weight_decay"] * theta
