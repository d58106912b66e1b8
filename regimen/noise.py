"""The gradient noise scale: how large a batch is still worth its samples.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A) estimate the
noise scale from the squared norms of two gradients of the same loss at the same parameters,
one over a small batch of b samples and one over a big batch of B samples. Since
E|G_b|^2 = |G|^2 + tr(S)/b, where G is the true gradient and S the per-sample gradient covariance,
two batch sizes give two unbiased estimates:

    |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(S) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)
    B_noise = EMA(tr S) / EMA(|G|^2)

Each estimate is very noisy (the |G|^2 one is often negative early on), so they are smoothed
separately and only then divided: the ratio of the averages is a consistent estimate, the
average of per-step ratios is not (a ratio of noisy numbers is biased and can blow up near 0).
The averages are bias-corrected like Adam's moments (divided by 1 - ema^n), so the first values
are not pulled towards 0; an average spans about 1 / (1 - ema) updates.

Reading the value
-----------------
B_noise is a batch size in the unit the batch sizes are given in; the trainer passes samples, so
it is in samples (for a language model whose samples are sequences of T tokens, B_noise * T is
the critical batch in tokens). It is McCandlish's "simple" noise scale B_simple, which takes the
Hessian to be a multiple of the identity; they find the critical batch size B_crit close to it.
Below B_noise, doubling the batch nearly halves the steps to a given loss (samples are used
well); far above it, a bigger batch barely saves steps and wastes samples. It typically grows
by an order of magnitude or more as the loss falls, which is what an adaptive batch schedule
follows. A negative value means the noise is not resolved yet (the tr(S) average is below 0);
None means there is no positive |G|^2 average yet.

Which gradients the trainer uses (see "One step" in DESIGN.md)
--------------------------------------------------------------
Both norms are taken before clipping and, with a loss scaler, after unscaling; a step whose
gradients are not finite is skipped and must not be fed to `NoiseScaleEstimator.update`.
The big batch is always the global batch B: the accumulated (and, under DDP, all-reduced)
.grad just before clipping, i.e. `grad_sqnorm(params)` at batch B. The small batch is:

- Several micro-batches (gradient accumulation, one process or DDP): the first micro-batch's
  gradient. The step scales each micro-batch loss by (b_i / B) * world_size, and the first
  backward runs under no_sync, so right after it .grad holds that rank's micro-batch gradient
  times (b_1 / B) * world_size: small = grad_sqnorm(params) * (B / (b_1 * world_size))^2 at b_1.
- DDP with one micro-batch per rank: the rank's local gradient, at batch b = B / world_size.
  DDP all-reduces inside backward, so it is only visible before the all-reduce: take its squared
  norm in a DDP communication hook (the bucket holds the local gradient) or run that backward
  under no_sync and all-reduce the gradients by hand.
- Under DDP, average the small squared norm over ranks (an all_reduce of one scalar, which needs
  no host sync) before `update`: every rank then feeds the same numbers and holds the same
  estimator state, so rank 0's checkpoint is right for all ranks and any decision taken from
  B_noise (an adaptive batch size) agrees across ranks. The average is also less noisy.
- One process, one micro-batch: nothing smaller than the batch exists, so `ConsecutiveGradients`
  pairs this step's gradient with the previous step's (AdaptDL's approach): small = the two
  single gradients at batch B, big = their average at batch 2B. It is an approximation; see there.

Cost: `grad_sqnorm` and `ConsecutiveGradients.pair` return tensors on the gradients' device and
`NoiseScaleEstimator.update` keeps its averages as float64 tensors on that device, so feeding the
estimator every step never synchronises host and device; reading `noise_scale` does (one
`.item()`), so read it when logging.

Example:
    >>> est = NoiseScaleEstimator(ema=0.9)
    >>> est.update(small_sqnorm=2.0, small_batch=2, big_sqnorm=1.5, big_batch=4)
    >>> est.grad_sqnorm, est.trace_cov, est.noise_scale  # |G|^2 = 2*1.5 - 2, tr(S) = 4*(2 - 1.5)
    (1.0, 2.0, 2.0)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

__all__ = ["ConsecutiveGradients", "GradientPair", "NoiseScaleEstimator", "grad_sqnorm"]

Number = float | int | torch.Tensor


def _tensors_sqnorm(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum of squared L2 norms of `tensors`, one foreach kernel per (device, dtype) group."""
    # _foreach_norm only widens (bf16 -> fp32 is fine, fp64 -> fp32 raises) and wants one device
    # per launch, so group first; this loop builds lists, it does no math per tensor.
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    if not groups:
        return torch.zeros((), dtype=dtype)
    parts = []
    for (_, t_dtype), group in groups.items():
        norms = torch._foreach_norm(group, 2, dtype=torch.promote_types(t_dtype, dtype))
        parts.append(torch.stack(norms).square().sum())
    return _total(parts, tensors[0].device)


