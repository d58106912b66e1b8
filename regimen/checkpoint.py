"""Checkpoints over named stateful parts: atomic saves, checksums, resume discovery, the final export.

A `Checkpointer` saves and loads a set of named parts, each an object with `state_dict()` and
`load_state_dict(state)` (torchtitan's design): it knows nothing about the trainer, so a new
stateful part is one `add` and no change here. Each part says how it is stored:

- `"tensors"`: sharded tensors through `torch.distributed.checkpoint` (DCP), which reshards on
  load (an FSDP2 checkpoint of 2 ranks resumes on 1): the model and the optimizer (`ModelState`).
- `"json"`: plain data, the same on every rank, written by rank 0 into `train_state.json`: the
  counters, the batch schedule's and the noise estimator's state.
- `"rank"`: tensors that differ per rank, one `<name>-rank<r>.pt` file each: the RNG state, the
  noise estimator's previous gradient.

Layout of a run directory's `checkpoints/`:

```
step-00000120/             a complete checkpoint (renamed into place only when whole)
    .metadata, *.distcp    the "tensors" parts (DCP)
    train_state.json       the "json" parts
    rng-rank{r}.pt         a "rank" part, per rank
    strategy.toml          the resolved strategy the state was trained with
    MANIFEST.json          every file's size and SHA-256, written at save, verified at load
    COMPLETE               written last, before the rename
.tmp-step-00000130/        a save in progress (or one a crash interrupted): never loaded
```

Guarantees (docs/reliability.md names the test of each):
- A save writes into `.tmp-step-N`, fsyncs, writes `COMPLETE`, then renames to `step-N`; a crash,
  a write error or Ctrl-C mid-save leaves the previous checkpoint whole (Ctrl-C then ends the run
  as an ordinary interrupt, exit 130).
- Every file's checksum is recorded at save and verified before anything is loaded: a flipped
  bit in a shard, the metadata, the RNG file or the counters is found, and the checkpoint is
  refused as corrupt.
- Loading never unpickles code. DCP's `.metadata` is read with an unpickler that admits only the
  dataclasses and enums DCP's metadata is made of; DCP's non-tensor items (optimizer
  hyperparameters) pass torch's weights-only unpickler before DCP reads them; tensor files use
  `weights_only=True`; the rest is JSON, checked key by key.
- A checkpoint of a different model (a parameter missing, extra, or of another shape) or of
  another optimizer is refused before anything is loaded (`CheckpointMismatch`).
- `resume("auto")` skips a checkpoint that is incomplete, fails verification or raises anything
  while loading, with a warning naming it, and falls back to the previous one; it never starts
  over a run whose checkpoints all fail (that would truncate its history): that is an error.
- Every rank makes the same decision: a failure on one rank is all-reduced.

Example:
    >>> latest_checkpoint("/nonexistent") is None
    True
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import hashlib
import importlib
import io
import json
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from regimen.errors import UserError
from regimen.optim import CombinedOptimizer, set_train_mode
from regimen.parallel import Dist
from regimen.progress import Progress
from regimen.rundir import CHECKPOINTS_DIR, os_reason

PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
JSON_FILE = "train_state.json"
STRATEGY_FILE = "strategy.toml"

Kind = Literal["tensors", "json", "rank"]


class CheckpointMismatch(UserError):
    """A whole checkpoint of a different model or optimizer: an error even under `--resume auto`."""


class Stateful(Protocol):
    """What a checkpoint part is: an object that gives and takes its state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------
# Safe loading: DCP metadata, DCP's non-tensor items, tensor files
# --------------------------------------------------------------------------------------------

# Plain values and containers; pickle can only construct these, never run anything.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name in torch's namespace
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "tuple"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "bool"),
    ("builtins", "str"),
    ("builtins", "bytes"),
}
# The modules DCP's metadata classes live in. Only their dataclasses and enums are admitted:
# the same modules also hold functions (`format_utils.torch_save_to_dcp` unpickles any file it
# is given), which a crafted `.metadata` could otherwise call.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


