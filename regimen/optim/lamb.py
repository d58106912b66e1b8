"""LAMB: Adam with a per-tensor trust ratio (You et al. 2019, "Large Batch Optimization for Deep Learning").

    m = b1*m + (1-b1)*g;          v = b2*v + (1-b2)*g^2
    u = m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd*theta
    r = ||theta|| / ||u||          (per parameter tensor; 1 when either norm is 0)
    theta -= lr * r * u

The trust ratio makes each tensor move by about lr times its own norm, whatever the scale of
its gradient, which is what lets LAMB keep a large batch stable (BERT in 76 minutes). The step
counter `step` lives in the param group: every tensor of a group shares one bias correction.
The reference version is `regimen.optim.reference.LAMBReference`.

Foreach on CUDA, one tensor at a time on CPU: CPU foreach streams the whole model through memory once per op
(a large CPU tensor's Adam step comes from torch's fused Adam kernel: two passes over it instead of seven).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch.optim import Optimizer

from regimen.optim.closure import evaluate_closure
from regimen.optim.cpu import cpu_chunks, on_cpu, scratch_of


class LAMB(Optimizer):
    """LAMB with Adam's bias correction; a foreach step per (device, dtype), per tensor on CPU.

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
        loss = evaluate_closure(closure)

        scratch = scratch_of(self)
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
            grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs])
            for lists, _ in grouped.values():
                # torch types the buckets as list[Tensor | None]; these lists hold no None.
                p_list, g_list, m_list, v_list = cast("list[list[torch.Tensor]]", lists)
                for run in cpu_chunks(p_list):
                    _lamb_update(p_list[run], g_list[run], m_list[run], v_list[run], scratch.like(p_list[run]), group)
        return loss


def _lamb_update(
    p: list[torch.Tensor],
    g: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    scratch: list[torch.Tensor] | None,
    group: dict[str, Any],
) -> None:
    """One run of tensors; `scratch` (a run of one large CPU tensor, `Scratch.like`) receives the update."""
    t = group["step"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t

    # The update u = (m/bias1) / (sqrt(v/bias2) + eps) + wd*theta is Adam's step plus the decay.
    if scratch is not None and g[0].dtype == p[0].dtype:
        # One large CPU tensor: torch's fused Adam kernel updates m and v and adds Adam's step to
        # the wd*theta already in the scratch, in one pass over the tensor (lr = -1: add, not
        # subtract; its own weight decay off).
        update, scale = scratch, 1.0
        if wd != 0.0:
            torch.mul(p[0], wd, out=update[0])
        else:
            update[0].zero_()
        steps = [torch.tensor(float(t))]
        torch._fused_adam_(
            update, g, m, v, [], steps, lr=-1.0, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False
        )
    else:
        torch._foreach_lerp_(m, g, 1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
        # u = scale * w with w = m / (sqrt(v) + eps*sqrt(bias2)) + (wd/scale)*theta and
        # scale = sqrt(bias2)/bias1, built in one temporary. The trust ratio ||theta||/||u||
        # times u is ||theta||/||w|| times w: the scale only matters where a norm is 0.
        scale = bias2**0.5 / bias1
        update = list(torch._foreach_sqrt(v))
        torch._foreach_add_(update, eps * bias2**0.5)
        update = list(torch._foreach_div(m, update))
        if wd != 0.0:
            torch._foreach_add_(update, p, alpha=wd / scale)

    # theta -= lr * ratio * update, ratio = ||theta|| / ||update||, or `scale` where a norm is 0.
    n = len(p)
    norms = torch.stack(torch._foreach_norm([*p, *update]))
    if on_cpu(p[0]):
        # On CPU a read-back costs nothing: the rule in Python saves a dozen tiny ops per run.
        values = norms.tolist()
        for p_t, u_t, p_norm, u_norm in zip(p, update, values[:n], values[n:]):
            p_t.add_(u_t, alpha=-lr * (p_norm / u_norm if p_norm > 0 and u_norm > 0 else scale))
    else:
        # The ratios stay on the device (no host sync); torch.where applies the norm-0 rule.
        p_norm, u_norm = norms.view(2, n)
        ratio = torch.where(torch.minimum(p_norm, u_norm) > 0, p_norm / u_norm, scale)
        torch._foreach_mul_(update, list(ratio.unbind(0)))
        torch._foreach_add_(p, update, alpha=-lr)
