"""Compiled CPU kernels for regimen's own optimizers, built on first use, with a fallback.

torch's fused AdamW updates every parameter in one pass over memory (one C++ loop reads the
parameter, the gradient and both moments and writes them back); regimen's Lion on CPU ran five
elementwise ops (lerp, sign, mul, add, lerp), about 1.7x fused AdamW's time on the 10M GPT
(BENCHMARKS.md, own_optimizers). The kernel here is Lion's whole update in one loop over each
tensor (one read of the parameter, the gradient and the momentum, one write of the parameter and
the momentum), one C call for the whole parameter list, split over torch's threads with OpenMP.

How it is built: the C source below is compiled by the system C compiler (`cc`, or `$CC`) the
first time a process asks for it, into a cache directory (`$REGIMEN_CACHE`, else
`~/.cache/regimen`), named by a hash of the source, the compiler and the flags, and written
under a temporary name then renamed (two processes building at once both succeed). It needs no
torch headers, no Python headers and no network: a C compiler only. When there is none, or the
build or the load fails, or `REGIMEN_NATIVE=0`, `lion_kernel()` returns None and Lion keeps its
foreach path; `status()` says why. Installing regimen never builds anything.

Numerics: `-ffp-contract=off` (no fused multiply-adds the source does not ask for), so every
element is computed with the same roundings on every x86 or Arm CPU; `target_clones` compiles an
AVX-512 and an AVX2 version beside the baseline, picked at load time by the CPU's flags. The
formula is the reference's, with torch's `lerp` (`a + w (b - a)` for `w < 0.5`, else
`b - (b - a) (1 - w)`) and `sign` (NaN stays NaN): `tests/test_optim_own_vs_reference.py` checks
it against `regimen.optim.reference.LionReference`.

Example:
    >>> kernel = lion_kernel()
    >>> kernel is None or callable(kernel)
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_SOURCE = r"""
#include <stdint.h>

/* Lion, one element: c = lerp(m, g, w1); p = p * decay - lr * sign(c); m = lerp(m, g, w2). */
#define LERP(a, b, w) ((w) < 0.5 ? (a) + (w) * ((b) - (a)) : (b) - ((b) - (a)) * (1 - (w)))
#define SIGN(c) ((c) > 0 ? 1 : ((c) < 0 ? -1 : (c)))

#define LION_TENSOR(NAME, T)                                                                   \
    __attribute__((target_clones("avx512f", "avx2", "default")))                               \
    static void NAME(T *restrict p, const T *restrict g, T *restrict m, int64_t n, T lr,       \
                     T decay, T w1, T w2) {                                                    \
        if (w1 < 0.5 && w2 < 0.5) { /* the usual betas: both lerps in their first form */       \
            for (int64_t i = 0; i < n; i++) {                                                  \
                T mi = m[i], gi = g[i];                                                        \
                T c = mi + w1 * (gi - mi);                                                     \
                p[i] = p[i] * decay - lr * (T)SIGN(c);                                         \
                m[i] = mi + w2 * (gi - mi);                                                    \
            }                                                                                  \
        } else {                                                                               \
            for (int64_t i = 0; i < n; i++) {                                                  \
                T mi = m[i], gi = g[i];                                                        \
                T c = LERP(mi, gi, w1);                                                        \
                p[i] = p[i] * decay - lr * (T)SIGN(c);                                         \
                m[i] = LERP(mi, gi, w2);                                                       \
            }                                                                                  \
        }                                                                                      \
    }

LION_TENSOR(lion_f32, float)
LION_TENSOR(lion_f64, double)

/* Every tensor of a parameter list, cut into blocks that the threads share. */
#define BLOCK 16384
#define LION_LIST(NAME, ONE, T)                                                                \
    void NAME(T *const *p, T *const *g, T *const *m, const int64_t *n, int64_t count,          \
              double lr, double decay, double w1, double w2, int threads);                      \
    void NAME(T *const *p, T *const *g, T *const *m, const int64_t *n, int64_t count, double lr, double decay, \
              double w1, double w2, int threads) {                                             \
        int64_t blocks = 0;                                                                    \
        for (int64_t t = 0; t < count; t++) blocks += (n[t] + BLOCK - 1) / BLOCK;              \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && blocks > 1)") \
        for (int64_t b = 0; b < blocks; b++) {                                                 \
            int64_t t = 0, start = b;                                                          \
            while (start >= (n[t] + BLOCK - 1) / BLOCK) { start -= (n[t] + BLOCK - 1) / BLOCK; t++; } \
            int64_t lo = start * BLOCK, len = n[t] - lo < BLOCK ? n[t] - lo : BLOCK;            \
            ONE(p[t] + lo, g[t] + lo, m[t] + lo, len, (T)lr, (T)decay, (T)w1, (T)w2);          \
        }                                                                                      \
    }