def _admitted(module: str, name: str) -> bool:
    if (module, name) in _SAFE_GLOBALS:
        return True
    if module == "torch":  # dtypes, layouts and memory formats are constants, not callables
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    if module in _METADATA_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        return (
            isinstance(obj, type)
            and obj.__module__ == module
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
            and not hasattr(obj, "__post_init__")  # a dataclass constructor then only assigns fields
        )
    return False


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP's metadata is made of; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if _admitted(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with a restricted unpickler for the metadata file."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError, OSError) as e:
            raise UserError(f"checkpoint {str(self.path)!r}: .metadata is not DCP checkpoint metadata ({e}); it was not loaded") from None
        if not hasattr(metadata, "state_dict_metadata"):
            raise UserError(f"checkpoint {str(self.path)!r}: .metadata holds a {type(metadata).__name__}, not DCP checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor items must pass torch's weights-only unpickler.

    DefaultLoadPlanner.load_bytes calls `torch.load(weights_only=False)` on the optimizer's
    hyperparameters; a crafted `.distcp` could put code there. The bytes are first loaded with
    `weights_only=True`, which admits only plain data; the same bytes then take DCP's own path.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            reason = _unpickle_reason(e)
            raise UserError(f"{read_item.dest_index.fqn} is not plain data, refused to unpickle it ({reason})") from None
        super().load_bytes(read_item, io.BytesIO(data))


def _unpickle_reason(e: BaseException) -> str:
    """The informative line of torch's long weights-only refusal (the global it blocked)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line]
    return (named or lines or [type(e).__name__])[0][:200]


def _load_tensors(path: Path) -> Any:
    """A small `.pt` file of tensors (RNG state, noise pair), never unpickling code."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickle_reason(e)
        where = f"checkpoint {str(path.parent)!r}: {path.name}"
        raise UserError(f"{where} is not a plain tensor file, refused to unpickle it ({reason})") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise UserError(f"checkpoint {str(path.parent)!r}: {path.name} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def _root_causes(e: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside DCP's CheckpointException (or `e` itself)."""
    if isinstance(e, CheckpointException):
        return [exc for exc, _ in e.failures.values()] or [e]
    return [e]


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(e, UserError) else f"{type(e).__name__}: {first[:300]}"


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it runs without a process group; for one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def is_complete(path: Path) -> bool:
    """A checkpoint is complete when its COMPLETE marker and its state files are there."""
    return path.name.startswith(PREFIX) and (path / COMPLETE).is_file() and (path / ".metadata").is_file() and (path / JSON_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return [p for p in sorted(root.glob(f"{PREFIX}*")) if is_complete(p)]


def incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Saves a crash interrupted (`.tmp-step-N`) and `step-N` directories that are not whole."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    partial = [p for p in sorted(root.glob(f"{PREFIX}*")) if not is_complete(p)]
    return sorted(root.glob(f"{TMP_PREFIX}*")) + partial


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def progress_of(path: str | Path) -> Progress:
    """The progress recorded in a checkpoint (without loading it)."""
    state = json.loads((Path(path) / JSON_FILE).read_text())
    return Progress(**_json_parts(state)["train"]["progress"])


# --------------------------------------------------------------------------------------------
# The parts regimen checkpoints
# --------------------------------------------------------------------------------------------


def _optimizers(optimizer: torch.optim.Optimizer) -> Any:
    return optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else optimizer


class ModelState:
    """The model and its optimizer as one "tensors" part: DCP's `get_state_dict` / `set_state_dict`.

    Schedule-free optimizers are saved in eval mode (their averaged weights are the ones worth
    keeping) and switched back after the save. `get_state_dict` builds a fresh optimizer's state
    with one zero-LR step, which a schedule-free optimizer refuses in eval mode, so the template
    for a load is taken in train mode.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    @contextlib.contextmanager
    def during_io(self) -> Iterator[None]:
        """Schedule-free optimizers in eval mode while their tensors are written or read (the
        state dict holds the parameters themselves, so the mode must hold until DCP is done)."""
        set_train_mode(self.optimizer, False)
        try:
            yield
        finally:
            set_train_mode(self.optimizer, True)

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, _optimizers(self.optimizer))
        return {"model": model_sd, "optim": optim_sd}

    def template(self) -> dict[str, Any]:
        """Tensors shaped as this model's and optimizer's state, for DCP to load into (taken in train mode)."""
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            _optimizers(self.optimizer),
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=True),
        )

    def check(self, path: Path, metadata: Any, template: Mapping[str, Any]) -> None:
        """Refuse a checkpoint of another model (parameter names or shapes) or another optimizer."""
        saved = {k.removeprefix("model."): v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
        model_sd = template["model"]
        missing = [k for k in model_sd if k not in saved]
        extra = [k for k in saved if k not in model_sd]
        what = None
        if missing:
            what = f"{len(missing)} parameter(s) of this model are not in it ({', '.join(missing[:3])}); was a [model] key changed?"
        elif extra:
            what = f"it has {len(extra)} parameter(s) this model lacks ({', '.join(extra[:3])}); was a [model] key changed?"
        else:
            for key, value in model_sd.items():
                size = getattr(saved[key], "size", None)
                if size is not None and hasattr(value, "shape") and tuple(size) != tuple(value.shape):
                    what = f"{key} has shape {list(size)} there but {list(value.shape)} here; was a [model] key changed?"
                    break
        if what is None:
            saved_optim = {k for k in metadata.state_dict_metadata if k.startswith("optim.state.")}
            wanted = {f"optim.{k}" for k in _flat_keys(template["optim"].get("state", {}), "state")}
            if saved_optim and wanted and not wanted <= saved_optim:
                lacking = sorted(wanted - saved_optim)
                what = f"its optimizer state is of another optimizer (it lacks {lacking[0]}); was [optimizer] changed?"
        if what is not None:
            raise CheckpointMismatch(f"checkpoint {str(path)!r} is of a different model: {what} It was not loaded")


def _flat_keys(tree: Mapping[str, Any], prefix: str) -> list[str]:
    """DCP's flattened keys of a nested state dict ("state.<param>.exp_avg")."""
    out = []
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        out += _flat_keys(value, name) if isinstance(value, Mapping) else [name]
    return out


class RNGState:
    """torch's RNG state on this rank (CPU, and the CUDA device where there is one): a "rank" part."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state.get("cpu"), torch.Tensor) or state["cpu"].dtype != torch.uint8:
            raise ValueError("the RNG state holds no CPU generator state")
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


@dataclass
class _Part:
    obj: Stateful
    kind: Kind
    # "rank" parts only: whether a checkpoint of another world size may lack this rank's file
    # (the RNG of a rank that did not exist; the run continues with its own).
    optional: bool = False


@dataclass
class _PendingSave:
    """A save whose tensors a background thread is writing (`Checkpointer.background`)."""

    step: int
    tmp: Path
    future: Future[None]


# --------------------------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _during_io(obj: Any) -> Any:
    """The part's own context for reading and writing its tensors (`ModelState.during_io`), if it has one."""
    return obj.during_io() if hasattr(obj, "during_io") else contextlib.nullcontext()


def _interrupted(e: BaseException) -> bool:
    """Whether a (DCP-wrapped) exception is really Ctrl-C or a termination."""
    return any(isinstance(c, KeyboardInterrupt) for c in _root_causes(e))


class Checkpointer:
    """Save and load named stateful parts into a run directory's `checkpoints/`, atomically.

    Every rank builds the same checkpointer with the same parts and calls `save` / `load`
    together (DCP writes and reads each rank's shards; the decisions are all-reduced).

    Example:
        >>> import tempfile
        >>> class Counter:
        ...     def __init__(self): self.n = 0
        ...     def state_dict(self): return {"n": self.n}
        ...     def load_state_dict(self, state): self.n = int(state["n"])
        >>> model = torch.nn.Linear(2, 1); counter = Counter()
        >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=2)
        >>> ckpt.add("model", ModelState(model, torch.optim.SGD(model.parameters(), lr=0.1)), "tensors")
        >>> ckpt.add("train", counter, "json")
        >>> counter.n = 7; path = ckpt.save(step=7)
        >>> counter.n = 0; ckpt.load(path); counter.n
        7
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        *,
        keep: int,
        dist: Dist | None = None,
        device: torch.device | None = None,
        files: Mapping[str, Callable[[], str]] | None = None,
        background: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None  # None: loads a path given, saves nothing
        self.root = checkpoint_dir(run_dir) if run_dir is not None else None
        self.keep = keep
        self.dist = dist or Dist()
        self.device = device or torch.device("cpu")
        self.files = dict(files or {})  # extra text files rank 0 writes into each checkpoint
        self.parts: dict[str, _Part] = {}
        self.background = background  # write the tensors on a background thread (see `save`)
        self._pending: _PendingSave | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._stager: Any = None  # DCP's DefaultStager, kept so its staging buffers are reused
        self._group: Any = None  # a gloo group of its own for the background write's collectives

    def add(self, name: str, obj: Stateful, kind: Kind, optional: bool = False) -> None:
        """Checkpoint `obj` under `name`, stored as `kind` (see the module docstring)."""
        assert name not in self.parts, f"two checkpoint parts named {name!r}"
        assert kind != "tensors" or not any(p.kind == "tensors" for p in self.parts.values()), "one tensors part (one DCP save)"
        self.parts[name] = _Part(obj, kind, optional)

    def _of(self, kind: Kind) -> dict[str, _Part]:
        return {n: p for n, p in self.parts.items() if p.kind == kind}

    def _any_rank_failed(self, failed: bool) -> bool:
        """All-reduce a failure flag, so every rank takes the same branch (and none waits alone)."""
        if not self.dist.enabled:
            return failed
        flag = torch.tensor([1.0 if failed else 0.0], device=self.device)
        return self.dist.all_reduce_sum(flag).item() > 0

    # ---- saving --------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Save every part as checkpoint `step-<step>`, atomically; returns its path.

        A write error on any rank (a full disk, a lost mount) removes the partial save on every
        rank's behalf and raises one `UserError` saying the previous checkpoint is intact;
        Ctrl-C does the same and then raises `KeyboardInterrupt`.

        With `background`, it returns once the small parts are written and the tensors copied
        (DCP's staging): a thread writes the tensors, checksums, renames and prunes, and a
        failure of that write is raised the same way by the next `poll`, `wait`, `save` or `load`.
        """
        assert self.root is not None, "saving needs a run directory"
        self.wait()  # one save at a time: the previous one is published (or its failure raised) first
        d = self.dist
        name = f"{step:08d}"
        tmp, final = self.root / f"{TMP_PREFIX}{name}", self.root / f"{PREFIX}{name}"
        error: BaseException | None = None
        try:
            if d.is_main:
                try:
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    tmp.mkdir(parents=True)
                except OSError as e:
                    error = e
            if self._any_rank_failed(error is not None):
                self._failed(step, tmp, error)
            try:
                if self.background:
                    self._write_plain(tmp)
                    staged = self._stage()
                else:
                    self._write(tmp)
            except (OSError, CheckpointException) as e:  # DCP wraps each rank's error in CheckpointException
                if _interrupted(e):
                    raise KeyboardInterrupt from None
                error = e
            if self._any_rank_failed(error is not None):
                self._failed(step, tmp, error)
            if self.background:
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regimen-checkpoint")
                if d.enabled and self._group is None:
                    # Every rank, here in the step loop: DCP's collectives on the writer thread must not
                    # share a group with the step loop's, which go on meanwhile.
                    self._group = torch.distributed.new_group(backend="gloo")
                future = self._writer.submit(self._write_and_publish, staged, tmp, final, name, step)
                self._pending = _PendingSave(step, tmp, future)
                return final
            if d.is_main:
                try:
                    self._publish(tmp, final, name)
                except OSError as e:
                    error = e
            if self._any_rank_failed(error is not None):  # also the barrier: all ranks see the rename
                self._failed(step, tmp, error)
        except KeyboardInterrupt:
            if d.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint is whole; this one never was
            raise
        if d.is_main:
            self._prune(step)
        return final

    def _write(self, tmp: Path) -> None:
        for part in self._of("tensors").values():
            with _during_io(part.obj), _quiet_single_process():
                dcp.save(part.obj.state_dict(), storage_writer=dcp.FileSystemWriter(str(tmp)))
        self._write_ranked(tmp, self._ranked_states())
        self._write_plain(tmp)

    def _ranked_states(self) -> dict[str, Any]:
        """The "rank" parts' states, by name (empty states left out)."""
        states = {name: part.obj.state_dict() for name, part in self._of("rank").items()}
        return {name: state for name, state in states.items() if state}

    def _write_ranked(self, tmp: Path, states: dict[str, Any]) -> None:
        for part_name, state in states.items():
            torch.save(state, tmp / f"{part_name}-rank{self.dist.rank}.pt")

    def _write_plain(self, tmp: Path) -> None:
        """The "json" parts and the extra files (rank 0): small, written in the step loop in either mode."""
        if self.dist.is_main:
            plain = {part_name: part.obj.state_dict() for part_name, part in self._of("json").items()}
            (tmp / JSON_FILE).write_text(json.dumps(plain, indent=1))
            for file, text in self.files.items():
                (tmp / file).write_text(text())

    # ---- saving in the background --------------------------------------------------------

    def _stage(self) -> tuple[Any, dict[str, Any]]:
        """Copies in host memory (DCP's stager) of the "tensors" part's state and of the "rank" parts'
        (the noise pair is as large as the model): training may go on changing the originals."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        ((_, part),) = self._of("tensors").items()
        if self._stager is None:
            # Synchronous staging (the copy is made now, in the step loop), no pinned or shared memory;
            # the stager keeps its buffers across saves.
            self._stager = DefaultStager(StagingOptions(False, False, False, False))
        with _during_io(part.obj):
            tensors = self._stager.stage(part.obj.state_dict())
        return tensors, self._stager.stage(self._ranked_states())

    def _write_and_publish(self, staged: tuple[Any, dict[str, Any]], tmp: Path, final: Path, name: str, step: int) -> None:
        """The background thread: the "rank" parts, DCP's tensors, then rank 0 publishes and prunes."""
        tensors, ranked = staged
        self._write_ranked(tmp, ranked)
        with _quiet_single_process():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)), process_group=self._group, no_dist=not self.dist.enabled)
        if self.dist.is_main:
            self._publish(tmp, final, name)
            self._prune(step)

    def pending(self) -> int | None:
        """The step of the save being written in the background, or None."""
        return self._pending.step if self._pending is not None else None

    def poll(self) -> None:
        """Called once per step while a background save is in flight: finish it when every rank's write is done.

        A failure on any rank is raised here, on every rank at the same step, as `save` raises it
        (one `UserError` saying the previous checkpoint is intact; Ctrl-C as `KeyboardInterrupt`).
        With several ranks this costs one small all-reduce per step until the write is done.
        """
        if self._pending is not None:
            self._settle(wait=False)

    def wait(self) -> None:
        """Block until the background save (if any) is written and published; raise its failure."""
        if self._pending is not None:
            self._settle(wait=True)

    def _settle(self, wait: bool) -> None:
        pending = self._pending
        assert pending is not None
        future = pending.future
        if wait:
            futures_wait([future])
        done = future.done()
        error = future.exception() if done else None
        failed = error is not None
        if self.dist.enabled:  # every rank leaves the pending state at the same step
            flags = torch.tensor([float(not done), float(failed)], device=self.device)
            not_done, any_failed = self.dist.all_reduce_sum(flags).tolist()
            if any_failed == 0 and not_done > 0:
                return
            failed = any_failed > 0
        elif not done:
            return
        self._pending = None
        if not failed:
            return
        futures_wait([future])  # this rank's thread is done with the directory before it is removed
        error = future.exception()
        if error is not None and _interrupted(error):
            if self.dist.is_main:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            raise KeyboardInterrupt
        if error is not None and not isinstance(error, (OSError, CheckpointException)):
            raise error  # a bug, not a write error: as the synchronous save would raise it
        self._failed(pending.step, pending.tmp, error)

    def close(self) -> None:
        """Finish a background save (written, published) before the process moves on; any failure is dropped.

        For the error paths of a run (an exception is already on its way): a save whose write
        completes is a whole checkpoint of its step, published as any other; one that fails is
        removed. Safe to call twice.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            futures_wait([pending.future])
            if pending.future.exception() is not None and self.dist.is_main:
                shutil.rmtree(pending.tmp, ignore_errors=True)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _publish(self, tmp: Path, final: Path, name: str) -> None:
        """Checksums, COMPLETE, fsync, rename into place: a reader sees the whole checkpoint or none of it."""
        manifest = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        (tmp / COMPLETE).write_text(name + "\n")
        for f in _files(tmp):
            _fsync(f)
        _fsync(tmp)
        old = final.parent / f"{OLD_PREFIX}{name}"
        if final.exists():  # the same step saved again (after a rollback or a skipped corrupt one)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)  # the rename itself must survive a power cut
        shutil.rmtree(old, ignore_errors=True)

    def _failed(self, step: int, tmp: Path, error: BaseException | None) -> None:
        """Remove the partial save and raise one line: what failed and what is still safe."""
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _one_line(_root_causes(error)[0]) if error is not None else "another rank could not write its part"
        previous = self.latest()
        kept = (
            f"the previous checkpoint {str(previous)!r} is intact (resume with --resume auto)"
            if previous
            else "there is no earlier checkpoint"
        )
        raise UserError(f"could not save the checkpoint at step {step} ({reason}); {kept}")

    def _prune(self, step: int) -> None:
        """Keep the last `keep` complete checkpoints; drop saves a crash left at or before `step`."""
        assert self.root is not None
        complete = [p for p in sorted(self.root.glob(f"{PREFIX}*")) if is_complete(p)]
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in [*self.root.glob(f"{TMP_PREFIX}*"), *self.root.glob(f"{OLD_PREFIX}*")]:
            suffix = stale.name.rsplit("-", 1)[-1]
            if suffix.isdigit() and int(suffix) <= step:
                shutil.rmtree(stale, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------

    def load(self, path: str | Path) -> None:
        """Restore every part from a checkpoint (any world size for the "tensors" part).

        Everything is verified and read before any part changes, except the tensors DCP reads
        from a shard that passed verification; any error is a `UserError` naming the checkpoint
        (`CheckpointMismatch` for another model or optimizer).
        """
        self.wait()  # a background save in flight is published first (or its failure raised)
        path = Path(path)
        if not is_complete(path):
            raise UserError(
                f"checkpoint {str(path)!r} is not a complete regimen checkpoint (expected {COMPLETE}, .metadata and {JSON_FILE})"
            )
        # 1. Verify and read the small files, and the metadata, on every rank; any rank's failure stops them all.
        error: UserError | None = None
        try:
            if self.dist.is_main:
                verify(path)
            plain, ranked, reader, metadata = self._read(path)
        except UserError as e:
            error = e
        if self._any_rank_failed(error is not None):
            raise error or UserError(f"checkpoint {str(path)!r}: another rank could not read its part; it was not loaded")
        # 2. The tensors (DCP reshards to this world size), checked against this model first.
        tensor_parts = self._of("tensors")
        if tensor_parts:
            ((_, part),) = tensor_parts.items()
            template = part.obj.template() if hasattr(part.obj, "template") else part.obj.state_dict()
            if hasattr(part.obj, "check"):
                part.obj.check(path, metadata, template)
            with _during_io(part.obj):
                try:
                    with _quiet_single_process():
                        dcp.load(template, storage_reader=reader, planner=_SafeLoadPlanner())
                except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                    if _interrupted(e):
                        raise KeyboardInterrupt from None
                    raise UserError(f"checkpoint {str(path)!r} could not be loaded ({_one_line(_root_causes(e)[0])})") from None
                self._apply(path, part.obj, template, "the model and optimizer")
        # 3. The plain and per-rank parts, already checked on copies in _read.
        for part_name, state in {**plain, **ranked}.items():
            self._apply(path, self.parts[part_name].obj, state, part_name)

    def _read(self, path: Path) -> tuple[dict[str, Any], dict[str, Any], SafeFileSystemReader, Any]:
        """The json and rank parts' states (each checked by loading it into a copy), and DCP's metadata."""
        try:
            raw = json.loads((path / JSON_FILE).read_text())
            plain = _json_parts(raw)
        except (ValueError, UnicodeDecodeError, OSError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint {str(path)!r}: {JSON_FILE} is corrupt ({type(e).__name__}: {e})") from None
        states: dict[str, Any] = {}
        for part_name in self._of("json"):
            if part_name not in plain:
                raise UserError(f"checkpoint {str(path)!r}: {JSON_FILE} has no {part_name!r} state")
            states[part_name] = plain[part_name]
        ranked: dict[str, Any] = {}
        for part_name, part in self._of("rank").items():
            file = _rank_file(path, part_name, self.dist.rank)
            if file is not None:
                ranked[part_name] = _load_tensors(file)
            elif not part.optional:
                raise UserError(f"checkpoint {str(path)!r} has no {part_name}-rank{self.dist.rank}.pt")
        for part_name, state in {**states, **ranked}.items():
            _check_on_copy(path, part_name, self.parts[part_name].obj, state)
        reader = SafeFileSystemReader(str(path))
        metadata = reader.read_metadata()
        return states, ranked, reader, metadata

    def _apply(self, path: Path, obj: Stateful, state: Any, what: str) -> None:
        try:
            obj.load_state_dict(state)
        except Exception as e:
            raise UserError(f"checkpoint {str(path)!r}: {what} could not be restored ({type(e).__name__}: {str(e)[:200]})") from None

    def latest(self) -> Path | None:
        """The newest complete checkpoint of the run directory, or None (also without a run directory)."""
        return latest_checkpoint(self.run_dir) if self.run_dir is not None else None

    def resume(self, resume: str) -> Path | None:
        """`"auto"` (the newest checkpoint that loads, or None for a fresh start) or a checkpoint / run directory path."""
        main = self.dist.is_main
        if resume == "auto":
            if self.run_dir is None:
                return None
            for partial in incomplete_checkpoints(self.run_dir):
                if main:
                    print(f"regimen: warning: skipping incomplete checkpoint {partial} (a save that did not finish)", file=sys.stderr)
            candidates = list_checkpoints(self.run_dir)
            for path in reversed(candidates):
                try:
                    self.load(path)
                except CheckpointMismatch:
                    raise  # an older checkpoint is of the same other model: starting over would lose the run
                except UserError as e:
                    if main:
                        print(f"regimen: warning: skipping corrupt checkpoint {path}: {e}", file=sys.stderr)
                    continue
                return path
            if candidates:
                where = str(checkpoint_dir(self.run_dir))
                raise UserError(
                    f"--resume auto: none of the {len(candidates)} checkpoint(s) in {where!r} loads (see the warnings); "
                    "nothing was changed; pass --resume PATH, or --overwrite to start the run over"
                )
            return None
        path = Path(resume)
        if not path.exists():
            raise UserError(f"--resume {resume!r}: no such checkpoint")
        if (path / CHECKPOINTS_DIR).is_dir() or path.name == CHECKPOINTS_DIR:  # a run directory was given
            found = latest_checkpoint(path if path.name != CHECKPOINTS_DIR else path.parent)
            if found is None:
                raise UserError(f"--resume {resume!r}: the run has no complete checkpoint")
            path = found
        self.load(path)
        return path


def verify(path: str | Path) -> None:
    """Check every file of a checkpoint against the sizes and SHA-256 sums recorded when it was saved.

    A checkpoint written before checksums existed (no MANIFEST.json) passes with nothing to check.
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return
    try:
        manifest = json.loads(manifest_file.read_text())
        assert isinstance(manifest, dict)
    except (ValueError, UnicodeDecodeError, OSError, AssertionError):
        raise UserError(f"checkpoint {str(path)!r}: {MANIFEST} is corrupt") from None
    for rel, want in manifest.items():
        file = path / rel
        try:
            size, digest = file.stat().st_size, None
            if size == want.get("size"):
                digest = _sha256(file)
        except OSError as e:
            raise UserError(f"checkpoint {str(path)!r}: {rel} is unreadable ({os_reason(e)})") from None
        if size != want.get("size") or digest != want.get("sha256"):
            raise UserError(f"checkpoint {str(path)!r}: {rel} does not match the checksum recorded when it was saved (corrupt)")


