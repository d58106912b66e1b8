"""Schedule-free SGD and AdamW (Defazio et al. 2024, "The Road Less Scheduled").

Three sequences replace the learning-rate schedule:

    z_{t+1} = z_t - lr_t * d_t               the base optimizer's step (SGD, or Adam's normalised step)
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}     a weighted average of the z's: the weights to evaluate
    y_{t+1} = beta * x_{t+1} + (1 - beta) z_{t+1}     the point where the next gradient is taken

with c_{t+1} = w_{t+1} / sum_{i<=t+1} w_i and w_t = t^r * max_{i<=t}(lr_i)^weight_lr_power, and d_t
the gradient taken at y (plus weight decay `wd * y`; AdamW divides by sqrt(v_hat) + eps first,
v_hat = v / (1 - b2^t) with its bias correction). lr_t includes a built-in linear warmup over
`warmup_steps`. This follows facebookresearch/schedule_free (AdamWScheduleFree, SGDScheduleFree).

Only z (and AdamW's v) are stored: the parameters hold y while training and x while
evaluating, and x is recovered from y and z as x = (y - (1 - beta) z) / beta. Hence:

- call `opt.eval()` before evaluating, exporting or averaging the weights, `opt.train()` before
  the next step; `step()` raises in eval mode. `train_mode` is kept in each param group, so a
  state dict records which point the parameters hold (save model and optimizer together);
- a fresh optimizer starts in train mode (at step 0, x = y = z, so nothing moves);
- with no LR schedule: keep the group's `lr` constant (the weights of the average follow the
  largest lr seen so far; a decaying schedule defeats the method).

The reference versions are `regimen.optim.reference.ScheduleFreeSGDReference` and
`ScheduleFreeAdamWReference`.

Foreach on CUDA, one tensor at a time on CPU: CPU foreach streams the whole model through memory once per op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, cast

import torch
from torch.optim import Optimizer

from regimen.optim.closure import evaluate_closure
from regimen.optim.cpu import cpu_chunks, scratch_of

# What torch's foreach ops accept; the out-of-place ones are typed as returning a tuple.
_Tensors: TypeAlias = list[torch.Tensor] | tuple[torch.Tensor, ...]


class _ScheduleFree(Optimizer):
    """The schedule-free machinery shared by SGD and AdamW: mode switches and the y/z update.

    A subclass names its interpolation coefficient (`_beta`), the state it needs besides z
    (`_extra_state`) and its step direction d at y (`_direction`). A step runs foreach per
    (device, dtype) and, on CPU, one tensor at a time (`cpu_chunks`).
    """

    _extra_state: tuple[str, ...] = ()

    def _beta(self, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _direction(
        self,
        group: dict[str, Any],
        y: list[torch.Tensor],
        g: list[torch.Tensor],
        extra: list[list[torch.Tensor]],
        scratch: list[torch.Tensor] | None,
    ) -> tuple[_Tensors, float]:
        """(d', s) with the step direction d = s * d' at y; `scratch` (a run of one large CPU tensor,
        `Scratch.like`) receives d' where the gradient itself is not d'."""
        raise NotImplementedError

    @torch.no_grad()
    def eval(self) -> None:
        """Put x, the average the method guarantees, into the parameters (for eval, export, checkpoints)."""
        # y -> x: x = (y - (1-beta) z) / beta = lerp(y, z, 1 - 1/beta).
        self._switch(train=False, weight=lambda beta: 1.0 - 1.0 / beta)

    @torch.no_grad()
    def train(self) -> None:
        """Put y, the point where gradients are taken, back into the parameters."""
        # x -> y: y = beta x + (1-beta) z = lerp(x, z, 1 - beta).
        self._switch(train=True, weight=lambda beta: 1.0 - beta)

    def _switch(self, train: bool, weight: Callable[[float], float]) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            # Parameters that never had a gradient have no z: for them x = y = z already.
            params = [p for p in group["params"] if "z" in self.state[p]]
            zs = [self.state[p]["z"] for p in params]
            if params:
                for bucket, _ in Optimizer._group_tensors_by_device_and_dtype([params, zs]).values():
                    # torch types the buckets as list[Tensor | None]; these lists hold no None.
                    p_list, z_list = cast("list[list[torch.Tensor]]", bucket)
                    torch._foreach_lerp_(p_list, z_list, weight(self._beta(group)))
            group["train_mode"] = train

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One schedule-free update (the parameters must hold y: train mode); returns the closure's loss."""
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(
                f"{type(self).__name__}.step() called in eval mode: the parameters hold the average x, "
                "not the point y where gradients belong. Call optimizer.train() after evaluating."
            )
        loss = evaluate_closure(closure)

        scratch = scratch_of(self)
        for group in self.param_groups:
            k = group["k"]
            warmup = group["warmup_steps"]
            lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
            group["scheduled_lr"] = lr  # what was applied, for logging
            # The weight of z_{k+1} in the average x: w = (k+1)^r * lr_max^power, c = w / sum(w).
            group["lr_max"] = max(lr, group["lr_max"])
            weight = (k + 1) ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
            group["weight_sum"] += weight
            ckp1 = weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0
            group["k"] = k + 1

            params, grads, zs = [], [], []
            extras: list[list[torch.Tensor]] = [[] for _ in self._extra_state]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    for name in self._extra_state:
                        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                zs.append(state["z"])
                for name, lst in zip(self._extra_state, extras):
                    lst.append(state[name])
            if not params:
                continue

            beta = self._beta(group)
            # torch types the tensor lists as list[Tensor | None]; these hold no None.
            grouped = Optimizer._group_tensors_by_device_and_dtype(cast("list[list[torch.Tensor | None]]", [params, grads, zs, *extras]))
            for bucket, _ in grouped.values():
                y_all, g_all, z_all, *extra_all = cast("list[list[torch.Tensor]]", bucket)
                for run in cpu_chunks(y_all):
                    y_list, z_list = y_all[run], z_all[run]
                    d, scale = self._direction(group, y_list, g_all[run], [e[run] for e in extra_all], scratch.like(y_list))
                    # y and x move together without storing x (substitute x = (y - (1-beta) z)/beta
                    # into the three updates of the module docstring):
                    #   y <- (1-c) y + c z + lr (beta (1-c) - 1) d,   then   z <- z - lr d.
                    torch._foreach_lerp_(y_list, z_list, ckp1)
                    torch._foreach_add_(y_list, d, alpha=scale * lr * (beta * (1.0 - ckp1) - 1.0))
                    torch._foreach_add_(z_list, d, alpha=-scale * lr)
        return loss


def _check_common(name: str, lr: float, weight_decay: float, warmup_steps: int, r: float, weight_lr_power: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"{name}: lr = {lr}: must be >= 0")
    if not weight_decay >= 0.0:
        raise ValueError(f"{name}: weight_decay = {weight_decay}: must be >= 0")
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise ValueError(f"{name}: warmup_steps = {warmup_steps}: expected an integer >= 0")
    if not r >= 0.0:
        raise ValueError(f"{name}: r = {r}: must be >= 0")
    if not weight_lr_power >= 0.0:
        raise ValueError(f"{name}: weight_lr_power = {weight_lr_power}: must be >= 0")


def _counters() -> dict[str, Any]:
    # Counters live in the param groups, so state_dict() carries them (schedule_free's convention).
    return {"k": 0, "train_mode": True, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-free SGD with momentum-like interpolation; no LR schedule needed.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ScheduleFreeSGD(model.parameters(), lr=0.5, warmup_steps=100)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> opt.eval()  # the parameters now hold x: evaluate or save
        >>> opt.train()  # back to y before the next step
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
    ) -> None:
        _check_common("ScheduleFreeSGD", lr, weight_decay, warmup_steps, r, weight_lr_power)
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"ScheduleFreeSGD: momentum = {momentum}: must be in (0, 1) (x is recovered from y by dividing by it)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "r": r,
            "weight_lr_power": weight_lr_power,
            **_counters(),
        }
        super().__init__(params, defaults)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _direction(
        self,
        group: dict[str, Any],
        y: list[torch.Tensor],
        g: list[torch.Tensor],
        extra: list[list[torch.Tensor]],
        scratch: list[torch.Tensor] | None,
    ) -> tuple[_Tensors, float]:
        # d = g + wd*y (weight decay at y, as the official code); the gradient itself when wd = 0,
        # which is safe because d is only read afterwards.
        wd = group["weight_decay"]
        if wd == 0.0:
            return g, 1.0
        if scratch is None:
            return torch._foreach_add(g, y, alpha=wd), 1.0
        torch.add(g[0], y[0], alpha=wd, out=scratch[0])
        return scratch, 1.0


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-free AdamW: Adam's normalised step in the z sequence, no first moment.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ScheduleFreeAdamW(model.parameters(), lr=2.5e-3, warmup_steps=100)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> opt.eval()  # the parameters now hold x: evaluate or save
        >>> opt.train()  # back to y before the next step
    """

    _extra_state = ("exp_avg_sq",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
    ) -> None:
        _check_common("ScheduleFreeAdamW", lr, weight_decay, warmup_steps, r, weight_lr_power)
        if len(betas) != 2 or not (0.0 < betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(
                f"ScheduleFreeAdamW: betas = {betas}: expected beta1 in (0, 1) (x is recovered from y by dividing by it) "
                "and beta2 in [0, 1), e.g. (0.9, 0.999)"
            )
        if not eps >= 0.0:
            raise ValueError(f"ScheduleFreeAdamW: eps = {eps}: must be >= 0")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "r": r,
            "weight_lr_power": weight_lr_power,
            **_counters(),
        }
        super().__init__(params, defaults)

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _direction(
        self,
        group: dict[str, Any],
        y: list[torch.Tensor],
        g: list[torch.Tensor],
        extra: list[list[torch.Tensor]],
        scratch: list[torch.Tensor] | None,
    ) -> tuple[_Tensors, float]:
        (v,) = extra
        beta2, eps, wd = group["betas"][1], group["eps"], group["weight_decay"]
        # `k` was already advanced by step(): it is t, the number of gradients seen.
        s = (1.0 - beta2 ** group["k"]) ** 0.5  # sqrt of the bias correction
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
        # d = g / (sqrt(v / s^2) + eps) + wd*y = s * d',  d' = g / (sqrt(v) + s*eps) + (wd/s)*y,
        # built in one temporary.
        if scratch is None:
            d = list(torch._foreach_sqrt(v))
            torch._foreach_add_(d, s * eps)
            d = list(torch._foreach_div(g, d))
        else:
            d = scratch
            torch.sqrt(v[0], out=d[0])
            d[0].add_(s * eps)
            torch.div(g[0], d[0], out=d[0])
        if wd != 0.0:
            torch._foreach_add_(d, y, alpha=wd / s)
        return d, s
