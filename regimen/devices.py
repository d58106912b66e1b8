"""The devices a plan is for: known accelerators, the memory available here, and this machine's speed.

Known accelerators (`KNOWN`) are a small table of datasheet figures: memory as torch reports it,
dense bf16 and fp32 peak FLOP/s (fp32 without TF32, torch's default), memory bandwidth and the
link between devices (NVLink / Infinity Fabric / PCIe, one direction). Add or correct one in a
TOML file, `~/.config/regimen/devices.toml` or the file `$REGIMEN_DEVICES` names:

    [devices.my-gpu]
    memory_gib = 48
    bf16_tflops = 180
    fp32_tflops = 45
    memory_bandwidth_gbs = 960
    interconnect_gbs = 32

Memory available (what `batch.micro = "auto"` plans for, and `regimen plan`'s default):
- CPU: MemAvailable from /proc/meminfo (what the kernel can hand out without swapping), or the
  free part of the cgroup's limit (`memory.max - memory.current`, cgroup v2, or v1's
  `limit_in_bytes - usage_in_bytes`) when that is smaller: a container's limit is what counts;
- CUDA: the free memory `torch.cuda.mem_get_info` reports.
`parallel.memory_gib` (train) and `--memory` (plan) override it.

This machine's speed is measured, not looked up: each distinct matmul and attention op of the
traced step is timed at its own shapes and layout (`time_ops`), elementwise work at the memory
bandwidth of a large add, and every op pays the dispatch overhead of a tiny one.

Example:
    >>> lookup("h100-sxm").memory_gib
    79.1
    >>> parse_meminfo("MemTotal: 100 kB\\nMemAvailable: 2048 kB\\n")
    2097152
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import math
import os
import statistics
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from regimen.errors import UserError

GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    """One kind of device: memory, peak FLOP/s, bandwidths (datasheet figures, or this machine's)."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float
    memory_bandwidth_gbs: float
    interconnect_gbs: float
    host_link_gbs: float = 32.0  # host <-> device (PCIe 4.0 x16 one way), what CPU offload pays


# Datasheet figures (dense, no sparsity). Memory as torch.cuda.mem_get_info reports the total.
KNOWN: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("a100-40gb", 39.4, 312, 19.5, 1555, 300),
        Accelerator("a100-80gb", 79.2, 312, 19.5, 2039, 300),
        Accelerator("h100-sxm", 79.1, 989, 67, 3350, 450, 64),
        Accelerator("h100-pcie", 79.1, 756, 51, 2000, 64, 64),
        Accelerator("h200", 139.8, 989, 67, 4800, 450, 64),
        Accelerator("l4", 22.0, 121, 30, 300, 32),
        Accelerator("l40s", 44.4, 362, 91.6, 864, 32),
        Accelerator("mi300x", 191.5, 1307, 163, 5300, 448, 64),
    )
}

# Of a datasheet's peak, what eager PyTorch reaches on an accelerator that is not here to be
# measured (a prediction; `--calibrate` on the device replaces it with a measurement).
MATMUL_EFFICIENCY = 0.6
BANDWIDTH_EFFICIENCY = 0.8
KERNEL_LAUNCH_S = 5e-6


def user_devices_path() -> Path:
    """Where a user's own accelerators are read from: `$REGIMEN_DEVICES`, else ~/.config/regimen/devices.toml."""
    return Path(os.environ.get("REGIMEN_DEVICES") or Path.home() / ".config" / "regimen" / "devices.toml")


def known_devices() -> dict[str, Accelerator]:
    """The built-in table updated with the user's file (a name there replaces the built-in one)."""
    table = dict(KNOWN)
    path = user_devices_path()
    if not path.is_file():
        return table
    try:
        tree = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"device table {str(path)!r} is not valid TOML: {e}") from None
    keys = [f.name for f in fields(Accelerator) if f.name != "name"]
    for name, entry in tree.get("devices", {}).items():
        if not isinstance(entry, dict) or not set(entry) <= set(keys) or not all(_is_positive(v) for v in entry.values()):
            raise UserError(f"device table {str(path)!r}: [devices.{name}] takes positive numbers for {', '.join(keys)}")
        base = table.get(name.lower())
        values = {k: getattr(base, k) for k in keys} if base else {}
        values.update(entry)
        missing = [k for k in keys if k not in values and k != "host_link_gbs"]
        if missing:
            raise UserError(f"device table {str(path)!r}: [devices.{name}] needs {', '.join(missing)}")
        table[name.lower()] = Accelerator(name.lower(), **{k: float(v) for k, v in values.items()})
    return table


