"""What a piece of training code allocates and computes, op by op: live tensor bytes and op costs.

`Recorder` is a `TorchDispatchMode`: every aten op that runs while it is active passes through
it. It keeps, for every tensor storage alive, its size and what it is (parameters, gradients,
optimizer state, or activations, the default for anything an op creates), follows each storage
until it is freed (a weak reference to the storage), and remembers the peak of the total with its
composition. Under `FakeTensorMode` nothing is allocated: the same code runs on fake tensors
that have shapes, dtypes and a device but no data, so a model of any size is measured on any
machine; on real tensors it measures a real run the same way.

It also tallies what each op costs: the FLOPs of matmuls and attention (torch's own formulas in
`torch.utils.flop_counter`, plus the CPU flash-attention kernel that table lacks), kept by op and
operand layout so that `regimen.devices` can time each distinct one; the bytes every other op
reads and writes; and how many ops ran (each costs a fixed dispatch overhead).

A data-dependent scalar read on a fake tensor (`.item()`, as Adafactor and LAMB read norms)
has no value to return: the recorder answers the fake tensor's constant where torch kept one,
else 1 for an integer or a flag and 0.5 for a real number (a value no formula divides by zero
with, such as NAdam's `1 - mu_product`), since shapes, not values, decide memory and FLOPs.

Example:
    >>> from torch._subclasses.fake_tensor import FakeTensorMode
    >>> with FakeTensorMode(), Recorder() as r:
    ...     x = torch.ones(1024, 1024)      # 4 MiB, and nothing allocated
    ...     y = (x @ x).sum()
    >>> r.peak_total >= 2 * 4 * 2**20, r.tally.flops
    (True, 2147483648.0)
"""

from __future__ import annotations

import copy
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("params", "grads", "optimizer", "activations")

