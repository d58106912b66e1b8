"""The probe: each family's LR from the LR range test, and the batch from the gradient noise scale.

- LR: `regimen lr-find` on the family's strategy (its optimizer, CONFIG's batch and model)
  gives a suggestion (`LRFindResult.suggested`: the steepest descent of the smoothed loss); the
  family's candidates are that LR times `Space.lr_factors()`. When the sweep finds no descent,
  the family falls back to CONFIG's `optimizer.lr`, and the report says so.
- Batch: a short run of CONFIG with `observe.noise_scale = true` measures the simple noise
  scale B_noise (McCandlish et al. 2018), in samples. `decide_batch` turns it into the race's
  batch schedule (see there).

Example:
    >>> decide_batch(batch_schedule="fixed", size=16, noise_scale=20.0, total_samples=8000)
    ({}, 'keep batch 16: the measured noise scale (20 samples) is within 4x of it')
"""

from __future__ import annotations

import math
from typing import Any

# A ramp pays (fewer optimizer steps at nearly the same loss per sample) only when the batch is
# well below the critical batch: McCandlish et al. 2018 find steps fall nearly in proportion to
# the batch up to B_noise and flatten past it. The early estimate is a lower bound of the
# critical batch later in training (it grows as the loss falls), so a ramp toward it grows no
# faster than the noise scale says.
RAMP_FROM = 4.0
MAX_RAMP = 8  # at most 8x the starting batch


def decide_batch(batch_schedule: str, size: int, noise_scale: float | None, total_samples: int = 0) -> tuple[dict[str, Any], str]:
    """The race's batch keys from the probe's noise scale, and the reason, in one line.

    - CONFIG's batch is not `fixed` (a ramp, adaptive, ...): kept; the user chose it.
    - B_noise unmeasured, or below `RAMP_FROM` x the batch: keep the fixed batch.
    - B_noise at least `RAMP_FROM` x the batch: a ramp in stages from the batch, doubling up to
      the largest power-of-two multiple not above B_noise (at most `MAX_RAMP` x), one stage per
      doubling over the first quarter of the `total_samples` of a full run (`ramp_stages`), counted
      in samples: a pure function of progress, the same in every rung, so branches stay exact.

    >>> decide_batch("fixed", 16, 200.0, total_samples=8000)[0]["batch.schedule"]
    'ramp'
    """
    if batch_schedule != "fixed":
        return {}, f"keep CONFIG's batch schedule ({batch_schedule})"
    if noise_scale is None or not math.isfinite(noise_scale) or noise_scale <= 0:
        return {}, f"keep batch {size}: the noise scale was not resolved in the probe"
    if noise_scale < RAMP_FROM * size:
        return {}, f"keep batch {size}: the measured noise scale ({noise_scale:.0f} samples) is within {RAMP_FROM:g}x of it"
    top = size
    while top * 2 <= min(noise_scale, MAX_RAMP * size):
        top *= 2
    return (
        {"batch.schedule": "ramp", "batch.size": top, "batch.unit": "samples", "batch.stages": ramp_stages(size, top, total_samples)},
        f"ramp {size} -> {top} over the first quarter of the samples: the noise scale ({noise_scale:.0f} samples) is "
        f"{noise_scale / size:.0f}x the batch",
    )


def ramp_stages(start: int, top: int, total_samples: int) -> list[dict[str, int]]:
    """Stages doubling from `start` to `top` over the first quarter of `total_samples`, equal in samples.

    The critical batch grows fast early in training and then flattens (McCandlish et al. 2018;
    Merrill et al. 2025), so the ramp is early. Measured on the benchmark GPT at 131,072 samples
    (`benchmarks/batch_decision.py`, docs/tune.md): a ramp 16 -> 128 over the first quarter
    reached 1.04% below the best fixed batch's loss in 0.48x its steps; over the first half, 1.38%
    below in 0.71x.

    >>> ramp_stages(16, 64, 16000)
    [{'until': 2000, 'size': 16}, {'until': 4000, 'size': 32}]
    """
    sizes = []
    b = start
    while b < top:
        sizes.append(b)
        b *= 2
    span = total_samples // 4
    return [{"until": span * (i + 1) // len(sizes), "size": s} for i, s in enumerate(sizes)]
