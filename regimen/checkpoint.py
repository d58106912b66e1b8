"""Crash-safe checkpoints, resume discovery, and the final safetensors export.

Layout of a run directory's `checkpoints/`:

```
step-00000120/             a complete checkpoint (renamed into place only when whole)
    .metadata, *.distcp    model and optimizer, torch.distributed.checkpoint (sharded under FSDP2)
    train_state.json       progress, schedule and estimator state, skips, the metrics window
    rng-rank{r}.pt         every rank's CPU (and CUDA) RNG state
    strategy.toml          the resolved strategy
    COMPLETE               written last, before the rename
.tmp-step-00000130/        a save in progress (or one a crash interrupted): never loaded
```

Guarantees (docs/reliability.md names the test of each):
- A save writes into `.tmp-step-N`, fsyncs, writes `COMPLETE`, then renames to `step-N`; a crash
  or a write error mid-save leaves the previous checkpoint whole, and the run says so in one line.
- Loading never unpickles code. DCP's `.metadata` is read with an unpickler that admits only the
  dataclasses and enums DCP's metadata is made of (no functions: DCP's own modules hold some that
  write files or call `torch.load(weights_only=False)`). DCP's non-tensor items (optimizer
  hyperparameters) are checked with torch's weights-only unpickler before DCP reads them, since
  DCP's default planner unpickles them with `weights_only=False`. Tensor files use
  `weights_only=True`; the rest is JSON.
- A checkpoint of a different model (a parameter missing, extra, or of another shape) is refused
  before anything is loaded: DCP alone would silently ignore the parameters a smaller model lacks.
- `--resume auto` skips an incomplete or corrupt checkpoint with a warning naming it, but never
  starts over a run whose checkpoints all fail to load (that would truncate its metrics and prune
  its checkpoints): that, and a checkpoint of a different model, is an error.
- Every rank makes the same decision: a failure on one rank is all-reduced, so no rank resumes
  from one checkpoint while another skips it.
- DCP reshards on load: an FSDP2 checkpoint of 2 ranks resumes on 1 (or any number).

Example:
    >>> latest_checkpoint("/nonexistent") is None
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import io
import json
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from regimen.errors import UserError
from regimen.optim import CombinedOptimizer, set_train_mode
from regimen.progress import Progress

if TYPE_CHECKING:
    from regimen.trainer import Trainer

PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
COMPLETE = "COMPLETE"


class CheckpointMismatch(UserError):
    """A whole checkpoint of a different model: an error even under `--resume auto`."""


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
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    """A checkpoint is complete when its COMPLETE marker and its state files are there."""
    return (
        path.name.startswith(PREFIX)
        and (path / COMPLETE).is_file()
        and (path / ".metadata").is_file()
        and (path / "train_state.json").is_file()
    )


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


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _optimizers(trainer: Trainer) -> Any:
    opt = trainer.optimizer
    return opt.optimizers if isinstance(opt, CombinedOptimizer) else opt


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync(path)


def _any_rank_failed(trainer: Trainer, failed: bool) -> bool:
    """All-reduce a failure flag, so every rank takes the same branch (and none waits alone)."""
    if not trainer.dist.enabled:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=trainer.device)
    return trainer.dist.all_reduce_sum(flag).item() > 0


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(trainer: Trainer) -> Path:
    """Save the trainer's whole state atomically; returns the checkpoint's path.

    Every rank calls this (DCP writes each rank's shards). Rank 0 renames the finished
    directory into place after all ranks wrote, then prunes to the last `keep`. A write error
    on any rank (a full disk, a lost mount) removes the partial save on every rank's behalf
    and raises one `UserError` that says the previous checkpoint is intact.
    """
    assert trainer.run_dir is not None, "saving needs a run directory"
    d = trainer.dist
    root = checkpoint_dir(trainer.run_dir)
    step = trainer.progress.step
    name = f"{step:08d}"
    tmp, final = root / f"{TMP_PREFIX}{name}", root / f"{PREFIX}{name}"
    error: BaseException | None = None
    if d.is_main:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    if _any_rank_failed(trainer, error is not None):
        _save_failed(trainer, tmp, error)
    # Schedule-free optimizers save their evaluation weights (x), the ones worth keeping.
    set_train_mode(trainer.optimizer, False)
    try:
        model_sd, optim_sd = get_state_dict(trainer.model, _optimizers(trainer))
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(str(tmp)))
        torch.save(rng_state(trainer.device), tmp / f"rng-rank{d.rank}.pt")
        if d.is_main:
            (tmp / "train_state.json").write_text(json.dumps(trainer.training_state(), indent=1))
            trainer.strategy.save(tmp / "strategy.toml")
        pair = trainer.consecutive_state()
        if pair is not None:
            torch.save(pair, tmp / "noise_pair.pt")
    except (OSError, CheckpointException) as e:  # DCP wraps each rank's OSError in CheckpointException
        error = e
    finally:
        set_train_mode(trainer.optimizer, True)
    if _any_rank_failed(trainer, error is not None):
        _save_failed(trainer, tmp, error)
    if d.is_main:
        try:
            _publish(tmp, final, name)
        except OSError as e:
            error = e
    if _any_rank_failed(trainer, error is not None):  # also the barrier: all ranks see the rename
        _save_failed(trainer, tmp, error)
    if d.is_main:
        _prune(root, trainer.strategy.checkpoint.keep, step)
    return final


def _publish(tmp: Path, final: Path, name: str) -> None:
    """COMPLETE, fsync, rename into place: a reader sees the whole checkpoint or none of it."""
    (tmp / COMPLETE).write_text(name + "\n")
    _fsync_tree(tmp)
    old = final.parent / f"{OLD_PREFIX}{name}"
    if final.exists():  # the same step saved again (after a rollback or a skipped corrupt one)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)  # the rename itself must survive a power cut
    shutil.rmtree(old, ignore_errors=True)


def _save_failed(trainer: Trainer, tmp: Path, error: BaseException | None) -> None:
    """Remove the partial save and raise one line: what failed and what is still safe."""
    if trainer.dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    assert trainer.run_dir is not None
    reason = _one_line(_root_causes(error)[0]) if error is not None else "another rank could not write its part"
    previous = latest_checkpoint(trainer.run_dir)
    kept = (
        f"the previous checkpoint {str(previous)!r} is intact (resume with --resume auto)" if previous else "there is no earlier checkpoint"
    )
    raise UserError(f"could not save the checkpoint at step {trainer.progress.step} ({reason}); {kept}")


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the last `keep` complete checkpoints; drop saves a crash left at or before `step`."""
    complete = [p for p in sorted(root.glob(f"{PREFIX}*")) if is_complete(p)]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"{OLD_PREFIX}*")]:
        suffix = stale.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and int(suffix) <= step:
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _check_same_model(path: Path, metadata: Any, model_sd: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model parameters differ in name or shape from this model's."""
    saved = {k.removeprefix("model."): v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
    missing = [k for k in model_sd if k not in saved]
    extra = [k for k in saved if k not in model_sd]
    what = None
    if missing:
        what = f"{len(missing)} parameter(s) of this model are not in it ({', '.join(missing[:3])})"
    elif extra:
        what = f"it has {len(extra)} parameter(s) this model lacks ({', '.join(extra[:3])})"
    else:
        for key, value in model_sd.items():
            size = getattr(saved[key], "size", None)
            if size is not None and hasattr(value, "shape") and tuple(size) != tuple(value.shape):
                what = f"{key} has shape {list(size)} there but {list(value.shape)} here"
                break
    if what is not None:
        raise CheckpointMismatch(f"checkpoint {str(path)!r} is of a different model: {what}; was a [model] key changed? It was not loaded")


def load_checkpoint(trainer: Trainer, path: str | Path) -> None:
    """Restore the trainer's whole state from a checkpoint (any world size for the model).

    Everything is read and checked before anything in the trainer changes, except a tensor
    file that DCP finds corrupt midway (then the model may be half loaded: `resume_trainer`
    loads an older checkpoint over it, and any other caller stops).
    """
    path = Path(path)
    d = trainer.dist
    if not is_complete(path):
        raise UserError(f"--resume {str(path)!r}: not a complete regimen checkpoint (expected {COMPLETE}, .metadata and train_state.json)")
    # 1. The small files and the metadata, on every rank; any rank's failure stops them all.
    error: UserError | None = None
    try:
        train_state = _read_train_state(path)
        rng_file = path / f"rng-rank{d.rank}.pt"
        rng = _load_tensors(rng_file) if rng_file.exists() else None  # another world size: no RNG of its own
        pair_file = path / "noise_pair.pt"
        pair = _load_tensors(pair_file) if pair_file.exists() else None
        reader = SafeFileSystemReader(str(path))
        metadata = reader.read_metadata()
    except UserError as e:
        error = e
    if _any_rank_failed(trainer, error is not None):
        raise error or UserError(f"checkpoint {str(path)!r}: another rank could not read its part; it was not loaded")
    # 2. Model and optimizer (DCP reshards to this world size). get_state_dict creates a fresh
    # optimizer's state with one zero-LR step, which a schedule-free optimizer refuses in eval
    # mode: its state (z) would be missing from the template and silently not loaded. So the
    # template is taken in train mode, then the optimizer switches to eval like the save did.
    model_sd, optim_sd = get_state_dict(trainer.model, _optimizers(trainer))
    _check_same_model(path, metadata, model_sd)
    set_train_mode(trainer.optimizer, False)
    try:
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        try:
            with _quiet_single_process():
                dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner())
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            cause = _one_line(_root_causes(e)[0])
            raise UserError(f"checkpoint {str(path)!r} could not be loaded ({cause})") from None
        set_state_dict(
            trainer.model,
            _optimizers(trainer),
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=True),
        )
    finally:
        set_train_mode(trainer.optimizer, True)
    # 3. Counters, schedule and estimator state, RNG.
    trainer.load_training_state(train_state)
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], trainer.device)
    if pair is not None:
        trainer.load_consecutive_state(pair)


