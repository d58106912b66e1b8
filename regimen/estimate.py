"""Memory and time of a training step, per device, from traced steps and a machine's speed.

The model of memory (per device, at the step's peak):

    peak = parameters + optimizer state                       (exact: counted from the real tensors)
         + max over the step's phases of (gradients live + activations live)   (traced)
         + the rest: communication buffers (DDP's gradient buckets, FSDP's gathered blocks)
                     and the runtime (allocator, process), stated per device kind

The phases are the first micro-batch of a step (no gradients yet), a later one (gradients
accumulating: present when a rank's share takes several micro-batches) and the update (clip
and optimizer step, with every gradient and the optimizer's temporaries). Each is traced once,
on fake tensors (`regimen.trace`): the model's own forward and backward under the strategy's
autocast and activation checkpointing, with regimen's own optimizer built over the fake
parameters, so every byte of state comes from the real implementation (Adam's two moments,
Muon's momentum with AdamW's for the rest, Adafactor's factored rows and columns, schedule-free's
z, Lion's one buffer, the step counters). Two micro-batch sizes are traced and everything in
between or below is interpolated linearly (activations are linear in the batch).

FSDP2 (`fully_shard` per block and on the root) keeps 1/N of each parameter, gradient and
same-shaped optimizer state tensor per device (dim-0 chunks, the first rank's being the
largest), gathers the root's parameters for the whole forward and backward and at most two
blocks at a time (the one computing and the one prefetched), and holds one block's unsharded
gradients while it reduce-scatters them. Micro-batches before the last accumulate unsharded
gradients (no reduce-scatter until the step's last backward). With CPU offload the shards live
in host memory and the update runs there.

The model of time (per step): each traced op costs its dispatch overhead plus, for matmuls and
attention, its own time measured on this machine at its shapes (or its FLOPs at a datasheet's
peak for an accelerator that is not here); every other op moving at least 1 MiB its own time
measured the same way where it can be rerun alone, else (and for the smaller ones) the bytes it
moves at the measured memory bandwidth; plus the step's communication, counted without overlap:
DDP all-reduces the gradients bucket by bucket; FSDP2 all-gathers each block's parameters for
its forward and again for its backward and reduce-scatters its gradients. Between CPU processes
of this host each collective is timed here (gloo, latency + bandwidth: `ddp_communication`,
`fsdp_communication`); for an accelerator the bytes move at the link's datasheet bandwidth.
FSDP2's own work: its copies into and out of the collectives' buffers, at the memory bandwidth,
with its communication (`fsdp_copy_bytes`); its hooks' host time per unit and parameter, timed on
this host (`regimen.devices.fsdp_overhead`), with each micro-batch's host time
(`fsdp_hook_seconds`); every op of an FSDP2 rank's update dispatches through DTensor (a further
cost per op, timed there too) while its arithmetic covers the rank's shards only.

Example:
    >>> fits(Footprint(params=1, grads=1, optimizer=2, activations=4, buffers=0, runtime=0), memory=8)
    True
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from regimen import parallel
from regimen.devices import Speed
from regimen.optim import build_optimizer
from regimen.strategy import BatchConfig, Strategy
from regimen.task import Task
from regimen.trace import Recorder, Tally, fake_mode

# The share of the memory `batch.micro = "auto"` leaves free: the model's error and the
# allocator's fragmentation (see docs/plan.md).
AUTO_HEADROOM = 0.10


@dataclass(frozen=True)
class Layout:
    """How a step runs: parallel mode over `devices`, activation checkpointing, offload, micro-batch."""

    mode: str
    devices: int
    checkpointing: str
    offload: bool
    micro: int

    def applied_to(self, strategy: Strategy) -> Strategy:
        """`strategy` with this layout's parallel mode, checkpointing, offload and micro-batch."""
        return strategy.replace(
            {
                "parallel.mode": self.mode,
                "parallel.activation_checkpointing": self.checkpointing,
                "parallel.cpu_offload": self.offload,
                "batch.micro": self.micro,
            }
        )

    def label(self) -> str:
        parts = [self.mode if self.devices == 1 else f"{self.mode} x{self.devices}"]
        if self.checkpointing != "none":
            parts.append(f"ckpt={self.checkpointing}")
        if self.offload:
            parts.append("offload")
        return " ".join(parts)


