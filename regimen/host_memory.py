"""Host memory between steps: keep what a step frees for the next step, instead of faulting it in again.

A training step on the CPU frees and reallocates the same buffers every step (activations, the
gradients `zero_grad(set_to_none=True)` drops, the optimizer's temporaries). glibc's malloc
serves buffers above its mmap threshold with fresh `mmap`s and gives the top of its heap back to
the kernel once more than its trim threshold is free; both thresholds move by themselves as the
program frees memory (its "dynamic threshold"). Whether a training process settles where the
step's buffers are reused, or where they are unmapped and faulted in again, depends on the order
of its allocations: on the 10M GPT of `benchmarks/loop_speed.py` (second half of 24 steps, four
fresh processes each), the hand-written loop averaged 1,900 to 4,200 page faults a step and
regimen's trainer 0 to 8,000, with single steps of 14,000-17,500 (55-70 MiB of fresh pages, each
zeroed by the kernel: about 1 us of CPU each here, so up to 8 ms a step on average and 17 ms in
one step, of a 450 ms step). Part of the 10M loop-speed gap of issue 15, and of the spread
between fresh processes of every loop (BENCHMARKS.md, "profile_step").

`keep_freed_memory()` fixes both thresholds (mmap at glibc's largest, 32 MiB; trim at the largest
`mallopt` takes, 2 GiB, so in practice never), so freed buffers stay in the process and the next
step reuses them: after the first steps, a step makes no page fault. The price: memory a step
freed is not returned to the kernel while training runs (the process's resident size stays at its peak, which the step reaches
anyway); `release_freed_memory()` hands it back at the end of a run. The trainer calls both on
CPU runs (`Trainer.fit`); `REGIMEN_MALLOC=default` leaves glibc's own behaviour. Other C
libraries (musl, macOS) are left alone: the calls do nothing there.

Example:
    >>> keep_freed_memory() in (True, False)  # False where the C library is not glibc
    True
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import lru_cache

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger buffers are always mmapped
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the largest


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # a value that does not fit raises, never wraps
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (fixed mmap and trim thresholds); whether it applied."""
    libc = _glibc()
    if libc is None or os.environ.get("REGIMEN_MALLOC", "") == "default":
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def release_freed_memory() -> None:
    """Give the memory malloc holds free back to the kernel (the end of a run)."""
    libc = _glibc()
    if libc is not None and os.environ.get("REGIMEN_MALLOC", "") != "default":
        libc.malloc_trim(0)