def _read_train_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / "train_state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"checkpoint {str(path)!r}: train_state.json is corrupt ({e})") from None
    if not isinstance(state, dict) or "progress" not in state:
        raise UserError(f"checkpoint {str(path)!r}: train_state.json has no progress")
    return state


def resume_trainer(trainer: Trainer, run_dir: Path | None, resume: str) -> Path | None:
    """`--resume auto` (newest complete checkpoint, or a fresh start) or `--resume PATH`."""
    main = trainer.dist.is_main
    if resume == "auto":
        if run_dir is None:
            return None
        for partial in incomplete_checkpoints(run_dir):
            if main:
                print(f"regimen: warning: skipping incomplete checkpoint {partial} (a save that did not finish)", file=sys.stderr)
        candidates = list_checkpoints(run_dir)
        for path in reversed(candidates):
            try:
                load_checkpoint(trainer, path)
            except CheckpointMismatch:
                raise  # an older checkpoint is of the same other model: starting over would lose the run
            except UserError as e:
                if main:
                    print(f"regimen: warning: skipping corrupt checkpoint {path}: {e}", file=sys.stderr)
                continue
            if main:
                print(f"regimen: resuming from {path} (step {trainer.progress.step})", file=sys.stderr)
            return path
        if candidates:
            raise UserError(
                f"--resume auto: none of the {len(candidates)} checkpoint(s) in {str(checkpoint_dir(run_dir))!r} loads (see the warnings); "
                "nothing was changed; pass --resume PATH, or --overwrite to start the run over"
            )
        return None
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume {resume!r}: no such checkpoint")
    if (path / "checkpoints").is_dir() or path.name == "checkpoints":  # a run directory was given
        found = latest_checkpoint(path if path.name != "checkpoints" else path.parent)
        if found is None:
            raise UserError(f"--resume {resume!r}: the run has no complete checkpoint")
        path = found
    load_checkpoint(trainer, path)
    if main:
        print(f"regimen: resuming from {path} (step {trainer.progress.step})", file=sys.stderr)
    return path


def export_safetensors(trainer: Trainer, path: str | Path) -> None:
    """Write the final model weights (full, unsharded) as safetensors; rank 0 writes."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    set_train_mode(trainer.optimizer, False)  # schedule-free: export the averaged weights
    try:
        sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        set_train_mode(trainer.optimizer, True)
    if trainer.dist.is_main:
        # A tied weight (the GPT's head) is one parameter under two names: keep its first name.
        # Ask the module, not the storage: FSDP2's gathered full state dict holds separate
        # copies. (safetensors also refuses shared storage: the pointer check stays for the rest.)
        aliases = _tied_aliases(trainer.model)
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
        # Written beside and renamed: a crash never leaves a torn model.safetensors.
        tmp = Path(f"{path}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "progress": json.dumps(trainer.training_state()["progress"])})
        os.replace(tmp, path)


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """Every name of a parameter but its first (a tied weight appears under several names)."""
    first: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases.add(name)
        else:
            first[id(p)] = name
    return aliases


def progress_of(path: str | Path) -> Progress:
    """The progress recorded in a checkpoint (without loading it)."""
    p = json.loads((Path(path) / "train_state.json").read_text())["progress"]
    return Progress(**p)


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