def _tensors_dot(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum over pairs of the dot products <a_i, b_i>, accumulated in `dtype` or wider (one read of each)."""
    assert len(a) == len(b)
    if not a:
        return torch.zeros((), dtype=dtype)
    parts = []
    for x, y in zip(a, b):
        x, y = x.reshape(-1), y.reshape(-1)
        if x.dtype != dtype or y.dtype != dtype:  # narrower tensors are widened first (`.to` costs a dispatch even when a no-op)
            wide = torch.promote_types(torch.promote_types(x.dtype, y.dtype), dtype)
            x, y = x.to(wide), y.to(wide)
        parts.append(torch.dot(x, y))  # reads both operands once, without a temporary
    return _total(parts, a[0].device)


def _total(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of 0-dim partial sums, on `device`, in the widest of their dtypes."""
    if len(parts) == 1:
        return parts[0]
    out_dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))
    return torch.stack([p.to(device=device, dtype=out_dtype) for p in parts]).sum()


def grad_sqnorm(params: Iterable[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The squared global L2 norm of the `.grad` of `params`, as a 0-dim tensor (no host sync).

    Parameters without a gradient are skipped. Each tensor's norm is accumulated in `dtype` (or
    wider, for float64 gradients), so bf16/fp16 gradients do not lose the sum to rounding. The
    result lives on the first gradient's device (CPU when there is none, with value 0).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> grad_sqnorm([w])
        tensor(25.)
    """
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        return _tensors_sqnorm(grads, dtype)


class GradientPair(NamedTuple):
    """Squared gradient norms at a small and a big batch, in `NoiseScaleEstimator.update` order."""

    small_sqnorm: torch.Tensor
    small_batch: float
    big_sqnorm: torch.Tensor
    big_batch: float


class ConsecutiveGradients:
    """Pairs each step's gradient with the previous step's, for the one-process, one-micro-batch case.

    Given g_t at batch B_t and the kept g_{t-1} at batch B_{t-1}, `pair` returns
      small = (|g_t|^2 + |g_{t-1}|^2) / 2 at batch 2 / (1/B_t + 1/B_{t-1})  (B when both are B),
      big   = |(B_t g_t + B_{t-1} g_{t-1}) / (B_t + B_{t-1})|^2 at batch B_t + B_{t-1}  (2B).
    Both expectations are exact for two independent batches at the same parameters: the
    sample-weighted mean of two batches is a batch of B_t + B_{t-1}, and the mean of the two
    single norms has E = |G|^2 + tr(S) * (1/B_t + 1/B_{t-1}) / 2. Averaging both single norms
    (as AdaptDL does), rather than using |g_t|^2 alone, halves the noise of the small estimate and
    makes small - big = |g_t - g_{t-1}|^2 / 4 >= 0 for equal batches, so tr(S) is never negative.

    The approximation: g_{t-1} was taken at theta_{t-1}, not theta_t. It is valid while the
    parameters change slowly between steps; the true-gradient drift dG = G(theta_t) - G(theta_{t-1})
    adds about B |dG|^2 / 2 to the tr(S) estimate, so B_noise reads high when the learning rate
    is large. Measure g_t before clipping.

    Cost: big is expanded as (B_t^2 |g_t|^2 + B_{t-1}^2 |g_{t-1}|^2 + 2 B_t B_{t-1} <g_t, g_{t-1}>)
    / (B_t + B_{t-1})^2, so a step reads both gradients once for the dot product and nothing else:
    |g_t|^2 can come from the caller (the trainer's non-finite guard already computed the norm),
    and the gradient is kept by reference, not copied, because the trainer sets .grad to None
    after each step and the next backward allocates new tensors. The kept tensors' version
    counters tell whether anything wrote into them in place since (a loop that zeroes .grad
    instead of dropping it, an optimizer that edits gradients): then that pair is dropped and
    from there on the gradient is copied. A caller that scales the gradients in place on purpose
    (clipping) says so with `scaled`, and the dot product is divided by the factor.

    State: `state_dict()` holds the kept gradient (as large as the model); the trainer saves it
    in checkpoints so that a resumed run pairs, and adapts its batch, exactly as before.
    Call `reset` after a skipped (non-finite) step or a rollback so no pair straddles it.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> pairs = ConsecutiveGradients()
        >>> w.grad = torch.tensor([6.0, 0.0])
        >>> pairs.pair([w], batch=8) is None  # nothing to pair with yet
        True
        >>> w.grad = torch.tensor([0.0, 8.0])
        >>> p = pairs.pair([w], batch=8)  # small = (36 + 64) / 2, big = |[3, 4]|^2
        >>> float(p.small_sqnorm), p.small_batch, float(p.big_sqnorm), p.big_batch
        (50.0, 8.0, 25.0, 16.0)
    """

    def __init__(self) -> None:
        self._prev: list[torch.Tensor] | None = None
        self._prev_sqnorm: torch.Tensor | None = None
        self._prev_batch = 0.0
        self._prev_scale = 1.0  # the kept tensors hold scale x the kept gradient (`scaled`)
        self._by_reference = True  # False once something wrote into a kept .grad in place
        self._versions: list[int] = []  # the kept tensors' version counters when last seen

    def state_dict(self) -> dict[str, Any]:
        """The kept gradient (as large as the model), so that a resume pairs exactly as before."""
        if self._prev is None:
            return {}
        return {
            "prev": list(self._prev),
            "prev_sqnorm": self._prev_sqnorm,
            "prev_batch": self._prev_batch,
            "prev_scale": self._prev_scale,
            "by_reference": self._by_reference,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.reset()
            return
        self._prev = [t.clone() for t in state["prev"]]
        self._prev_sqnorm = state["prev_sqnorm"].clone()
        self._prev_batch = float(state["prev_batch"])
        self._prev_scale = float(state.get("prev_scale", 1.0))
        self._by_reference = bool(state.get("by_reference", False))
        self._versions = [t._version for t in self._prev]

    def reset(self) -> None:
        """Forget the kept gradient; the next `pair` starts a new pairing (and returns None)."""
        self._prev = None
        self._prev_sqnorm = None
        self._prev_batch = 0.0
        self._prev_scale = 1.0
        self._versions = []

    def scaled(self, factor: float) -> None:
        """The caller multiplied the gradients just paired by `factor` in place (clipping them)."""
        if self._prev is None or not self._by_reference:
            return  # nothing kept, or a copy the multiply did not reach
        self._prev_scale *= float(factor)
        self._versions = [t._version for t in self._prev]

    def pair(self, params: Iterable[torch.Tensor], batch: float, sqnorm: torch.Tensor | None = None) -> GradientPair | None:
        """Keep the current `.grad` of `params` (mean over `batch` samples); pair it with the last one.

        `sqnorm`, when given, is the gradients' squared norm the caller already has (saving a
        read of them). Returns None on the first call after construction or `reset`, when the
        set of parameters with a gradient changed, or when a kept gradient was written in place
        since; otherwise a `GradientPair` of 0-dim tensors.
        """
        if not batch > 0:
            raise ValueError(f"batch = {batch!r}: must be > 0 (samples in the gradient's batch)")
        batch = float(batch)
        with torch.no_grad():
            grads = [p.grad for p in params if p.grad is not None]
            if sqnorm is None:
                sqnorm = _tensors_sqnorm(grads, torch.float32)
            prev, result = self._prev, None
            if prev is not None and self._by_reference and [t._version for t in prev] != self._versions:
                # Written in place: that gradient is lost, and the tensors are not ours to copy into.
                self._by_reference, self._prev, prev = False, None, None
            if prev is not None and [t.shape for t in prev] == [g.shape for g in grads]:
                assert self._prev_sqnorm is not None
                total = batch + self._prev_batch
                w, w_prev = batch / total, self._prev_batch / total
                dot = _tensors_dot(grads, prev, torch.float32)
                big = sqnorm * w**2 + self._prev_sqnorm * w_prev**2 + dot * (2 * w * w_prev / self._prev_scale)
                small = (sqnorm + self._prev_sqnorm) / 2
                small_batch = 2.0 / (1.0 / batch + 1.0 / self._prev_batch)
                result = GradientPair(small, small_batch, big, total)
            self._keep(grads)
            self._prev_sqnorm = sqnorm
            self._prev_batch = batch
        return result

    def _keep(self, grads: list[torch.Tensor]) -> None:
        self._prev_scale = 1.0
        if self._by_reference:
            self._prev = list(grads)
            self._versions = [g._version for g in grads]
            return
        if self._prev is None or [t.shape for t in self._prev] != [g.shape for g in grads]:
            self._prev = [torch.empty_like(g) for g in grads]  # allocated once, then copied into
        torch._foreach_copy_(self._prev, grads)


class NoiseScaleEstimator:
    """Bias-corrected moving averages of |G|^2 and tr(S), and their ratio B_noise (in samples).

    Feed it one (small, big) pair of squared gradient norms per step; the norms may be python
    numbers or 0-dim tensors (then the averages stay float64 tensors on their device, with no
    host sync). Part of the training state: save `state_dict()` with the checkpoint.

    Example:
        >>> est = NoiseScaleEstimator(ema=0.5)
        >>> est.noise_scale is None
        True
        >>> est.update(2.0, 2, 1.5, 4)  # |G|^2 ~ 2*1.5 - 2 = 1, tr(S) ~ 4*(2 - 1.5) = 2
        >>> est.update(3.0, 2, 1.5, 4)  # |G|^2 ~ 0, tr(S) ~ 6
        >>> est.grad_sqnorm, est.trace_cov, est.noise_scale  # (0.25*1 + 0.5*0)/0.75, (0.25*2 + 0.5*6)/0.75
        (0.3333333333333333, 4.666666666666667, 14.0)
    """

    def __init__(self, ema: float = 0.95) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema = {ema!r}: must be in [0, 1) (the weight of the past in the moving average)")
        self.ema = float(ema)
        self._count = 0
        # Uncorrected averages m_n = ema * m_{n-1} + (1 - ema) * x_n; divided by 1 - ema^n on read.
        self._grad_sqnorm_avg = torch.zeros((), dtype=torch.float64)
        self._trace_cov_avg = torch.zeros((), dtype=torch.float64)

    @property
    def num_updates(self) -> int:
        """How many pairs the averages hold."""
        return self._count

    def update(self, small_sqnorm: Number, small_batch: float, big_sqnorm: Number, big_batch: float) -> None:
        """Add one pair: |G_b|^2 = `small_sqnorm` at b = `small_batch`, |G_B|^2 at B = `big_batch` > b."""
        b, B = float(small_batch), float(big_batch)
        if not 0 < b < B:
            raise ValueError(f"small_batch = {small_batch!r}, big_batch = {big_batch!r}: need 0 < small_batch < big_batch")
        small = self._to_state(small_sqnorm)
        big = self._to_state(big_sqnorm)
        # Coefficients are computed on the host so tensor inputs meet only python scalars: no
        # host-to-device copies, no sync.
        grad_sqnorm_est = big * (B / (B - b)) - small * (b / (B - b))
        trace_cov_est = (small - big) * (1.0 / (1.0 / b - 1.0 / B))
        self._grad_sqnorm_avg = self._grad_sqnorm_avg * self.ema + grad_sqnorm_est * (1.0 - self.ema)
        self._trace_cov_avg = self._trace_cov_avg * self.ema + trace_cov_est * (1.0 - self.ema)
        self._count += 1

    def _to_state(self, x: Number) -> torch.Tensor | float:
        """A float, or a float64 tensor on the device the averages now live on (moved there once)."""
        if not isinstance(x, torch.Tensor):
            return float(x)
        # MPS has no float64: there the averages live on the CPU (a sync per update; untested).
        device = torch.device("cpu") if x.device.type == "mps" else x.device
        if device != self._grad_sqnorm_avg.device:
            self._grad_sqnorm_avg = self._grad_sqnorm_avg.to(device)
            self._trace_cov_avg = self._trace_cov_avg.to(device)
        return x.detach().to(device).to(torch.float64)

    def _correction(self) -> float:
        return 1.0 - self.ema**self._count

    @property
    def grad_sqnorm(self) -> float | None:
        """The bias-corrected average of the |G|^2 estimates (None before the first update)."""
        if self._count == 0:
            return None
        return self._grad_sqnorm_avg.item() / self._correction()

    @property
    def trace_cov(self) -> float | None:
        """The bias-corrected average of the tr(S) estimates (None before the first update)."""
        if self._count == 0:
            return None
        return self._trace_cov_avg.item() / self._correction()

    @property
    def noise_scale(self) -> float | None:
        """B_noise = EMA(tr S) / EMA(|G|^2), in samples; None until the |G|^2 average is > 0."""
        if self._count == 0:
            return None
        # The bias corrections of the two averages are equal and cancel in the ratio.
        grad_sqnorm_avg = self._grad_sqnorm_avg.item()
        if not grad_sqnorm_avg > 0:
            return None
        return self._trace_cov_avg.item() / grad_sqnorm_avg

    def state_dict(self) -> dict[str, Any]:
        """The averages as python floats (exact for float64), the update count and the ema."""
        return {
            "ema": self.ema,
            "num_updates": self._count,
            "grad_sqnorm_avg": self._grad_sqnorm_avg.item(),
            "trace_cov_avg": self._trace_cov_avg.item(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the next update continues exactly where that run left off.

        The checkpoint's ema wins over the constructor's (the averages were built with it, and
        the bias correction needs it); a different one is warned about.
        """
        ema = float(state["ema"])
        if ema != self.ema:
            warnings.warn(f"noise-scale ema {self.ema} ignored: the checkpoint's averages use ema {ema}", stacklevel=2)
        if not (0.0 <= ema < 1.0 and math.isfinite(state["grad_sqnorm_avg"]) and math.isfinite(state["trace_cov_avg"])):
            raise ValueError(f"noise-scale state {state!r}: ema must be in [0, 1) and the averages finite")
        self.ema = ema
        self._count = int(state["num_updates"])
        device = self._grad_sqnorm_avg.device
        self._grad_sqnorm_avg = torch.tensor(float(state["grad_sqnorm_avg"]), dtype=torch.float64, device=device)
        self._trace_cov_avg = torch.tensor(float(state["trace_cov_avg"]), dtype=torch.float64, device=device)