def _is_positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def lookup(name: str) -> Accelerator:
    """A named accelerator, or a one-line `UserError` listing the known names."""
    table = known_devices()
    if name.lower() in table:
        return table[name.lower()]
    close = difflib.get_close_matches(name.lower(), list(table), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"--device {name!r}: unknown device{hint}; known: cpu, cuda, {', '.join(table)} (add one in {user_devices_path()})")


def parse_memory_gib(text: str, where: str = "--memory") -> float:
    """A memory size in GiB from the command line: a positive finite number, else a `UserError`.

    >>> parse_memory_gib("24")
    24.0
    """
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise UserError(f"{where} = {text!r}: must be a positive number of GiB, e.g. {where} 24")
    return value


# ---- memory available here -----------------------------------------------------------------


def parse_meminfo(text: str) -> int | None:
    """MemAvailable from the text of /proc/meminfo, in bytes (None when absent)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None  # "max" (no limit) is not a number


def cgroup_free(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this cgroup may still allocate under its limit (v2, else v1), or None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 says "no limit" with a huge number
            return max(limit - usage, 0)
    return None


def host_memory_available() -> int:
    """Bytes of host memory available now: MemAvailable, or the cgroup's free part if smaller."""
    try:
        avail = parse_meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        avail = None
    if avail is None:  # not Linux: the physical memory, the best figure at hand
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_free()
    return min(avail, limit) if limit is not None else avail


