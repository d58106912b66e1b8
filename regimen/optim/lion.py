"""Lion: the sign of an interpolated momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    c     = b1*m + (1-b1)*g
    theta = theta * (1 - lr*wd) - lr * sign(c)      (decoupled weight decay, as AdamW)
    m     = b2*m + (1-b2)*g

One state tensor per parameter (the momentum `exp_avg`), half of Adam's. Every update
coordinate is +-lr, so Lion wants an lr 3-10x smaller than AdamW's and a weight decay
3-10x larger to keep lr*wd the same. The reference version is `regimen.optim.reference.LionReference`.

On CPU, one compiled loop over the whole parameter list (`regimen.optim.native`, built on first
use) where a C compiler is there; otherwise, and on CUDA, foreach ops (on CPU over runs of tensors
that stay in cache, `regimen.optim.cpu`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch.optim import Optimizer

from regimen.optim import cpu, native
from regimen.optim.closure import evaluate_closure
from regimen.optim.cpu import cpu_chunks, scratch_of


class Lion(Optimizer):
    """Lion with decoupled weight decay: the compiled CPU kernel where it builds, else foreach ops.

    `fused` as torch's: None picks the kernel for CPU float32/float64 tensors when it is
    available (`regimen.optim.native.status()` says why not), False always takes the foreach
    path, True requires the kernel (a RuntimeError where it cannot be built).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Lion(model.parameters(), lr=1e-4, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        fused: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Lion: lr = {lr}: must be >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas = {betas}: expected two numbers in [0, 1), e.g. (0.9, 0.99)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lion: weight_decay = {weight_decay}: must be >= 0")
        if fused and native.lion_kernel() is None:
            raise RuntimeError(f"Lion: fused=True, but the compiled kernel is not available ({native.status()})")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self.fused = fused

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Lion update of every parameter that has a gradient; returns the closure's loss."""
        loss = evaluate_closure(closure)

        scratch = scratch_of(self)
        kernel = native.lion_kernel() if self.fused is not False else None
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue

            grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs])
            for lists, _ in grouped.values():
                # torch types the buckets as list[Tensor | None]; these lists hold no None.
                p_list, g_list, m_list = cast("list[list[torch.Tensor]]", lists)
                if kernel is not None and cpu.on_cpu(p_list[0]) and native.fits([*p_list, *g_list, *m_list]):
                    lr, (beta1, beta2) = group["lr"], group["betas"]
                    kernel(p_list, g_list, m_list, lr, 1.0 - lr * group["weight_decay"], 1.0 - beta1, 1.0 - beta2)
                    continue
                for run in cpu_chunks(p_list):
                    _lion_update(p_list[run], g_list[run], m_list[run], scratch.like(p_list[run]), group)
        return loss


def _lion_update(
    p: list[torch.Tensor], g: list[torch.Tensor], m: list[torch.Tensor], scratch: list[torch.Tensor] | None, group: dict[str, Any]
) -> None:
    """One run of tensors; `scratch` (a run of one large CPU tensor, `Scratch.like`) receives sign(c)."""
    lr, wd = group["lr"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    # c = b1*m + (1-b1)*g is lerp(m, g, 1-b1); only its sign is used.
    if scratch is None:
        update = list(torch._foreach_lerp(m, g, 1.0 - beta1))
    else:
        update = scratch
        torch.lerp(m[0], g[0], 1.0 - beta1, out=update[0])
    torch._foreach_sign_(update)
    if wd != 0.0:
        torch._foreach_mul_(p, 1.0 - lr * wd)
    torch._foreach_add_(p, update, alpha=-lr)
    # The momentum is updated *after* the step, with the slower beta2.
    torch._foreach_lerp_(m, g, 1.0 - beta2)