@dataclass
class Footprint:
    """Bytes per device at the peak of a step, by what holds them."""

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float  # communication buffers: DDP's gradient buckets, FSDP's gathered parameters
    runtime: float  # allocator and process overhead
    host: float = 0.0  # kept in host memory instead (CPU offload to an accelerator)

    @property
    def rest(self) -> float:
        return self.buffers + self.runtime

    @property
    def peak(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.rest


def fits(footprint: Footprint, memory: float, headroom: float = 0.0) -> bool:
    """Whether the peak fits in `memory` bytes, keeping `headroom` (a fraction) free."""
    return footprint.peak <= memory * (1.0 - headroom)


# ---- exact counts of the persistent tensors ---------------------------------------------


@dataclass(frozen=True)
class ParamState:
    """One parameter: its shape, element sizes, its optimizer state tensors, and its FSDP unit."""

    shape: tuple[int, ...]
    element_size: int
    grad_element_size: int
    states: tuple[tuple[tuple[int, ...], int], ...]  # (shape, bytes) of each state tensor
    unit: int  # index of its block in `model.blocks`, or -1 for the root
    # Its update needs the whole matrix (Muon's Newton-Schulz): under FSDP2 every rank gathers it
    # and repeats the update (`regimen.optim.muon`).
    whole_update: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.element_size


def first_chunk(nbytes: int, shape: tuple[int, ...], n: int) -> int:
    """Bytes of the first (largest) of `n` dim-0 chunks of a tensor of `shape` (FSDP2's sharding, torch.chunk's split).

    >>> first_chunk(10 * 4, (10,), 4)  # chunks of 3, 3, 3 and 1 elements
    12
    """
    if not shape or shape[0] == 0:
        return nbytes
    return nbytes // shape[0] * math.ceil(shape[0] / n)


@dataclass
class StateCount:
    """Exact bytes of parameters, gradients and optimizer state, one entry per distinct parameter."""

    params: list[ParamState]

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    @property
    def grad_bytes(self) -> int:
        return sum(math.prod(p.shape) * p.grad_element_size for p in self.params)

    @property
    def optimizer_bytes(self) -> int:
        return sum(b for p in self.params for _, b in p.states)

    def sharded(self, n: int) -> tuple[int, int, int]:
        """(params, grads, optimizer) bytes on the most loaded of `n` FSDP2 ranks.

        A state tensor shaped like its parameter is sharded with it; any other (a step counter,
        a factored statistic) is replicated.
        """
        params = sum(first_chunk(p.nbytes, p.shape, n) for p in self.params)
        grads = sum(first_chunk(math.prod(p.shape) * p.grad_element_size, p.shape, n) for p in self.params)
        optim = sum(first_chunk(b, s, n) if s == p.shape else b for p in self.params for s, b in p.states)
        return params, grads, optim

    def per_unit(self, element_size: Callable[[ParamState], int]) -> dict[int, int]:
        """Unsharded bytes of each FSDP2 unit (-1: the root), each parameter at `element_size(p)` bytes an element."""
        units: dict[int, int] = {}
        for p in self.params:
            units[p.unit] = units.get(p.unit, 0) + math.prod(p.shape) * element_size(p)
        return units

    def unit_bytes(self, element_size: int | None = None) -> tuple[int, int]:
        """(root's unsharded bytes, the largest block's), at `element_size` if given (FSDP's compute dtype)."""
        units = self.per_unit(lambda p: element_size or p.element_size)
        root = units.pop(-1, 0)
        return root, max(units.values(), default=0)


def count_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateCount:
    """The persistent tensors of `model` and `optimizer` (after a step, so the state exists)."""
    blocks = getattr(model, "blocks", None)
    unit_of: dict[int, int] = {}
    if isinstance(blocks, nn.ModuleList):
        for i, block in enumerate(blocks):
            unit_of.update({id(p): i for p in block.parameters()})
    from regimen.optim.muon import Muon

    inner = getattr(optimizer, "optimizers", [optimizer])  # regimen's CombinedOptimizer (Muon + AdamW)
    whole = {id(p) for o in inner if isinstance(o, Muon) for g in o.param_groups for p in g["params"]}
    state = optimizer.state
    out = []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        tensors = [v for v in state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        states = tuple((tuple(v.shape), v.untyped_storage().nbytes()) for v in tensors)
        grad_size = p.grad.element_size() if p.grad is not None else p.element_size()
        out.append(ParamState(tuple(p.shape), p.element_size(), grad_size, states, unit_of.get(id(p), -1), id(p) in whole))
    return StateCount(out)


# ---- traced phases --------------------------------------------------------------------------


@dataclass
class Phase:
    """A traced stretch of a step: gradients and other transient bytes at its peak, and its ops."""

    grads: float
    activations: float
    tally: Tally

    @property
    def transient(self) -> float:
        return self.grads + self.activations


@dataclass
class PolicyTrace:
    """Every phase of a step under one activation-checkpointing policy, at the traced micro-batches."""

    policy: str
    state: StateCount
    first: dict[int, Phase]
    later: dict[int, Phase]
    update: Phase


def _interpolate(phases: dict[int, Phase], m: int) -> tuple[float, float]:
    """(grads, activations) at micro-batch `m`, linear through the traced sizes."""
    sizes = sorted(phases)
    if len(sizes) == 1:
        p = phases[sizes[0]]
        return p.grads, p.activations
    lo, hi = sizes[0], sizes[-1]
    w = (m - lo) / (hi - lo)
    a, b = phases[lo], phases[hi]
    return a.grads + w * (b.grads - a.grads), max(0.0, a.activations + w * (b.activations - a.activations))


def trace_policy(
    make_model: Callable[[Any], nn.Module],
    task: Task,
    strategy: Strategy,
    policy: str,
    sizes: list[int],
) -> PolicyTrace:
    """Trace a step's phases under `policy` at each micro-batch size in `sizes` (fake tensors).

    `make_model(mode)` returns a fresh model of fake tensors of that `FakeTensorMode` (it is
    checkpointed here, in place): built under the mode, or `regimen.trace.fake_copy`.
    """
    s = strategy
    mode = fake_mode()
    model = make_model(mode)
    parallel.checkpoint_activations(model, policy, s.parallel.checkpoint_modules)
    assert task.data is not None, "tracing needs the task's data (a template batch)"
    samples = task.data.train
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if s.train.precision == "bf16" else None
    recorder = Recorder()
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    hooks = [p.register_post_accumulate_grad_hook(lambda p: recorder.hold([p.grad], "grads")) for p in params]
    max_norm = s.train.clip if s.train.clip > 0 else math.inf

    def micro(m: int) -> None:
        batch = _fake_batch(samples.gather(np.arange(m) % len(samples)), mode)
        recorder.hold(_tensors(batch), "activations")
        with autocast if autocast is not None else contextlib.nullcontext():
            loss, _, _ = task.forward(batch, model)
        (loss * 0.5).backward()  # the trainer scales each micro-batch's loss by its share

    def update(optimizer: torch.optim.Optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    recorder.hold(params, "params")
    # The fake mode first, the recorder above it: the recorder sees each op before the fake
    # mode computes its output's shape.
    try:
        with mode:
            optimizer = build_optimizer(model, s.optimizer)
            with recorder, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                micro(sizes[0])  # a first step creates the optimizer's state
                update(optimizer)
                recorder.hold([v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)], "optimizer")
                first, later = {}, {}
                for m in sizes:
                    first[m] = _phase(recorder, functools.partial(micro, m))
                    later[m] = _phase(recorder, functools.partial(micro, m))
                    if m != sizes[-1]:
                        optimizer.zero_grad(set_to_none=True)
                # The update of a step that ended with the largest micro-batch (gradients present).
                upd = _phase(recorder, lambda: update(optimizer))
                micro(sizes[0])  # gradients again, for the exact count below
                state = count_state(model, optimizer)
    finally:
        for h in hooks:
            h.remove()
    return PolicyTrace(policy, state, first, later, upd)


def _phase(recorder: Recorder, fn: Callable[[], None]) -> Phase:
    base_params, base_optim = recorder.live["params"], recorder.live["optimizer"]
    recorder.reset()
    fn()
    peak = recorder.peak
    # Parameters and optimizer state are counted exactly elsewhere; anything else is transient.
    extra = (peak["params"] - base_params) + (peak["optimizer"] - base_optim)
    tally = recorder.tally
    recorder.reset()  # what runs next is not this phase's
    return Phase(float(peak["grads"]), float(peak["activations"] + extra), tally)


def _fake_batch(batch: Any, mode: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return mode.from_tensor(batch)
    if isinstance(batch, dict):
        return {k: _fake_batch(v, mode) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_fake_batch(v, mode) for v in batch)
    return batch


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensors(v)]
    return []


# ---- one layout: memory and time ------------------------------------------------------------


@dataclass
class Runtime:
    """What a device holds besides the training tensors: a fixed part and a share of the peak."""

    fixed: float
    fraction: float
    what: str


def footprint(trace: PolicyTrace, layout: Layout, share: int, runtime: Runtime, host_is_device: bool, fsdp_bf16: bool = False) -> Footprint:
    """Bytes per device at the peak of a step of `layout`, a rank's share of the batch being `share`."""
    n, m = layout.devices, layout.micro
    several = math.ceil(share / m) >= 2
    st = trace.state
    g1, a1 = _interpolate(trace.first, m)
    g2, a2 = _interpolate(trace.later, m) if several else (0.0, 0.0)
    upd = trace.update
    if layout.mode == "fsdp":
        params, grads, optim = st.sharded(n)
        root, block = st.unit_bytes(2 if fsdp_bf16 else None)
        gathered = root + 2 * block + st.unit_bytes()[1]  # the root, two blocks, one block's unsharded gradients
        phases = [(g1 / n, a1), (g2, a2) if several else (0.0, 0.0), (grads, upd.activations / n)]
        if layout.offload and not host_is_device:
            host = params + optim + grads
            phases[-1] = (0.0, 0.0)  # the update runs in host memory
            fp = Footprint(0.0, 0.0, 0.0, 0.0, gathered, 0.0, host)
            g, a = max(phases, key=sum)
            fp.grads, fp.activations = g, a
        else:
            g, a = max(phases, key=sum)
            fp = Footprint(params, g, optim, a, gathered, 0.0)
    else:
        phases = [(g1, a1), (g2, a2), (upd.grads, upd.activations)]
        g, a = max(phases, key=sum)
        buckets = st.grad_bytes if layout.mode == "ddp" else 0.0
        fp = Footprint(st.param_bytes, g, st.optimizer_bytes, a, buckets, 0.0)
    fp.runtime = runtime.fixed + runtime.fraction * fp.peak
    return fp


def phase_parts(tally: Tally, speed: Speed) -> tuple[float, float]:
    """(device seconds, host seconds) of a traced stretch on a device of `speed` (see the module docstring)."""
    compute = sum(n * speed.compute_seconds(k, tally.flops_of[k]) for k, n in tally.compute.items())
    large = sum(n * speed.op_seconds.get(k, tally.bytes_of[k] / speed.bandwidth) for k, n in tally.large.items())
    device = compute + large + tally.memory_bytes / speed.bandwidth
    return device, tally.ops * speed.overhead_s + tally.module_calls * speed.module_call_s


def _combined(device: float, host: float, host_is_device: bool) -> float:
    # A CPU dispatches and computes on the same threads; an accelerator overlaps them.
    return device + host if host_is_device else max(device, host)


def phase_seconds(tally: Tally, speed: Speed, host_is_device: bool, device_share: float = 1.0, extra_host: float = 0.0) -> float:
    """Seconds of a traced stretch on a device of `speed`.

    `device_share`: the part of its arithmetic this rank does (an FSDP2 rank updates its shards
    alone), while it dispatches every op; `extra_host`: host seconds beyond the ops' dispatch.
    """
    device, host = phase_parts(tally, speed)
    return _combined(device * device_share, host + extra_host, host_is_device)


@dataclass
class StepTime:
    """Seconds of one step: compute (traced ops, with FSDP2's hooks) and communication (collectives, with FSDP2's copies)."""

    compute: float
    communication: float

    @property
    def total(self) -> float:
        return self.compute + self.communication


def step_time(
    trace: PolicyTrace, layout: Layout, share: float, speed: Speed, host_is_device: bool, fsdp_bf16: bool = False, scale: float = 1.0
) -> StepTime:
    """Seconds per step of `layout` with a rank share of `share` samples; `scale` corrects compute (calibration)."""
    n, m = layout.devices, layout.micro
    k = max(1, math.ceil(share / m))
    st = trace.state
    # FSDP2's hooks run on the host every micro-batch, whatever its size (`fsdp_hook_seconds`).
    hooks = fsdp_hook_seconds(st, speed) if layout.mode == "fsdp" else 0.0

    def at(phases: dict[int, Phase], size: float) -> float:
        """A micro-batch of `size` samples: device and host time each linear through the traced sizes."""
        sizes = sorted(phases)
        parts = [phase_parts(phases[s].tally, speed) for s in sizes]
        if len(sizes) == 1:
            device, host = (x * size / sizes[0] for x in parts[0])
        else:
            w = (size - sizes[0]) / (sizes[-1] - sizes[0])
            device, host = (a + w * (b - a) for a, b in zip(parts[0], parts[-1], strict=True))
        return _combined(device, host + hooks, host_is_device)

    last = share - (k - 1) * m  # the last micro-batch may be smaller
    micro_time = at(trace.first, m if k > 1 else share) + max(k - 2, 0) * at(trace.later, m) + (at(trace.later, last) if k > 1 else 0.0)
    comm = 0.0
    if layout.mode == "fsdp":
        # Each rank updates its shards, except where the update needs whole matrices (Muon's
        # Newton-Schulz dominates its step): there every rank repeats all of it. Every rank
        # dispatches every op of the update, each through DTensor.
        share_of_update = 1.0 if any(p.whole_update for p in st.params) else 1.0 / n
        dtensor = trace.update.tally.ops * speed.fsdp.dtensor_op_s if speed.fsdp else 0.0
        update = phase_seconds(trace.update.tally, speed, host_is_device, share_of_update, dtensor)
        comm = fsdp_communication(st, n, k, speed, fsdp_bf16) + fsdp_copy_bytes(st, n, k, fsdp_bf16) / speed.bandwidth
        if layout.offload and not host_is_device:
            params, grads, _ = st.sharded(n)
            comm += (2 * params + grads) / speed.host_link
    else:
        update = phase_seconds(trace.update.tally, speed, host_is_device)
        if layout.mode == "ddp":
            comm = ddp_communication(st.grad_bytes, n, speed)
    comm += sync_communication(layout.mode, n, speed)
    return StepTime((micro_time + update) * scale, comm)


def sync_communication(mode: str, n: int, speed: Speed) -> float:
    """Seconds of a step's small all-reduces among `n` ranks (latency only; none untimed).

    The step's one host sync is an all-reduce of its losses and gradient norm (a few floats);
    under FSDP2 that norm is a sum over shards, all-reduced first.
    """
    timed = speed.collectives.get("all_reduce")
    if n < 2 or timed is None:
        return 0.0
    return (2 if mode == "fsdp" else 1) * timed.seconds(64)


# DDP's gradient buckets: the first holds about 1 MiB (so the all-reduce starts early), the rest
# 25 MiB each (torch's `_DEFAULT_FIRST_BUCKET_BYTES` and `bucket_cap_mb`).
DDP_FIRST_BUCKET = 2**20
DDP_BUCKET = 25 * 2**20


def ddp_buckets(grad_bytes: int) -> list[int]:
    """The sizes of DDP's all-reduces for `grad_bytes` of gradients.

    >>> ddp_buckets(60 * 2**20) == [2**20, 25 * 2**20, 25 * 2**20, 9 * 2**20]
    True
    """
    sizes = [min(grad_bytes, DDP_FIRST_BUCKET)]
    rest = grad_bytes - sizes[0]
    while rest > 0:
        sizes.append(min(rest, DDP_BUCKET))
        rest -= sizes[-1]
    return [b for b in sizes if b > 0]


def ddp_communication(grad_bytes: int, n: int, speed: Speed) -> float:
    """Seconds of DDP's all-reduces of a step: each bucket timed (`Speed.collectives`), else a ring at the link's bandwidth."""
    timed = speed.collectives.get("all_reduce")
    if timed is None:
        return 2 * (n - 1) / n * grad_bytes / speed.link
    return sum(timed.seconds(b) for b in ddp_buckets(grad_bytes))


def _fsdp_units(st: StateCount, micro_batches: int, fsdp_bf16: bool) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """Per FSDP2 unit: the bytes it gathers, how often a step gathers them, the gradient bytes it reduces.

    A block is gathered for its forward and again for its backward in every micro-batch, the root
    once per micro-batch (it stays gathered until its backward); gradients are reduced once a
    step, in float32 under `fsdp_bf16`.
    """
    gathered = st.per_unit(lambda p: 2 if fsdp_bf16 else p.element_size)
    reduced = st.per_unit(lambda p: 4 if fsdp_bf16 else p.grad_element_size)
    return gathered, {u: micro_batches * (1 if u < 0 else 2) for u in gathered}, reduced


def fsdp_communication(st: StateCount, n: int, micro_batches: int, speed: Speed, fsdp_bf16: bool) -> float:
    """Seconds of FSDP2's collectives of a step.

    Each block's parameters are all-gathered for its forward and again for its backward (they
    are resharded in between), in every micro-batch; the root's once per micro-batch (it stays
    gathered until its backward). Each unit's gradients are reduce-scattered once, after the
    last micro-batch. A whole-matrix update (Muon) all-gathers each such matrix once more.
    Timed collectives (`Speed.collectives`) pay their latency per call; otherwise the bytes
    move at the link's bandwidth.
    """
    gathered, gathers, reduced = _fsdp_units(st, micro_batches, fsdp_bf16)
    # A whole-matrix update gathers its momentum (shaped and typed as the parameter) once per step.
    whole = [p.nbytes for p in st.params if p.whole_update]
    all_gather, reduce_scatter = speed.collectives.get("all_gather"), speed.collectives.get("reduce_scatter")
    if all_gather is None or reduce_scatter is None:
        moved = sum(gathers[u] * b for u, b in gathered.items()) + sum(reduced.values()) + sum(whole)
        return (n - 1) / n * moved / speed.link
    return (
        sum(gathers[u] * all_gather.seconds(b) for u, b in gathered.items())
        + sum(all_gather.seconds(b) for b in whole)
        + sum(reduce_scatter.seconds(b) for b in reduced.values())
    )


def fsdp_copy_bytes(st: StateCount, n: int, micro_batches: int, fsdp_bf16: bool) -> float:
    """Bytes FSDP2 reads and writes copying into and out of its collectives' buffers in a step.

    Each gather copies the rank's shard into the all-gather's input and the gathered buffer out
    into the unsharded parameters (a block twice a micro-batch, the root once, as
    `fsdp_communication` counts them); after the last backward each unit's unsharded gradients
    are copied into the reduce-scatter's input and the reduced shard into the sharded gradient.
    A copy reads and writes its bytes.
    """
    gathered, gathers, reduced = _fsdp_units(st, micro_batches, fsdp_bf16)
    return 2 * (1 + 1 / n) * (sum(gathers[u] * b for u, b in gathered.items()) + sum(reduced.values()))


def fsdp_hook_seconds(st: StateCount, speed: Speed) -> float:
    """Host seconds of FSDP2's hooks in a micro-batch: per unit and parameter, timed on this host
    (`regimen.devices.fsdp_overhead`; 0 where unmeasured)."""
    if speed.fsdp is None:
        return 0.0
    units = len({p.unit for p in st.params} | {-1})  # the root is a unit even when it holds no parameter
    return speed.fsdp.micro_batch_seconds(units, len(st.params))


# ---- batch sizes -------------------------------------------------------------------------


def largest_batch(cfg: BatchConfig, dataset_size: int) -> int:
    """The largest global batch the `[batch]` schedule reaches (what the memory must hold).

    >>> largest_batch(BatchConfig(schedule="random", min=8, max=64), 1000)
    64
    """
    if cfg.schedule == "full":
        return dataset_size
    if cfg.schedule == "random":
        return max(cfg.choices) if cfg.choices else int(cfg.max or cfg.size)
    if cfg.schedule == "ramp":
        return max([cfg.size, cfg.start or 0, *(int(st["size"]) for st in cfg.stages)])
    if cfg.schedule == "adaptive":
        return cfg.max if cfg.max is not None else max(min(64 * cfg.size, dataset_size), cfg.min or cfg.size)
    return cfg.size


def micro_choices(cfg: BatchConfig, share: int) -> list[int]:
    """Micro-batch sizes worth considering for a rank share of `share`: divisors for a fixed batch
    (the global batch stays as given), powers of two and the share itself otherwise.

    >>> micro_choices(BatchConfig(size=12), 12)
    [1, 2, 3, 4, 6, 12]
    """
    if cfg.schedule == "fixed":
        return [d for d in range(1, share + 1) if share % d == 0]
    return sorted({2**i for i in range(share.bit_length()) if 2**i <= share} | {share})


def traced_sizes(share: int) -> list[int]:
    """The two micro-batch sizes traced for a rank share of `share` (one when the share is 1)."""
    return sorted({max(1, share // 2), share})


@dataclass
class Choice:
    """The largest micro-batch that fits, with its footprint, or None when even 1 does not."""

    micro: int | None
    footprint: Footprint


def largest_fitting(
    trace: PolicyTrace, layout: Layout, cfg: BatchConfig, share: int, memory: float, runtime: Runtime, host_is_device: bool, headroom: float
) -> Choice:
    """The largest micro-batch of `micro_choices` whose footprint fits in `memory` bytes."""
    best: Choice | None = None
    # Every size is tried: the whole share in one micro-batch accumulates no gradients, so it
    # can need less than half of it in two.
    for m in micro_choices(cfg, share):
        fp = footprint(trace, replace(layout, micro=m), share, runtime, host_is_device)
        if fits(fp, memory, headroom):
            best = Choice(m, fp)
    if best is None:
        return Choice(None, footprint(trace, replace(layout, micro=1), share, runtime, host_is_device))
    return best