LION_LIST(regimen_lion_f32, lion_f32, float)
LION_LIST(regimen_lion_f64, lion_f64, double)
"""
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp", "-std=c11"]
_STATUS: list[str] = ["not built yet"]

LionKernel = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor], float, float, float, float], None]


def status() -> str:
    """Why `lion_kernel()` is what it is: "built: PATH", or the reason it is not available."""
    return _STATUS[0]


def _cache_dir() -> Path:
    return Path(os.environ.get("REGIMEN_CACHE") or Path.home() / ".cache" / "regimen") / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _build() -> Path | None:
    """The shared library, from the cache or compiled now; None (and `status()`) when it cannot be."""
    cc = _compiler()
    if cc is None:
        _STATUS[0] = "no C compiler (cc, or $CC) on PATH"
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([_SOURCE, version, *_FLAGS]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"lion-{key}.so"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            src = Path(work) / "lion.c"
            src.write_text(_SOURCE)
            out = Path(work) / target.name
            proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:  # a compiler without OpenMP: one thread
                flags = [f for f in _FLAGS if f != "-fopenmp"]
                proc = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                _STATUS[0] = f"the C compiler failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
                return None
            os.replace(out, target)
        return target
    except (OSError, subprocess.SubprocessError) as e:
        _STATUS[0] = f"could not build ({type(e).__name__}: {e})"
        return None


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    """The tensors' data addresses as a C array of pointers (ABI-compatible with `T *const *`)."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


@lru_cache(maxsize=1)
def lion_kernel() -> LionKernel | None:
    """`kernel(params, grads, exp_avgs, lr, decay, w1, w2)`: Lion's update of contiguous CPU float32 or float64 tensors
    of one dtype in place (`decay` = 1 - lr * weight_decay, `w1` = 1 - beta1, `w2` = 1 - beta2); None where it cannot be built."""
    if os.environ.get("REGIMEN_NATIVE", "1") == "0":
        _STATUS[0] = "off: REGIMEN_NATIVE=0"
        return None
    path = _build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _STATUS[0] = f"could not load {path} ({e})"
        return None
    funcs = {torch.float32: lib.regimen_lion_f32, torch.float64: lib.regimen_lion_f64}
    for func in funcs.values():
        func.restype = None
    _STATUS[0] = f"built: {path}"

    def kernel(
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        lr: float,
        decay: float,
        w1: float,
        w2: float,
    ) -> None:
        sizes = (ctypes.c_int64 * len(params))(*[t.numel() for t in params])
        funcs[params[0].dtype](
            _pointers(params),
            _pointers(grads),
            _pointers(exp_avgs),
            sizes,
            ctypes.c_int64(len(params)),
            ctypes.c_double(lr),
            ctypes.c_double(decay),
            ctypes.c_double(w1),
            ctypes.c_double(w2),
            ctypes.c_int(torch.get_num_threads()),
        )

    return kernel


def fits(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the kernel can update these tensors: real (not fake, not traced), contiguous, on the CPU, all float32 or
    all float64."""
    if not tensors:
        return False
    # A fake tensor (`regimen plan` traces a step under FakeTensorMode) reports the CPU but has no
    # storage: reading its data pointer crashes the process. Under any dispatch mode the step must
    # also go through torch's ops, or the mode would not see it.
    if _get_current_dispatch_mode() is not None:
        return False
    dtype = tensors[0].dtype  # (is_cpu and is_contiguous are C calls: the check stays a small part of a step)
    return dtype in (torch.float32, torch.float64) and all(
        type(t) in _PLAIN and t.is_cpu and t.dtype is dtype and t.is_contiguous() for t in tensors
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # subclasses (FakeTensor, DTensor, ...) have no plain storage