def _rank_file(path: Path, name: str, rank: int) -> Path | None:
    file = path / f"{name}-rank{rank}.pt"
    if file.is_file():
        return file
    legacy = path / f"{name}.pt"  # regimen 0.1 wrote the single-process noise pair without a rank
    return legacy if legacy.is_file() else None


def _check_on_copy(path: Path, name: str, obj: Stateful, state: Any) -> None:
    """Load `state` into a copy of `obj`: a malformed state fails here, before anything real changed."""
    try:
        copy.deepcopy(obj).load_state_dict(state)
    except Exception as e:
        raise UserError(f"checkpoint {str(path)!r}: the {name!r} state is malformed ({type(e).__name__}: {str(e)[:200]})") from None


def _json_parts(raw: Any) -> dict[str, Any]:
    """The json parts of a `train_state.json`; regimen 0.1 wrote one flat object, read here as the same parts."""
    if not isinstance(raw, dict):
        raise TypeError("not a JSON object")
    if "progress" not in raw:
        return raw
    legacy = dict(raw)
    return {"batch_schedule": legacy.pop("batch_schedule", {}), "noise": legacy.pop("noise", None), "train": legacy}


# --------------------------------------------------------------------------------------------
# The final export
# --------------------------------------------------------------------------------------------


def export_safetensors(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path, dist: Dist, progress: Progress) -> None:
    """Write the final model weights (full, unsharded) as safetensors; rank 0 writes.

    Every rank calls this (FSDP2 gathers the shards). Schedule-free optimizers export their
    averaged weights. Written beside and renamed: a crash never leaves a torn file.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    set_train_mode(optimizer, False)
    try:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        set_train_mode(optimizer, True)
    if not dist.is_main:
        return
    # A tied weight (the GPT's head) is one parameter under two names: keep its first name.
    # Ask the module, not the storage: FSDP2's gathered full state dict holds separate copies.
    # (safetensors also refuses shared storage: the pointer check stays for the rest.)
    aliases = _tied_aliases(model)
    seen: set[int] = set()
    tensors = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor) or key in aliases:  # extra state is not weights
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        tensors[key] = value.detach().contiguous().cpu()
    tmp = Path(f"{path}.tmp")
    progress_json = json.dumps({"step": progress.step, "samples": progress.samples, "tokens": progress.tokens})
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", "progress": progress_json})
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"could not write {str(path)!r} ({os_reason(e)}); the checkpoints are intact") from None


def _tied_aliases(model: nn.Module) -> set[str]:
    """Every name of a parameter but its first (a tied weight appears under several names)."""
    first: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases.add(name)
        else:
            first[id(p)] = name
    return aliases


def model_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint as plain CPU tensors, without a trainer (for `regimen sample`).

    Read through the same safe reader and planner as a resume; DCP gathers every shard.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_complete(path):
        raise UserError(
            f"checkpoint {str(path)!r}: not a complete regimen checkpoint (expected {COMPLETE}, .metadata and train_state.json)"
        )
    reader = SafeFileSystemReader(str(path))
    items = reader.read_metadata().state_dict_metadata.items()
    model = {
        key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in items
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if not model:
        raise UserError(f"checkpoint {str(path)!r} holds no model weights")
    try:
        with _quiet_single_process():
            dcp.load({"model": model}, storage_reader=reader, planner=_SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise UserError(f"checkpoint {str(path)!r} could not be loaded ({_one_line(_root_causes(e)[0])})") from None
    return model