def memory_available(device: Any) -> int:
    """Bytes free for training on `device` (a torch.device) now: see the module docstring."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return host_memory_available()


# ---- this machine's speed ------------------------------------------------------------------


@dataclass(frozen=True)
class Collective:
    """Seconds of one collective: a fixed latency plus its tensor's bytes at a bandwidth (a line fitted to timed sizes).

    Example:
        >>> Collective(latency_s=1e-4, bytes_per_s=1e9).seconds(2e6)
        0.0021
    """

    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class FSDPCost:
    """Host seconds FSDP2's own work adds to a step beyond its collectives and copies (see `fsdp_overhead`).

    Example:
        >>> FSDPCost(unit_s=5e-4, param_s=2e-5, dtensor_op_s=1e-5).micro_batch_seconds(units=5, params=50)
        0.0035
    """

    unit_s: float  # per unit and micro-batch: its pre-/post-forward and -backward hooks
    param_s: float  # per parameter and micro-batch: its share of those hooks (views, DTensor wrapping)
    dtensor_op_s: float  # per op of the update: DTensor's dispatch around each op on sharded tensors

    def micro_batch_seconds(self, units: int, params: int) -> float:
        return units * self.unit_s + params * self.param_s


@dataclass
class Speed:
    """Seconds per op: measured here (`measure`) or predicted from a datasheet (`from_datasheet`)."""

    overhead_s: float  # host time to dispatch one op
    bandwidth: float  # bytes/s of memory-bound ops
    flops_per_s: float  # matmul throughput where an op's own timing is missing
    link: float  # bytes/s between devices
    host_link: float  # bytes/s host <-> device (CPU offload)
    measured: bool
    op_seconds: dict[Any, float] = field(default_factory=dict)  # OpKey -> seconds, timed here
    module_call_s: float = 0.0  # host time of calling an nn.Module (its hooks machinery)
    # all_reduce / all_gather / reduce_scatter among the ranks, timed here (`measure_collectives`);
    # empty: a collective moves its bytes at `link` with no latency
    collectives: dict[str, Collective] = field(default_factory=dict)
    # FSDP2's own host work beside its collectives, timed here (`fsdp_overhead`); None: unmeasured
    fsdp: FSDPCost | None = None

    def compute_seconds(self, key: Any, flops: float) -> float:
        """The time of one compute op: its own timing, else its FLOPs at the fallback throughput."""
        seconds = self.op_seconds.get(key)
        return seconds if seconds is not None else flops / self.flops_per_s


def from_datasheet(acc: Accelerator, bf16: bool, overhead_s: float, module_call_s: float) -> Speed:
    """Predicted speed of an accelerator that is not here: its peak x the efficiencies above."""
    peak = (acc.bf16_tflops if bf16 else acc.fp32_tflops) * 1e12
    return Speed(
        overhead_s=overhead_s,
        bandwidth=acc.memory_bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY,
        flops_per_s=peak * MATMUL_EFFICIENCY,
        link=acc.interconnect_gbs * 1e9,
        host_link=acc.host_link_gbs * 1e9,
        measured=False,
        module_call_s=module_call_s,
    )


def _median_seconds(fn: Callable[[], Any], sync: Callable[[], None], repeats: int, budget_s: float = 0.5) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dispatch_overhead() -> tuple[float, float]:
    """(seconds per traced op of a training step, seconds per nn.Module call) on this host.

    The fixed cost of eager PyTorch, measured on a training step whose arithmetic is negligible
    (16 blocks of a 4-wide linear layer, layer norm and GELU, batch 2: forward, backward and an
    SGD step): its time, less its module calls, over the ops `regimen.trace.Recorder` counts in it.
    That is what each op of a real step costs beyond its arithmetic: dispatch, the autograd
    graph's nodes and their engine, allocations. A lone op in a loop (the previous measure) cost
    about a quarter of it.
    """
    import torch

    from regimen.trace import Recorder

    a = torch.ones(1, requires_grad=True)
    n = 200
    module = torch.nn.Identity()

    def calls() -> None:
        for _ in range(n):
            module(a)

    per_call = _median_seconds(calls, lambda: None, 7) / n
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.GELU()) for _ in range(16)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
    x = torch.randn(2, 4)

    def step() -> None:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with Recorder() as recorder:
        step()
    seconds = _median_seconds(step, lambda: None, 9)
    tally = recorder.tally
    per_op = max(seconds - tally.module_calls * per_call, 0.0) / max(tally.ops, 1)
    return per_op, per_call


def fsdp_overhead() -> FSDPCost | None:
    """FSDP2's own host work on this host, timed on tiny models in a one-rank gloo group (None when it cannot be).

    Beside its collectives (timed apart, `measure_collectives`) and the copies into and out of
    their buffers (priced at the memory bandwidth, `regimen.estimate.fsdp_copy_bytes`), FSDP2
    runs Python hooks around every unit's forward and backward and wraps each gradient as a
    DTensor, and every op of the update dispatches through DTensor. Two models of 8 units of
    4-wide linear layers (2 and 8 parameters a unit: their arithmetic and bytes negligible) are
    timed forward and backward with and without `fully_shard` on a group of one rank (its
    collectives cost next to nothing): the two differences give the cost per unit and per
    parameter; the second model's SGD update with and without sharding, over the ops
    `regimen.trace.Recorder` counts in it, the cost per update op. Measured in the plan's own
    process; skipped (None) when it already belongs to a process group.
    """
    import copy

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        return None
    from torch.distributed.fsdp import fully_shard

    from regimen.trace import Recorder

    try:
        dist.init_process_group("gloo", store=dist.PrefixStore("regimen-plan-fsdp", dist.HashStore()), rank=0, world_size=1)
    except (RuntimeError, ValueError):  # no gloo group here (a sandbox without sockets): the plan says unmeasured
        return None
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 4)

        def forward_backward(model: torch.nn.Module) -> None:
            model(x).square().mean().backward()

        blocks = 8
        extra: dict[int, float] = {}  # parameters a block -> seconds FSDP2 adds to the model's forward and backward
        plain_update = sharded_update = 0.0
        ops = 1
        for layers in (1, 4):
            plain = torch.nn.Sequential(*(torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(layers))) for _ in range(blocks)))
            sharded = copy.deepcopy(plain)
            for block in sharded:
                fully_shard(block)
            fully_shard(sharded)
            seconds = [_median_seconds(functools.partial(forward_backward, m), lambda: None, 15) for m in (plain, sharded)]
            extra[2 * layers] = seconds[1] - seconds[0]
            if layers == 4:
                optimizers = [torch.optim.SGD(m.parameters(), lr=1e-6, momentum=0.9, foreach=False) for m in (plain, sharded)]
                for o in optimizers:
                    o.step()  # momentum buffers made
                with Recorder() as recorder:
                    optimizers[0].step()
                ops = max(recorder.tally.ops, 1)
                plain_update, sharded_update = (_median_seconds(o.step, lambda: None, 15) for o in optimizers)
        # extra[p] = (blocks + 1) * unit_s + blocks * p * param_s: the root is a unit too, holding no parameter.
        (p1, e1), (p2, e2) = sorted(extra.items())
        param_s = max((e2 - e1) / (blocks * (p2 - p1)), 0.0)
        unit_s = max((e1 - blocks * p1 * param_s) / (blocks + 1), 0.0)
        return FSDPCost(unit_s=unit_s, param_s=param_s, dtensor_op_s=max(sharded_update - plain_update, 0.0) / ops)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` (at least 1) inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(
    device: Any,
    threads: int,
    compute_ops: list[tuple[Any, float]],
    link: float,
    max_bytes: int = 256 * 2**20,
    other_ops: Sequence[tuple[Any, float]] = (),
) -> Speed:
    """This machine's speed on `device` with `threads` intra-op threads, timing each op given.

    `compute_ops` are (`regimen.trace.OpKey`, FLOPs); an op whose tensors exceed `max_bytes` is not run
    here (it would cost real memory): the fastest throughput measured stands in for it. `other_ops`
    are the large non-matmul ops (`regimen.trace.Tally.large`) with the bytes they read and write,
    timed the same way where they can be rerun alone on random data and move at most twice
    `max_bytes` (an op such as `zeros` has no operands but a large output); the others are priced
    at the measured bandwidth.
    """
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cpu":
        from regimen import host_memory

        # As `Trainer.fit` runs a CPU step: freed memory kept for reuse, so the outputs an op is
        # timed with land in memory the allocator hands back, not in pages faulted in anew.
        host_memory.keep_freed_memory()
    with torch_threads(threads):
        overhead, module_call = dispatch_overhead()
        bandwidth = _bandwidth(device, sync)
        op_seconds = {key: _time_op(key, device, sync) for key, _ in compute_ops if _operand_bytes(key) <= max_bytes}
        flops_of = dict(compute_ops)
        best = max((flops_of[k] / max(t, 1e-9) for k, t in op_seconds.items()), default=0.0)
        for key, nbytes in other_ops:
            if nbytes <= 2 * max_bytes:
                with contextlib.suppress(Exception):  # an op random data cannot drive keeps the bandwidth's price
                    op_seconds[key] = _time_op(key, device, sync)
        if best == 0.0:  # nothing small enough was traced: a square matmul stands for them all
            x = torch.randn(1024, 1024, device=device)
            best = 2 * 1024**3 / _median_seconds(lambda: x @ x, sync, 5)
    return Speed(overhead, bandwidth, best, link, link, True, op_seconds, module_call)


def _bandwidth(device: Any, sync: Callable[[], None]) -> float:
    """Bytes/s of a large elementwise op (two reads, one write), what memory-bound ops move at."""
    import torch

    big = torch.ones(2**23, device=device)
    out = torch.empty_like(big)
    return 3 * big.numel() * 4 / _median_seconds(lambda: torch.add(big, big, out=out), sync, 7)


def _time_op(key: Any, device: Any, sync: Callable[[], None]) -> float:
    """Median seconds of one traced compute op, rerun on real tensors of its shapes here.

    On a CPU each call reads operands and writes its output where no recent call has, but for
    the operands the step had just touched (`TensorSpec.hot`, such as a forward op's input, the
    output of the op before): in a step the others were written long before and the output
    lands in memory the allocator hands back from an earlier op, beyond the caches, while an op
    rerun on the same tensors finds all of it in cache (the 1M GPT's matmuls: 0.68 ms alone,
    1.3 ms in the step; 0.94 ms with only the output, 0.93 ms with only the operands, out of
    cache). So the calls take turns over copies of the cold operands and keep each output for a
    turn, `COLD_BYTES` in all.
    """
    import collections

    args, kwargs = _materialize(key, device)
    first = key.op(*args, **kwargs)
    cold = sum(_spec_bytes(s) for s in _specs((key.args, tuple(v for _, v in key.kwargs))) if not s.hot)
    copies = _cold_copies(cold + _tree_bytes(first), device)
    del first
    try:
        turns = [(args, kwargs)] + [_copy_cold((args, kwargs), key) for _ in range(copies - 1)]
    except RuntimeError:  # operands that overlap themselves (an expanded stride) cannot be copied as laid out
        turns, copies = [(args, kwargs)], 1
    held: collections.deque[Any] = collections.deque(maxlen=copies)
    turn = itertools.cycle(turns)

    def run() -> None:
        a, k = next(turn)
        held.append(key.op(*a, **k))

    for _ in range(copies - 1):  # the turns and the held outputs in place before timing
        run()
    seconds = _median_seconds(run, sync, 5)
    held.clear()
    return seconds


# What a CPU op is timed across so that none of it is still cached: more than this machine's
# effective last-level cache (a 4 MiB output rotated through 64 MiB was as slow as through 640 MiB).
COLD_BYTES = 256 * 2**20


def _cold_copies(call_bytes: int, device: Any) -> int:
    if device.type != "cpu" or call_bytes <= 0:
        return 1
    return max(1, min(64, math.ceil(COLD_BYTES / call_bytes)))


def _tree_bytes(tree: Any) -> int:
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, (tuple, list)):
        return sum(_tree_bytes(x) for x in tree)
    return 0


def _copy_cold(operands: tuple[tuple[Any, ...], dict[str, Any]], key: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Another copy of an op's operands, but for the hot ones (`TensorSpec.hot`), which every call shares."""
    import torch

    from regimen.trace import TensorSpec

    def copy(value: Any, spec: Any) -> Any:
        if isinstance(spec, TensorSpec) and isinstance(value, torch.Tensor):
            if spec.hot:
                return value
            fresh = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
            return fresh.copy_(value)
        if isinstance(spec, tuple) and isinstance(value, tuple):
            return tuple(copy(v, s) for v, s in zip(value, spec))
        return value

    args, kwargs = operands
    return copy(args, key.args), {k: copy(kwargs[k], spec) for k, spec in key.kwargs}


