"""Parallelism on torch.distributed: the process group from torchrun, DDP and FSDP2 wrapping.

All distributed code lives here and is explicit: `Dist` is a plain value passed to whoever
needs it (no singleton); whether gradients are synchronised on a micro-step is decided by the
caller through `grad_sync(model, enabled)`.

- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `Dist.from_env()` joins the
  group (gloo on CPU, nccl on CUDA) with a bounded timeout so a lost rank never hangs the job:
  every collective (and the join itself) fails after `REGIMEN_DIST_TIMEOUT` seconds (default
  300) instead of waiting forever for a rank that crashed or got stuck; torchrun then stops the
  other workers and exits non-zero.
- `mode = "ddp"`: DistributedDataParallel (gradients all-reduced and averaged over ranks).
- `mode = "fsdp"`: FSDP2, `fully_shard` on each transformer block, then on the root; with
  `fsdp_bf16` a mixed-precision policy computes in bf16 and reduces gradients in fp32; with
  `cpu_offload` torch's `CPUOffloadPolicy` keeps the shards (parameters, gradients, optimizer
  state) in host memory and copies each block to the device for its forward and backward.
  FSDP2 reduce-scatters each rank's gradient as soon as the backward ends, so a rank's own
  (local) gradient is never visible: estimators that need it (the noise scale) need `ddp`.
- Activation checkpointing (`checkpoint_activations`), applied before any wrapper as torchtitan
  does: each selected module is wrapped in torch's `checkpoint_wrapper` (non-reentrant
  `torch.utils.checkpoint`), so its activations are recomputed in the backward pass; with
  "selective", torch's selective checkpointing keeps the outputs of matmuls and attention and
  recomputes the cheap elementwise rest. The forward is the same computation and the RNG state
  is replayed (dropout draws the same mask), so training is exact. The wrapper adds
  `_checkpoint_wrapped_module` to parameter names but not to state-dict keys: checkpoints and
  exported weights are the same with and without it.

Example:
    >>> d = Dist()
    >>> d.world_size, d.is_main
    (1, True)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from regimen.errors import UserError

if TYPE_CHECKING:
    from regimen.strategy import ParallelConfig

TIMEOUT_ENV = "REGIMEN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


def dist_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks: `REGIMEN_DIST_TIMEOUT` seconds (default 300).

    Read when the group is created, not at import, so a launcher or a test can set it per job.
    A rank that stops answering fails the job after this long instead of hanging it.

    >>> os.environ[TIMEOUT_ENV] = "20"; dist_timeout().total_seconds()
    20.0
    >>> del os.environ[TIMEOUT_ENV]
    """
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw.strip():
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UserError(f"{TIMEOUT_ENV} = {raw!r}: must be a number of seconds > 0 (the longest a rank waits for the others)")
    return datetime.timedelta(seconds=seconds)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, local rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_type: str) -> Dist:
        """Join the process group torchrun describes in the environment (or stay single)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if "RANK" not in os.environ:
            raise UserError(f"WORLD_SIZE = {world} but RANK is not set: start distributed runs with torchrun or `regimen train --nproc N`")
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            timeout = dist_timeout()
            joined: dict[str, Any] = {"timeout": timeout}
            if (store := attempt_store(world, timeout)) is not None:
                joined.update(store=store, rank=rank, world_size=world)
            if device_type == "cuda":
                torch.cuda.set_device(local)
                # device_id binds NCCL to this rank's GPU at once (eager init, no guessing later).
                dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local), **joined)
            else:
                dist.init_process_group(backend="gloo", **joined)
        return cls(rank, world, local)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (a no-op for one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        """The minimum of `tensor` over ranks, in place (what every rank can afford)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group. The group object itself is kept until the process ends (see `_RETIRED`)."""
        if self.enabled and dist.is_initialized():
            _RETIRED.append(dist.group.WORLD)
            dist.destroy_process_group()


# Process groups this process left, kept alive until it ends. After `destroy_process_group` the
# last holder of a group is often a DDP reducer or an FSDP mesh; freeing that object then
# destroys the group, which joins gloo's threads while this thread holds the GIL, and a gloo
# thread still releasing the last collective's tensors waits for the GIL: a deadlock (seen in
# `regimen train --nproc` and in benchmarks/step_memory). Kept here, a group is destroyed only
# when the process ends (a torchrun worker of regimen's ends with os._exit: regimen.launch).
_RETIRED: list[Any] = []


def attempt_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The store of this torchrun attempt, or None where torch's default is right.

    torchrun (c10d rendezvous) hosts one TCPStore in its agent and hands every attempt the same
    address with no per-attempt prefix (pytorch/pytorch#135712). After `--max-restarts` restarts
    the group, the new workers read the keys the dead attempt left there: rank 0's old address
    (gloo: "connection refused") or a barrier counter already counted (a silent hang until the
    timeout). Prefixing the keys with the attempt number gives each attempt a clean namespace.
    Each node's agent counts the attempts and restarts all its workers together, so ranks agree;
    a node that joins an elastic job late counts from 0: such jobs should set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a store per rendezvous round, and no prefix here).

    >>> attempt_store(2, dist_timeout()) is None  # not under torchrun's agent store
    True
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"regimen/attempt_{attempt}", base)


def resolve_mode(mode: str, d: Dist) -> str:
    """`auto` means none for one process, ddp otherwise."""
    if mode == "auto":
        return "ddp" if d.enabled else "none"
    if mode in ("ddp", "fsdp") and not d.enabled:
        return "none"  # one process: nothing to distribute (same maths, no wrapper)
    return mode


def wrap(model: nn.Module, mode: str, d: Dist, device: torch.device, cfg: ParallelConfig | None = None) -> nn.Module:
    """The model wrapped for `mode` (the unwrapped model for `none`), checkpointed as `cfg` says."""
    if cfg is not None:
        checkpoint_activations(model, cfg.activation_checkpointing, cfg.checkpoint_modules)
    if mode == "none":
        if cfg is not None and cfg.cpu_offload:
            warnings.warn("parallel.cpu_offload is ignored: one process trains without FSDP2 (start several with --nproc)", stacklevel=2)
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        ddp = DDP(model, device_ids=ids)
        weakref.finalize(ddp, _let_gloo_threads_finish)  # runs before the reducer (and maybe the group) is freed
        return ddp
    if mode == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        bf16 = cfg is not None and cfg.fsdp_bf16
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        # Pinned host memory makes the copies to a GPU asynchronous; it needs CUDA to exist.
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg is not None and cfg.cpu_offload else OffloadPolicy()
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise UserError("parallel.mode = 'fsdp': the model has no `blocks` to shard; use ddp, or give the model a `blocks` ModuleList")
        for block in blocks:
            fully_shard(block, mp_policy=policy, offload_policy=offload)
        fully_shard(model, mp_policy=policy, offload_policy=offload)
        return model
    raise AssertionError(f"unknown parallel mode {mode!r}")


Select = Sequence[str] | Callable[[nn.Module], bool]


def checkpoint_activations(model: nn.Module, policy: str, select: Select | None = None) -> list[str]:
    """Recompute the activations of the selected modules in the backward pass; their names.

    `policy`: "none" (nothing happens), "block" (recompute everything inside each module) or
    "selective" (keep the outputs of matmuls and attention, recompute the rest). `select`:
    class names (`["Block"]`), a predicate on modules, or empty/None for the model's `blocks`.
    A module inside one already selected (or already checkpointed) is left alone.

    >>> from regimen.models import GPT, GPTConfig
    >>> checkpoint_activations(GPT(GPTConfig(context=8, n_layer=2, n_head=1, d_model=8)), "block")
    ['blocks.0', 'blocks.1']
    """
    if policy == "none":
        return []
    if policy not in ("block", "selective"):
        raise UserError(f"parallel.activation_checkpointing = {policy!r}: allowed: none, block, selective")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    chosen = _selector(model, policy, select)
    picked: list[str] = []
    inside: list[str] = []  # prefixes of modules already checkpointed: nothing below them is wrapped again
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, CheckpointWrapper):
            inside.append(name)
        elif name and chosen(module):
            picked.append(name)
            inside.append(name)
    if not picked and not inside:
        what = f"the classes {list(select)}" if isinstance(select, Sequence) and select else "the selection"
        found = sorted({type(m).__name__ for m in model.modules()})
        raise UserError(
            f"parallel.activation_checkpointing = {policy!r}: no module of the model matches {what} "
            f"(its classes: {', '.join(found[:12])}); set parallel.checkpoint_modules"
        )
    kwargs: dict[str, Any] = {"context_fn": _selective_contexts} if policy == "selective" else {}
    for name in picked:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, checkpoint_wrapper(parent.get_submodule(child), **kwargs))
    return picked


def _selector(model: nn.Module, policy: str, select: Select | None) -> Callable[[nn.Module], bool]:
    if callable(select):
        return select
    if isinstance(select, str):
        select = [select]
    if select:
        names = set(select)
        return lambda m: type(m).__name__ in names
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UserError(
            f"parallel.activation_checkpointing = {policy!r}: the model has no `blocks`; "
            "name the modules to recompute by class in parallel.checkpoint_modules, e.g. ['Block']"
        )
    ids = {id(b) for b in blocks}
    return lambda m: id(m) in ids


@functools.cache  # asked for every op of every checkpointed forward
def _saved_ops() -> frozenset[Any]:
    """The ops whose outputs selective checkpointing keeps: matmuls and attention (the costly ones)."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu"]
    names += ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"]
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_matmuls)


