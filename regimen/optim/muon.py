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
with `ns_dtype`: "auto" (bfloat16 where the hardware multiplies it natively, float32 elsewhere),
"bfloat16" (torch's behaviour bit for bit) or "float32" (more accurate, and the fast one on
such CPUs).

How "auto" decides on a CPU (`native_bf16`): by the instructions the CPU has, not by oneDNN's
answer alone and not by timing. oneDNN calls bf16 "supported" on every AVX-512 CPU, where it
emulates it (a bf16 matmul was measured 2.9x slower than a float32 one on an AVX-512 Xeon
without AVX512-BF16, issue 11; on AVX2 torch's bf16 Muon step is 25x regimen's float32 one,
BENCHMARKS.md). bf16 is fast exactly where the CPU multiplies it: the
AVX512-BF16 dot product or AMX-BF16 tiles on x86, FEAT_BF16 (BFMMLA) on Arm. So "auto" picks
bfloat16 when oneDNN (torch's bf16 matmul path on CPU) is present *and* the CPU reports one of
those flags (torch's cpuinfo capabilities, else /proc/cpuinfo); anywhere the flags cannot be
read, float32: accurate and never the emulation penalty (what it can give up is native bf16's
speed-up, about 2x with AVX512-BF16 and more with AMX, on a machine whose flags are unreadable).
A one-time measurement was rejected: on a shared or busy machine it is noise, and it would make
a run's arithmetic depend on the load at start-up, so two ranks of one job, or a run and its
resume, could pick different dtypes; the flags are a fixed property of the machine.
GPUs: bfloat16 from compute capability 8 (Ampere) on, and on ROCm, as torch's own check.

Example:
    >>> w = torch.nn.Parameter(torch.randn(8, 4))
    >>> opt = Muon([w], lr=0.02, ns_dtype="float32")
    >>> w.grad = torch.randn(8, 4); opt.step()
    >>> opt.state[w]["momentum_buffer"].shape
    torch.Size([8, 4])
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.optim import _muon

from regimen.optim.closure import evaluate_closure
from regimen.optim.cpu import is_dtensor
from regimen.strategy import NS_DTYPES

# CPU flags of instructions that multiply bfloat16 natively: AVX512-BF16 and AMX-BF16 on x86
# (Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later), FEAT_BF16 on Arm (Graviton 3,
# Neoverse V1/N2, Apple M2 and later); the names cpuinfo and Linux's /proc/cpuinfo use.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The feature flags in the text of Linux's /proc/cpuinfo (`flags` on x86, `Features` on Arm).

    >>> sorted(parse_cpuinfo_flags("flags : fpu avx2 avx512f"))
    ['avx2', 'avx512f', 'fpu']
    """
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags: torch's cpuinfo capabilities where torch has them, and /proc/cpuinfo on Linux.

    Empty where neither answers (an older torch off Linux): "auto" then picks float32.

    >>> isinstance(cpu_flags(), frozenset)
    True
    """
    flags: set[str] = set()
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if capabilities is not None:
        with contextlib.suppress(RuntimeError, AttributeError):
            flags.update(name for name, present in capabilities().items() if present is True)
    with contextlib.suppress(OSError):  # not Linux
        flags.update(parse_cpuinfo_flags(Path("/proc/cpuinfo").read_text(errors="replace")))
    return frozenset(flags)


def onednn_bf16() -> bool:
    """Whether torch's oneDNN has a bf16 matmul for this CPU (without oneDNN, torch's fallback kernels emulate bf16).

    >>> isinstance(onednn_bf16(), bool)
    True
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_is_native(flags: frozenset[str], onednn: bool) -> bool:
    """The rule of "auto" on a CPU (see the module): oneDNN present and a native bf16 instruction.

    >>> cpu_bf16_is_native(frozenset({"avx2", "avx512f", "avx512bw"}), onednn=True)  # AVX-512 without BF16: emulated
    False
    >>> cpu_bf16_is_native(frozenset({"avx512f", "avx512_bf16", "amx_bf16"}), onednn=True)
    True
    """
    return onednn and not flags.isdisjoint(NATIVE_BF16_FLAGS)


@functools.cache  # asked for every matrix at every step; the answer never changes in a process
def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (see the module for the rule and why).

    >>> native_bf16(torch.device("cpu")) == cpu_bf16_is_native(cpu_flags(), onednn_bf16())
    True
    """
    if device.type == "cpu":
        return cpu_bf16_is_native(cpu_flags(), onednn_bf16())
    if device.type == "cuda":
        # bf16 tensor cores from Ampere (compute capability 8) on; every ROCm GPU torch supports.
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return True  # other accelerators: torch's own choice, bfloat16


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of the matrix `g`, computed in `dtype`.

    The same sequence of operations as torch's `_zeropower_via_newtonschulz` (so bfloat16 gives
    torch's result exactly); the result is in `dtype`. `g` itself is left untouched (without
    Nesterov it is the momentum buffer).

    >>> q = newton_schulz(torch.randn(16, 8), (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    >>> bool(((torch.linalg.svdvals(q) - 1).abs() < 0.35).all())  # singular values near 1
    True
    """
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    # Out of place: `g.to(dtype)` is `g` itself when it already has the dtype, and an in-place
    # division would rescale the caller's tensor (the momentum buffer, without Nesterov).
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
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
                args = (group["ns_coefficients"], group["ns_steps"], group["eps"], self._dtype(p.device))
                u = _on_whole_matrix(u, args) if is_dtensor(u) else newton_schulz(u, *args)
                p.mul_(1 - lr * wd)
                # torch's own lr rule ("original" or "match_rms_adamw"), so both classes agree.
                p.add_(u, alpha=-_muon._adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def _on_whole_matrix(u: Any, args: tuple[Any, ...]) -> Any:
    """Newton-Schulz of a sharded matrix (FSDP2's DTensor): gathered once, iterated whole, re-sharded.

    Every rank gathers the matrix (one all-gather), runs the iteration on it, and keeps its own
    shard of the result, cut locally (`src_data_rank=None`: no further communication). Run on
    the DTensor itself, each of the iteration's matmuls would redistribute its operands: 15
    collectives per matrix per step instead of one, at a latency each (gloo's is about 0.1-1 ms).
    Every rank repeats the whole iteration, so the update's arithmetic is not divided among
    ranks (a 1/N share of it would need the collectives back).
    """
    from torch.distributed.tensor import distribute_tensor

    whole = newton_schulz(u.full_tensor(), *args)
    return distribute_tensor(whole, u.device_mesh, u.placements, src_data_rank=None)