def _operand_bytes(key: Any) -> int:
    return sum(_spec_bytes(s) for s in _specs(key.args))


def _specs(tree: Any) -> list[Any]:
    from regimen.trace import TensorSpec

    if isinstance(tree, TensorSpec):
        return [tree]
    if isinstance(tree, tuple):
        return [s for item in tree for s in _specs(item)]
    return []


def _spec_bytes(spec: Any) -> int:
    import torch

    extent = 1 + sum((n - 1) * s for n, s in zip(spec.shape, spec.stride))
    return extent * torch.empty((), dtype=spec.dtype).element_size()


def _materialize(key: Any, device: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Real tensors of the traced shapes, strides and dtypes (random values) for timing an op.

    Floating values are drawn from [0.5, 1.5): finite, positive and away from zero, as the
    operands of a step's sqrt and log are (Adam's second moment, a softmax's sums). On normal
    values half of them would be negative, and sqrt or log of a negative number takes the CPU's
    NaN path: 30x slower here (5.7 ms against 0.17 ms for sqrt over 590k floats), which priced
    schedule-free AdamW's step 11-15% over the measured one.
    """
    import torch

    from regimen.trace import TensorSpec

    def build(item: Any) -> Any:
        if isinstance(item, TensorSpec):
            t = torch.empty_strided(item.shape, item.stride, dtype=item.dtype, device=device)
            return t.uniform_(0.5, 1.5) if t.is_floating_point() else t.zero_()
        if isinstance(item, tuple):
            return tuple(build(x) for x in item)
        return item

    args = tuple(build(a) for a in key.args)
    kwargs = {k: build(v) for k, v in key.kwargs}
    return args, kwargs


def loopback_bandwidth(nbytes: int = 64 * 2**20) -> float:
    """Bytes/s through a local TCP connection: the link between CPU processes (gloo's transport)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    payload = bytes(nbytes)

    def send() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(payload)

    sender = threading.Thread(target=send)
    sender.start()
    received = 0
    with socket.create_connection(server.getsockname()) as client:
        t0 = time.perf_counter()
        while received < nbytes:
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        seconds = time.perf_counter() - t0
    sender.join()
    server.close()
    return received / max(seconds, 1e-9)


# The tensor sizes each collective is timed at, from a layer's share to a block's; a line is
# fitted through all of them (two sizes alone made the latency swing by 10x between runs).
COLLECTIVE_BYTES = (64 * 2**10, 512 * 2**10, 2 * 2**20, 8 * 2**20)


def measure_collectives(n: int, threads: int = 1, sizes: Sequence[int] = COLLECTIVE_BYTES, repeats: int = 25) -> dict[str, Collective]:
    """gloo's all_reduce, all_gather and reduce_scatter among `n` ranks on this host, as `Collective`s.

    The ranks are `n` threads of this process, each with its own gloo process group over an
    in-memory store: the same loopback transport, the same reduction arithmetic and the same
    cost per call as `n` processes, without starting any (gloo's work runs outside the GIL).
    The size of a collective is its whole tensor: the all-reduced one, the gathered output,
    the reduce-scattered input. The slowest rank's mean is what a step waits for.
    """
    import datetime

    import torch.distributed as dist

    assert n >= 2 and len(sizes) >= 2
    store = dist.PrefixStore("regimen-plan-collectives", dist.HashStore())
    groups: list[Any] = [None] * n

    def connect(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(store, rank, n, datetime.timedelta(seconds=60))

    with torch_threads(threads), _computing(n):
        _on_each_rank(n, connect)
        result: dict[str, Collective] = {}
        for kind in ("all_reduce", "all_gather", "reduce_scatter"):
            seconds = [_time_collective(groups, kind, nbytes, repeats) for nbytes in sizes]
            result[kind] = _fit_line(sizes, seconds)
        return result


@contextlib.contextmanager
def _computing(n: int) -> Iterator[None]:
    """`n` threads multiplying matrices inside the block: the ranks' compute, which shares this host's cores with gloo.

    In a step gloo's threads move the bytes while the ranks compute (FSDP2 gathers the next block
    during this one, DDP all-reduces a bucket while the backward goes on); timed on idle cores,
    all-gather moved 1.98 GB/s here, beside two computing threads 0.96 GB/s.
    """
    import threading

    import torch

    done = threading.Event()

    def compute() -> None:
        a = torch.ones(512, 512)
        while not done.is_set():
            torch.mm(a, a)

    workers = [threading.Thread(target=compute, daemon=True) for _ in range(n)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        done.set()
        for w in workers:
            w.join()


def _fit_line(sizes: Sequence[int], seconds: Sequence[float]) -> Collective:
    """Least-squares latency + bytes / bandwidth through the timed points (latency at least 0).

    >>> c = _fit_line([1e6, 2e6, 4e6], [0.002, 0.003, 0.005])
    >>> round(c.latency_s, 6), round(c.bytes_per_s)
    (0.001, 1000000000)
    """
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, seconds)) / sum((x - mean_x) ** 2 for x in sizes)
    slope = max(slope, 1e-15)  # seconds per byte: never free, never negative
    return Collective(latency_s=max(mean_y - slope * mean_x, 0.0), bytes_per_s=1.0 / slope)


def _time_collective(groups: list[Any], kind: str, nbytes: int, repeats: int) -> float:
    """The slowest rank's seconds of one `kind` collective of `nbytes` (see `measure_collectives`).

    A mean, not the median of calls: a step pays the sum of its calls, and beside computing
    threads a call's time is bimodal (gloo's threads get a core at once, or wait for a time
    slice), so the median flips between the modes from one plan to the next (a fitted latency of
    0 to 0.4 ms here, where 30 calls average 0.6 to 1.4 ms) while the mean is what many calls add
    up to. The calls are taken as `PASSES` runs of consecutive calls and the median of the runs'
    means kept: one stall of the host lands in one run and is dropped, where the plain mean
    spread it over every call (150 ms in 25 calls: 6 ms more on each, 50 ms more on a 1M GPT's
    FSDP2 step of nine gathers).
    """
    import torch

    n = len(groups)
    means = [0.0] * n

    def time_rank(rank: int) -> None:
        numel = nbytes // 4 // n * n  # divisible into n equal shards
        whole, shard = torch.ones(numel), torch.empty(numel // n)
        pg = groups[rank]
        call = {
            "all_reduce": lambda: pg.allreduce([whole]),
            "all_gather": lambda: pg._allgather_base(whole, shard),
            "reduce_scatter": lambda: pg._reduce_scatter_base(shard, whole),
        }[kind]
        times = []
        for _ in range(repeats + 1):  # the first call sets up gloo's buffers
            t0 = time.perf_counter()
            call().wait()
            times.append(time.perf_counter() - t0)
        means[rank] = median_of_means(times[1:])

    _on_each_rank(n, time_rank)
    return max(means)


PASSES = 5


def median_of_means(times: Sequence[float], passes: int = PASSES) -> float:
    """The median of the means of `passes` runs of consecutive `times` (their mean if fewer).

    >>> median_of_means([1, 3, 1, 3, 1, 3, 1, 3, 90, 3], passes=5)
    2.0
    """
    if len(times) < passes:
        return statistics.fmean(times)
    size = len(times) // passes
    return statistics.median(statistics.fmean(times[i * size : (i + 1) * size]) for i in range(passes))


def _on_each_rank(n: int, fn: Callable[[int], None], timeout_s: float = 120.0) -> None:
    """`fn(rank)` on `n` threads at once (the ranks of `measure_collectives`); the first error raised here."""
    import threading

    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            fn(rank)
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    workers = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=timeout_s)
    if errors or any(w.is_alive() for w in workers):
        raise RuntimeError(f"timing gloo's collectives among {n} threads failed: {errors[0] if errors else 'timed out'}")
