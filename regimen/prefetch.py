"""The next step's batch, gathered in the background while the current step trains.

nanoGPT fetches the next batch right after launching the forward pass, so the GPU never waits
for the data; a `DataLoader` does it with worker processes. regimen's trainer asks a
`Prefetcher` for the step's micro-batches (`take`), then tells it which samples the next step
will most likely read (`request`), and one background thread gathers them while the step runs.

The guess is checked, never trusted: `take` compares the sample ids it is asked for with those
it prefetched and gathers in the foreground when they differ (a rollback, an adaptive batch size
that changed). So the data a step sees is the same with or without prefetching, and a resumed
run is as exact as before; only where the time goes changes. The time `take` waits is returned,
for the data-wait share the benchmarks report.

Only sources that are pure reads are gathered in the background (`prefetch_safe = True`: token
windows, tensors, Hugging Face datasets). A user's `Dataset.__getitem__` is arbitrary code (a
random augmentation drawing from torch's global generator would draw in another order on
another thread, and the run would no longer be reproducible): it runs in the step, as before.

On CUDA the background thread also pins the batch's memory, so the copy to the device
(`non_blocking=True`) does not wait for the host either.

Example:
    >>> import numpy as np
    >>> from regimen.data import TokenWindows
    >>> p = Prefetcher(TokenWindows(np.arange(100, dtype=np.uint16), context=4))
    >>> p.request(np.array([3, 5]), [2])
    >>> batches, waited = p.take(np.array([3, 5]), [2])
    >>> batches[0][0].tolist()
    [[12, 13, 14, 15], [20, 21, 22, 23]]
    >>> p.close()
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from regimen.data import Samples


def prefetch_safe(samples: Samples) -> bool:
    """Whether gathering `samples` on another thread changes nothing but the timing (a pure read)."""
    return bool(getattr(samples, "prefetch_safe", False))


def gather_micro(samples: Samples, ids: np.ndarray, sizes: Sequence[int]) -> list[Any]:
    """The micro-batches of `ids`, consecutive runs of `sizes` samples."""
    out, start = [], 0
    for b in sizes:
        out.append(samples.gather(ids[start : start + b]))
        start += b
    return out


def _pinned(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_pinned(v) for v in batch)
    return batch


class Prefetcher:
    """Gathers the micro-batches a step asks for, from a background gather when it guessed them."""

    def __init__(self, samples: Samples, pin: bool = False) -> None:
        self.samples = samples
        self.pin = pin
        self.enabled = prefetch_safe(samples)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[bytes, tuple[int, ...], Future[list[Any]]] | None = None

    def _gather(self, ids: np.ndarray, sizes: Sequence[int]) -> list[Any]:
        batches = gather_micro(self.samples, ids, sizes)
        return [_pinned(b) for b in batches] if self.pin else batches

    def request(self, ids: np.ndarray, sizes: Sequence[int]) -> None:
        """Start gathering these micro-batches in the background (the next step's, most likely)."""
        if not self.enabled:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regimen-prefetch")
        ids = np.array(ids, copy=True)  # the caller's array may be a view of a buffer that changes
        self._pending = (ids.tobytes(), tuple(sizes), self._pool.submit(self._gather, ids, tuple(sizes)))

    def take(self, ids: np.ndarray, sizes: Sequence[int]) -> tuple[list[Any], float]:
        """(the micro-batches of `ids`, seconds waited for them): prefetched when they were requested, else gathered now.

        An error of the background gather is raised here, as the same gather in the foreground would.
        """
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == np.asarray(ids).tobytes() and pending[1] == tuple(sizes):
            batches = pending[2].result()
        else:
            batches = self._gather(np.asarray(ids), sizes)
        return batches, time.perf_counter() - start

    def close(self) -> None:
        """Stop the background thread (a gather in progress finishes first); safe to call twice."""
        self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