aten = torch.ops.aten
# torch's FLOP table lacks the CPU flash-attention kernels; they compute what the GPU ones do.
_FLOPS = dict(flop_registry)
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _FLOPS[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[aten._scaled_dot_product_flash_attention]
    _FLOPS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_registry[aten._scaled_dot_product_flash_attention_backward]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor operand as an op saw it: shape, stride and dtype (enough to time the op again).

    `hot`: the step touched it so recently that it is still in cache when the op runs (see
    `HOT_BYTES`): the output of the op just before, which a forward op reads.
    """

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    hot: bool = False


@dataclass(frozen=True)
class OpKey:
    """A compute-bound op as it ran: the op and its arguments, tensors replaced by `TensorSpec`s."""

    op: Any
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]


def _spec(x: Any, hot: Callable[[torch.Tensor], bool] = lambda t: False) -> Any:
    if isinstance(x, torch.Tensor):
        return TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, hot(x))
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v, hot) for v in x)
    return x


# An operand the step touched less than this many bytes of traffic ago is still in cache when an
# op reads it (`TensorSpec.hot`); older ones are not. Measured here: a matmul writing 4 MiB took
# turns over 16 MiB of outputs at about the speed of one output rewritten, over 64 MiB or more as
# slowly as over 640 MiB (Intel Xeon, Sapphire Rapids, 2 cores).
HOT_BYTES = 16 * 2**20


@dataclass
class Tally:
    """What a stretch of code cost: compute ops by kind, bytes moved by the others, op count."""

    compute: Counter[OpKey] = field(default_factory=Counter)
    flops_of: dict[OpKey, float] = field(default_factory=dict)
    memory_bytes: float = 0.0  # bytes of the other ops below TIMED_BYTES
    # The other ops that move at least TIMED_BYTES, by kind, with their bytes: many are not bound
    # by memory at all (gelu's erf, layer norm's reductions), so a measured machine times them too.
    large: Counter[OpKey] = field(default_factory=Counter)
    bytes_of: dict[OpKey, float] = field(default_factory=dict)
    ops: int = 0
    module_calls: int = 0

    @property
    def flops(self) -> float:
        return sum(self.flops_of[k] * n for k, n in self.compute.items())


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if type(t) not in (torch.Tensor, nn.Parameter) and not is_fake(t):
        return None  # a subclass (DTensor) is seen through its local tensors
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None  # sparse and other storage-less layouts


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class Recorder(TorchDispatchMode):
    """Live tensor bytes by category with their peak, and the cost of every op (see the module)."""

    def __init__(self) -> None:
        super().__init__()
        self._kind: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [category, nbytes]
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.peak = dict(self.live)
        self.new_category = "activations"
        self.tally = Tally()
        self._clock = 0  # bytes the recorded ops have read and written so far
        self._touched: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> the clock when last read or written

    @property
    def total(self) -> int:
        return sum(self.live.values())

    @property
    def peak_total(self) -> int:
        return sum(self.peak.values())

    def hold(self, tensors: Iterable[torch.Tensor | None], category: str) -> None:
        """Count tensors that exist already (or move them) under `category`."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                if hasattr(t, "to_local"):
                    t = t.to_local()  # a DTensor: this rank holds its local shard
                self._track(t, category)

    def __enter__(self) -> Recorder:
        # Every nn.Module call costs host time too (hooks machinery), whatever its ops.
        self._module_hook = nn.modules.module.register_module_forward_pre_hook(self._module_called)
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        self._module_hook.remove()
        super().__exit__(*exc)

    def _module_called(self, module: nn.Module, args: Any) -> None:
        self.tally.module_calls += 1

    def reset(self) -> None:
        """Start a new peak from what is alive now, and a new tally."""
        self.peak = dict(self.live)
        self.tally = Tally()

    def _track(self, t: torch.Tensor, category: str | None = None) -> None:
        st = _storage(t)
        if st is None:
            return
        entry = self._kind.get(st)
        if entry is None:
            n = st.nbytes()
            cat = category or self.new_category
            self._kind[st] = entry = [cat, n]
            self.live[cat] += n
            weakref.finalize(st, self._free, entry)
        elif category is not None and entry[0] != category:
            self.live[entry[0]] -= entry[1]
            self.live[category] += entry[1]
            entry[0] = category
        elif st.nbytes() != entry[1]:  # resized in place (FSDP frees and refills its buffers)
            self.live[entry[0]] += st.nbytes() - entry[1]
            entry[1] = st.nbytes()

    def _free(self, entry: list[Any]) -> None:
        self.live[entry[0]] -= entry[1]

    def _note_peak(self) -> None:
        if self.total > sum(self.peak.values()):
            self.peak = dict(self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if any(getattr(t, "__name__", "") == "DTensor" for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back through here
        if func is aten._local_scalar_dense.default and is_fake(args[0]):
            constant = getattr(args[0], "constant", None)
            return constant.item() if constant is not None else _placeholder(args[0].dtype)
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outputs:
            self._track(t)
        self._note_peak()
        self._count(func, args, kwargs, out, outputs)
        return out

    def _count(self, func: Any, args: Any, kwargs: Any, out: Any, outputs: list[torch.Tensor]) -> None:
        if func.namespace == "prim":
            return  # metadata queries (prim.device), which fake tensors answer through here and real ones do not
        self.tally.ops += 1
        packet = func.overloadpacket
        if packet not in _FLOPS and _is_view(func):
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(map(_nbytes, inputs)) + sum(map(_nbytes, outputs))
        if packet in _FLOPS:
            key = _op_key(func, args, kwargs, self._hot)
            if key not in self.tally.flops_of:
                self.tally.flops_of[key] = float(_FLOPS[packet](*args, **kwargs, out_val=out))
            self.tally.compute[key] += 1
        else:
            large = _large_key(func, args, kwargs, nbytes, self._hot)
            if large is None:
                self.tally.memory_bytes += nbytes
            else:
                self.tally.bytes_of[large] = float(nbytes)
                self.tally.large[large] += 1
        self._clock += nbytes
        for t in (*inputs, *outputs):
            st = _storage(t)
            if st is not None:
                self._touched[st] = self._clock

    def _hot(self, t: torch.Tensor) -> bool:
        st = _storage(t)
        last = self._touched.get(st) if st is not None else None
        return last is not None and self._clock - last < HOT_BYTES


# An op moving at least this many bytes is kept by kind (`Tally.large`) to be timed on its own;
# below it, dispatch dominates and bytes at the memory bandwidth are close enough.
TIMED_BYTES = 2**20


def _large_key(func: Any, args: Any, kwargs: dict[str, Any], nbytes: int, hot: Callable[[torch.Tensor], bool]) -> OpKey | None:
    """The op's key when it is large enough to time and can be rerun alone (an aten op, hashable arguments)."""
    if nbytes < TIMED_BYTES or func.namespace != "aten":  # collectives and custom ops are not rerun
        return None
    key = _op_key(func, args, kwargs, hot)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _op_key(func: Any, args: Any, kwargs: dict[str, Any], hot: Callable[[torch.Tensor], bool]) -> OpKey:
    return OpKey(func, _spec(args, hot), tuple((k, _spec(v, hot)) for k, v in sorted(kwargs.items())))


def _is_view(func: Any) -> bool:
    schema = func._schema
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns) or func in _METADATA_OPS


_METADATA_OPS = {aten.detach.default, aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default}


def _placeholder(dtype: torch.dtype) -> float | int | bool:
    if dtype == torch.bool:
        return True
    return 0.5 if dtype.is_floating_point or dtype.is_complex else 1


def fake_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A copy of `model` whose parameters and buffers are fake tensors (no memory, same shapes and ties).

    >>> m = fake_copy(nn.Linear(64, 64), fake_mode())
    >>> is_fake(m.weight), m.weight.shape
    (True, torch.Size([64, 64]))
    """
    with mode:
        return copy.deepcopy(model)


def fake_mode() -> FakeTensorMode:
    """A fake-tensor mode that accepts real inputs (converted as they come), as the planner needs.

    >>> with fake_mode():
    ...     is_fake(torch.zeros(3))
    True
    """
    return FakeTensorMode(allow_non_fake_inputs=True)
