"""How regimen's own optimizers step on CPU: runs of tensors that stay in cache, one reused temporary.

On CUDA a step is one foreach kernel per op over all tensors of a (device, dtype). On CPU,
foreach streams the whole model through memory once per op, so the own optimizers (Lion, LAMB,
LARS, schedule-free) instead run every op of the update over one run of tensors at a time
(`cpu_chunks`), and take the temporary of a large tensor from a buffer kept across steps
(`Scratch`), measured faster than both foreach and a fresh temporary (BENCHMARKS.md,
own_optimizers).

Example:
    >>> runs = cpu_chunks([torch.zeros(10), torch.zeros(10), torch.zeros(CPU_CHUNK_NUMEL)])
    >>> runs
    [slice(0, 2, None), slice(2, 3, None)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import Optimizer

# On CPU a step runs its ops over runs of consecutive tensors of at most this many elements (a
# larger tensor alone): each run stays in cache across the ops of the update, and the small
# tensors (biases, norms) share one run instead of paying Python's per-op cost each.
CPU_CHUNK_NUMEL = 1 << 16


def on_cpu(t: torch.Tensor) -> bool:
    """Whether `t` lives in host memory: per-tensor runs, reusable temporaries, free read-backs."""
    return t.device.type == "cpu"


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (FSDP2's parameters and their gradients and state)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def cpu_chunks(tensors: Sequence[torch.Tensor]) -> list[slice]:
    """The runs of a per-(device, dtype) bucket a step updates together: the whole bucket off CPU."""
    if not tensors or not on_cpu(tensors[0]):
        return [slice(0, len(tensors))]
    runs, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        if i > start and size + t.numel() > CPU_CHUNK_NUMEL:
            runs.append(slice(start, i))
            start, size = i, 0
        size += t.numel()
    runs.append(slice(start, len(tensors)))
    return runs


class Scratch:
    """The temporary of an optimizer's update for its large CPU tensors, kept across steps.

    A fresh full-size temporary per large tensor costs page faults on CPU (the allocator hands
    large blocks back to the OS when they are freed), so each is a view of one flat buffer per
    dtype, as large as the largest tensor. Other runs get None and their foreach ops allocate:
    off CPU the caching allocator makes that cheap, and small tensors come from the heap. So do
    FSDP2's DTensor shards: a plain buffer cannot stand in for them.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._views: dict[tuple[torch.dtype, torch.Size], torch.Tensor] = {}

    def like(self, run: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """[a temporary shaped as the tensor] for a run of one large floating-point CPU tensor, else None."""
        t = run[0]
        if len(run) != 1 or t.numel() <= CPU_CHUNK_NUMEL or not on_cpu(t) or not t.is_floating_point():
            return None
        if is_dtensor(t):
            # FSDP2's shard reports its global shape, and torch's ops refuse to mix it with a
            # plain tensor: its run takes foreach's own temporaries.
            return None
        view = self._views.get((t.dtype, t.shape))
        if view is None:
            buffer = self._buffers.get(t.dtype)
            if buffer is None or buffer.numel() < t.numel():
                buffer = self._buffers[t.dtype] = torch.empty(t.numel(), dtype=t.dtype)
                self._views = {k: v for k, v in self._views.items() if k[0] != t.dtype}
            view = self._views[(t.dtype, t.shape)] = buffer[: t.numel()].view(t.shape)
        return [view]


def scratch_of(optimizer: Optimizer) -> Scratch:
    """The optimizer's `Scratch`, made on first use (a pickled or deep-copied optimizer keeps only its state)."""
    scratch = optimizer.__dict__.get("_scratch")
    if scratch is None:
        scratch = optimizer.__dict__["_scratch"] = Scratch()
    return scratch