# How long a freed DDP module lets go of the GIL before its reducer is destroyed (see below).
GLOO_SETTLE_S = 0.05


def _let_gloo_threads_finish() -> None:
    """Give gloo's worker threads the GIL for a moment before a DDP module's reducer is freed.

    A gloo thread releases the tensors of a finished collective a moment after `wait()`
    returns, and releasing a tensor Python owned takes the GIL. When the reducer is the last
    holder of the process group, freeing it destroys the group, which joins those threads while
    this thread holds the GIL: a deadlock, seen in 3 of 8 two-process runs of
    benchmarks/step_memory (main thread in `~ProcessGroupGloo` -> `thread::join`, the gloo thread
    in `gil_scoped_acquire` from `~AsyncWork`). Sleeping releases the GIL, so a waiting thread
    finishes before the join; the finalizer runs before the module's attributes are freed.
    """
    time.sleep(GLOO_SETTLE_S)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP or torch.compile wrapper."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Synchronise gradients in this backward only when `enabled` (the last micro-step).

    DDP: the backward runs inside `no_sync()` (gradients accumulate locally). FSDP2: the flag is
    set on every micro-step, both ways, so a skipped sync never leaks into the next step.
    """
    inner: Any = getattr(model, "_orig_mod", model)  # duck-typed: no FSDP import for one process
    if hasattr(inner, "no_sync") and not enabled:  # DDP
        with inner.no_sync():
            yield
        return
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(enabled)
    yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (FSDP2 returns DTensor norms and parameters)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
