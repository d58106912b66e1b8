"""LARS: momentum SGD with a layer-wise trust ratio (You et al. 2017, "Large Batch Training of Convolutional Networks").

    local_lr = trust_coefficient * ||theta|| / (||g|| + wd*||theta|| + eps)   (1 when a norm is 0)
    v        = momentum*v + local_lr * (g + wd*theta)
    theta   -= lr * v                                   (nesterov: lr * (local_lr*(g + wd*theta) + momentum*v))

Biases and normalisation weights (1-D tensors) are excluded from the adaptation *and* from
weight decay (local_lr = 1, wd = 0: plain momentum SGD for them), as in the paper's ResNet
recipe and every well-known implementation since. Each param group can say otherwise with
`lars_exclude`:

- `None` (default): exclude tensors with `ndim <= 1`;
- `False`: adapt and decay every tensor of the group;
- `True`: exclude every tensor of the group (plain momentum SGD).

The reference version is `regimen.optim.reference.LARSReference`.

Foreach on CUDA, one tensor at a time on CPU: CPU foreach streams the whole model through memory once per op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch.optim import Optimizer

from regimen.optim.closure import evaluate_closure
from regimen.optim.cpu import cpu_chunks, on_cpu, scratch_of


def lars_excluded(p: torch.Tensor, lars_exclude: bool | None) -> bool:
    """Whether `p` skips the trust ratio and the weight decay under a group's `lars_exclude`."""
    return p.ndim <= 1 if lars_exclude is None else bool(lars_exclude)


class LARS(Optimizer):
    """LARS with momentum (optionally Nesterov); a foreach step per (device, dtype), per tensor on CPU.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"LARS: lr = {lr}: must be >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum = {momentum}: must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"LARS: weight_decay = {weight_decay}: must be >= 0")
        if not trust_coefficient > 0.0:
            raise ValueError(f"LARS: trust_coefficient = {trust_coefficient}: must be > 0 (the paper uses 0.001)")
        if not eps >= 0.0:
            raise ValueError(f"LARS: eps = {eps}: must be >= 0")
        if nesterov and momentum == 0.0:
            raise ValueError("LARS: nesterov = True needs momentum > 0")
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
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LARS update of every parameter that has a gradient; returns the closure's loss."""
        loss = evaluate_closure(closure)

        scratch = scratch_of(self)
        for group in self.param_groups:
            # Two lists per group: adapted tensors and excluded ones (biases, norms by default).
            adapted: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
            excluded: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lists = excluded if lars_excluded(p, group["lars_exclude"]) else adapted
                lists[0].append(p)
                lists[1].append(p.grad)
                lists[2].append(state["momentum_buffer"])

            for lists, adapt in ((adapted, True), (excluded, False)):
                if not lists[0]:
                    continue
                # torch types the tensor lists as list[Tensor | None]; these hold no None.
                grouped = Optimizer._group_tensors_by_device_and_dtype(cast("list[list[torch.Tensor | None]]", list(lists)))
                for bucket, _ in grouped.values():
                    p_list, g_list, v_list = cast("list[list[torch.Tensor]]", bucket)
                    for run in cpu_chunks(p_list):
                        temp = scratch.like(p_list[run]) if adapt and group["weight_decay"] != 0.0 else None
                        _lars_update(p_list[run], g_list[run], v_list[run], temp, group, adapt)
        return loss


def _lars_update(
    p: list[torch.Tensor],
    g: list[torch.Tensor],
    v: list[torch.Tensor],
    scratch: list[torch.Tensor] | None,
    group: dict[str, Any],
    adapt: bool,
) -> None:
    """One run of tensors; `adapt=False` is plain momentum SGD. `scratch` (a run of one large CPU
    tensor, `Scratch.like`) receives g + wd*theta."""
    lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
    if not adapt:
        # local_lr = 1 and no weight decay: v = momentum*v + g.
        torch._foreach_mul_(v, momentum)
        torch._foreach_add_(v, g)
        if nesterov:
            # Nesterov as torch.optim.SGD: step along g + momentum * v.
            torch._foreach_add_(p, g, alpha=-lr)
            torch._foreach_add_(p, v, alpha=-lr * momentum)
        else:
            torch._foreach_add_(p, v, alpha=-lr)
        return

    wd, eta, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
    n = len(p)
    norms = torch.stack(torch._foreach_norm([*p, *g]))
    # d = g + wd*theta in a temporary, so the gradients are left untouched; the gradient itself
    # when wd = 0. Then v = momentum*v + local_lr*d, theta -= lr*v (Nesterov: lr*(local_lr*d + momentum*v)).
    if wd == 0.0:
        d = g
    elif scratch is None:
        d = list(torch._foreach_add(g, p, alpha=wd))
    else:
        d = scratch
        torch.add(g[0], p[0], alpha=wd, out=d[0])
    torch._foreach_mul_(v, momentum)
    if on_cpu(p[0]):
        # On CPU a read-back costs nothing: the rule in Python saves a dozen tiny ops per run.
        values = norms.tolist()
        for p_t, d_t, v_t, p_norm, g_norm in zip(p, d, v, values[:n], values[n:]):
            local_lr = eta * p_norm / (g_norm + wd * p_norm + eps) if p_norm > 0 and g_norm > 0 else 1.0
            v_t.add_(d_t, alpha=local_lr)
            if nesterov:
                p_t.add_(d_t, alpha=-lr * local_lr)
                p_t.add_(v_t, alpha=-lr * momentum)
            else:
                p_t.add_(v_t, alpha=-lr)
        return
    # The trust ratios stay on the device (no host sync); torch.where applies "1 when a norm is 0".
    p_norm, g_norm = norms.view(2, n)
    trust = eta * p_norm / (g_norm + wd * p_norm + eps)
    local_lr = list(torch.where(torch.minimum(p_norm, g_norm) > 0, trust, 1.0).unbind(0))
    scaled = torch._foreach_mul(d, local_lr)
    torch._foreach_add_(v, scaled)
    if nesterov:
        # Nesterov as torch.optim.SGD: step along scaled + momentum * v.
        torch._foreach_add_(p, scaled, alpha=-lr)
        torch._foreach_add_(p, v, alpha=-lr * momentum)
    else:
        torch._foreach_add_(p, v, alpha=-lr)
