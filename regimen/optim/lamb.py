"""LAMB: Adam with a per-tensor trust ratio (You et al. 2019, "Large Batch Optimization for Deep Learning").

    m = b1*m + (1-b1)*g;          v = b2*v + (1-b2)*g^2
    u = m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd*theta
    r = ||theta|| / ||u||          (per parameter tensor; 1 when either norm is 0)
    theta -= lr * r * u

The trust ratio makes each tensor move by about lr times its own norm, whatever the scale of
its gradient, which is what lets LAMB keep a large batch stable (BERT in 76 minutes). The step
counter `step` lives in the param group: every tensor of a group shares one bias correction.
The reference version is `regimen.optim.reference.LAMBReference`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch.optim import Optimizer


class LAMB(Optimizer):
    """LAMB with Adam's bias correction; a foreach step per (device, dtype).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LAMB(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"LAMB: lr = {lr}: must be >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LAMB: betas = {betas}: expected two numbers in [0, 1), e.g. (0.9, 0.999)")
        if not eps >= 0.0:
            raise ValueError(f"LAMB: eps = {eps}: must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"LAMB: weight_decay = {weight_decay}: must be >= 0")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "step": 0}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LAMB update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            if not params:
                continue

            group["step"] += 1
            t = group["step"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
            grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs])
            for lists, _ in grouped.values():
                # torch types the buckets as list[Tensor | None]; these lists hold no None.
                p_list, g_list, m_list, v_list = cast("list[list[torch.Tensor]]", lists)
                torch._foreach_lerp_(m_list, g_list, 1.0 - beta1)
                torch._foreach_mul_(v_list, beta2)
                torch._foreach_addcmul_(v_list, g_list, g_list, value=1.0 - beta2)

                # u = (m/bias1) / (sqrt(v/bias2) + eps) + wd*theta, built in one temporary list.
                denom = torch._foreach_div(v_list, bias2)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                update = torch._foreach_div(m_list, denom)
                del denom
                torch._foreach_div_(update, bias1)
                if wd != 0.0:
                    torch._foreach_add_(update, p_list, alpha=wd)

                # The trust ratios stay on the device: stacking the norms avoids a host sync
                # per tensor, and torch.where keeps the "1 when a norm is 0" rule branch-free.
                p_norm = torch.stack(torch._foreach_norm(p_list))
                u_norm = torch.stack(torch._foreach_norm(update))
                ratio = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
                torch._foreach_mul_(update, list(ratio.unbind(0)))
                torch._foreach_add_(p_list, update, alpha=-lr)
        return loss
