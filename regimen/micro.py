"""`batch.micro = "auto"`: the largest micro-batch that fits a device, chosen once when a run starts.

The planner's model of memory (`regimen.estimate`) is traced on a fake copy of the model (no
memory is used), under the run's own parallel mode, activation checkpointing and optimizer; the
largest micro-batch whose predicted peak stays under `1 - AUTO_HEADROOM` of the memory of a
device wins. Every rank computes its own answer and the smallest is taken (`all_reduce` MIN),
so all ranks run the same micro-batch (a finder that probes each rank alone, as Lightning's
does, leaves ranks disagreeing under DDP).

The memory of a device is `parallel.memory_gib` when set, else what is available now
(`regimen.devices.memory_available`) plus what this process already holds (its resident set on
a CPU, its allocated tensors on a GPU), since the prediction counts those again; on a CPU, the
processes of one machine share its memory equally.

The number is written into the resolved strategy (`strategy.toml` in the run directory). A
resumed run reads it back from there and keeps it, even if the memory available has changed
since: the micro-batch decides the batch sizes' rounding and the order of summation, so
changing it would change the run.

Example:
    >>> from regimen.strategy import Strategy
    >>> s = Strategy.load(None, ["batch.micro=8"])
    >>> choose_micro(s, None, "none", None, None, None) is s  # not "auto": nothing to choose
    True
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from regimen import devices, estimate
from regimen.errors import UserError
from regimen.strategy import Strategy, read_toml
from regimen.trace import fake_copy

GiB = 2**30


def allocator_fraction(device_type: str) -> float:
    """What the allocator holds beyond the live tensors, as a share of them (docs/plan.md, "The rest").

    CUDA's caching allocator rounds blocks and fragments: 5%. On a CPU, glibc's heap keeps freed
    blocks below its (self-raising) mmap threshold: measured 15% to 45% above the tensors on
    this machine (more with activation checkpointing's recomputation), so 20%; with
    `MALLOC_MMAP_THRESHOLD_` set every large block is returned when freed, and 2% remains.

    >>> allocator_fraction("cuda")
    0.05
    """
    if device_type == "cuda":
        return 0.05
    return 0.02 if os.environ.get("MALLOC_MMAP_THRESHOLD_") else 0.20


def choose_micro(strategy: Strategy, task: Any, mode: str, d: Any, device: Any, run_dir: Path | None) -> Strategy:
    """`strategy` with `batch.micro = "auto"` replaced by a number (the same on every rank)."""
    if strategy.batch.micro != "auto":
        return strategy
    saved = saved_micro(run_dir) if d.is_main else 0
    # The flags of these all-reduces live on the step's device: NCCL reduces only device tensors.
    agreed_saved = int(d.all_reduce_sum(torch.tensor([saved or 0], dtype=torch.int64, device=device)).item())
    if agreed_saved > 0:
        if d.is_main:
            print(f"regimen: batch.micro = auto: {agreed_saved}, as chosen when this run started (strategy.toml)", file=sys.stderr)
        return strategy.replace({"batch.micro": agreed_saved})
    memory, runtime, what = device_memory(strategy, task.model, device)
    choice, share = plan_micro(strategy, task, mode, d.world_size, memory, runtime, device)
    mine = choice.micro or 0  # 0: nothing fits here, and every rank must learn it together
    agreed = int(d.all_reduce_min(torch.tensor([mine], dtype=torch.int64, device=device)).item())
    if agreed == 0:
        need = choice.footprint.peak / GiB
        raise UserError(
            f"batch.micro = 'auto': even a micro-batch of 1 needs about {need:.2f} GiB per device, more than "
            f"{(1 - estimate.AUTO_HEADROOM) * memory / GiB:.2f} GiB of the {memory / GiB:.2f} GiB {what}; "
            "try parallel.activation_checkpointing, parallel.mode = 'fsdp' or more devices (see `regimen plan`)"
        )
    if d.is_main:
        print(
            f"regimen: batch.micro = auto: {agreed} of a rank's {share} samples per step "
            f"(predicted peak {choice.footprint.peak / GiB:.2f} GiB of {memory / GiB:.2f} GiB {what})",
            file=sys.stderr,
        )
    return strategy.replace({"batch.micro": agreed})


def saved_micro(run_dir: Path | None) -> int | None:
    """The micro-batch a run directory's `strategy.toml` holds, if it holds a number."""
    if run_dir is None or not (run_dir / "strategy.toml").is_file():
        return None
    micro = read_toml(run_dir / "strategy.toml").get("batch", {}).get("micro")
    return micro if isinstance(micro, int) and not isinstance(micro, bool) and micro > 0 else None


def device_memory(strategy: Strategy, model: torch.nn.Module, device: Any) -> tuple[float, estimate.Runtime, str]:
    """(bytes of one device's memory, what it holds besides training tensors, how it was found)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    held = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    if device.type == "cuda":
        baseline = 0.0  # the CUDA context lies outside what mem_get_info calls free
        held = torch.cuda.memory_allocated(device)
    else:
        baseline = max(resident_bytes() - held, 0)  # Python, torch, the data: they stay for the run
    runtime = estimate.Runtime(baseline, allocator_fraction(kind), "")
    if strategy.parallel.memory_gib is not None:
        return strategy.parallel.memory_gib * GiB, runtime, "(parallel.memory_gib)"
    share = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    free = devices.memory_available(device) / share
    return free + held + baseline, runtime, "available" + (f" (1/{share} of this machine's)" if share > 1 else "")


def resident_bytes() -> int:
    """This process's resident set size now (Linux), else 0."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmRSS:\s+(\d+)", status)
    return int(found.group(1)) * 1024 if found else 0


def plan_micro(
    strategy: Strategy, task: Any, mode: str, world: int, memory: float, runtime: estimate.Runtime, device: Any
) -> tuple[estimate.Choice, int]:
    """The largest micro-batch of the run's layout that fits in `memory` bytes, and the rank share."""
    s = strategy
    assert task.data is not None
    share = max(1, math.ceil(estimate.largest_batch(s.batch, len(task.data.train)) / world))
    policy = s.parallel.activation_checkpointing
    try:
        trace = estimate.trace_policy(lambda m: fake_copy(task.model, m), task, s, policy, estimate.traced_sizes(share))
    except UserError:
        raise
    except Exception as e:  # a model that reads its data, or cannot be copied
        what = f"{type(e).__name__}: {e}"
        raise UserError(
            f"batch.micro = 'auto': the training step cannot be traced on fake tensors ({what}); set batch.micro to a number"
        ) from None
    layout = estimate.Layout(mode, world, policy, s.parallel.cpu_offload, 1)
    host_is_device = device.type == "cpu"
    choice = estimate.largest_fitting(trace, layout, s.batch, share, memory, runtime, host_is_device, estimate.AUTO_HEADROOM)
    return choice, share
