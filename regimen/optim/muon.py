"""Muon with the Newton-Schulz iteration in a dtype the device computes fast.

Muon (Jordan et al. 2024) orthogonalises the Nesterov momentum of each hidden weight matrix
with five steps of a quintic Newton-Schulz iteration before applying it:

    m      = mu*m + (1-mu)*g                     (torch's lerp form)
    u      = NS5(lerp(g, m, mu)) if nesterov else NS5(m)
    theta  = theta * (1 - lr*wd) - lr_adj * u    (lr_adj: torch's `adjust_lr_fn`)

`torch.optim.Muon` always runs the iteration in bfloat16: right on GPUs and on CPUs with native
bf16 matrix units, but a CPU without them (AVX2, AVX-512 without BF16) emulates bf16 matmuls
several times slower than float32 ones; on the built-in GPT that made Muon's step 10x AdamW's.
This class is torch's Muon (same hyperparameters, same state, so checkpoints load in either)
with `ns_dtype`: "auto" (bfloat16 where the hardware has it, float32 elsewhere), "bfloat16"
(torch's behaviour bit for bit) or "float32" (more accurate, and the fast one on such CPUs).

Example:
    >>> w = torch.nn.Parameter(torch.randn(8, 4))
    >>> opt = Muon([w], lr=0.02, ns_dtype="float32")
    >>> w.grad = torch.randn(8, 4); opt.step()
    >>> opt.state[w]["momentum_buffer"].shape
    torch.Size([8, 4])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import _muon

from regimen.optim.closure import evaluate_closure
from regimen.strategy import NS_DTYPES


@functools.cache  # asked for every matrix at every step; the answer never changes
def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (GPUs; CPUs with AVX512-BF16 or AMX)."""
    if device.type != "cpu":
        return True
    try:  # oneDNN's own check (AVX512-BF16 or AMX); a build without oneDNN emulates bf16
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of the matrix `g`, computed in `dtype`.

    The same sequence of operations as torch's `_zeropower_via_newtonschulz` (so bfloat16 gives
    torch's result exactly); the result is in `dtype`.

    >>> q = newton_schulz(torch.randn(16, 8), (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    >>> bool(((torch.linalg.svdvals(q) - 1).abs() < 0.35).all())  # singular values near 1
    True
    """
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with the Newton-Schulz iteration in `ns_dtype` (see the module)."""

    def __init__(self, params: Iterable[Any], *, ns_dtype: str = "auto", **kwargs: Any) -> None:
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype = {ns_dtype!r}: allowed: {', '.join(NS_DTYPES)}")
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    def _dtype(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype == "auto":
            return torch.bfloat16 if native_bf16(device) else torch.float32
        return torch.bfloat16 if self.ns_dtype == "bfloat16" else torch.float32

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p, g, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(g, 1 - mu)
                u = g.lerp(buf, mu) if group["nesterov"] else buf
                u = newton_schulz(u, group["ns_coefficients"], group["ns_steps"], group["eps"], self._dtype(p.device))
                p.mul_(1 - lr * wd)
                # torch's own lr rule ("original" or "match_rms_adamw"), so both classes agree.
                p.add_(u, alpha=-_muon._adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
