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
  or a write error mid-save leaves the previous checkpoint whole, and the run says so.
- Loading never unpickles code: DCP's metadata is read with an unpickler that admits only
  checkpoint metadata classes; tensors files are read with `weights_only=True`; the rest is JSON.
- DCP reshards on load: an FSDP2 checkpoint of 2 ranks resumes on 1 (or any number).

Example:
    >>> latest_checkpoint("/nonexistent") is None
    True
"""

from __future__ import annotations

import contextlib
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from regimen.errors import UserError
from regimen.optim import CombinedOptimizer, set_train_mode
from regimen.progress import Progress

if TYPE_CHECKING:
    from regimen.trainer import Trainer

PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
COMPLETE = "COMPLETE"


# --------------------------------------------------------------------------------------------
# Safe loading of DCP metadata
# --------------------------------------------------------------------------------------------

_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.", "torch.distributed.tensor.")
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
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
    ("builtins", "object"),
    ("enum", "Enum"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP's metadata is made of; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        memory_format = module == "torch" and isinstance(getattr(torch, name, None), torch.memory_format)
        layout = module == "torch" and isinstance(getattr(torch, name, None), torch.layout)
        if (
            (module, name) in _SAFE_GLOBALS
            or dtype
            or memory_format
            or layout
            or (module.startswith(_SAFE_MODULE_PREFIXES) and "." not in name)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with a restricted unpickler for the metadata file."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise UserError(f"checkpoint {str(self.path)!r} is not a valid regimen checkpoint ({e}); it was not loaded") from None
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
    """Complete checkpoints, oldest first; incomplete ones are reported and skipped."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob(f"{PREFIX}*")):
        if is_complete(path):
            found.append(path)
        else:
            warnings.warn(f"regimen: skipping incomplete checkpoint {path}", stacklevel=2)
    return found


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir) if Path(run_dir).exists() else []
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _optimizers(trainer: Trainer) -> Any:
    opt = trainer.optimizer
    return opt.optimizers if isinstance(opt, CombinedOptimizer) else opt


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(trainer: Trainer) -> Path:
    """Save the trainer's whole state atomically; returns the checkpoint's path.

    Every rank calls this (DCP writes each rank's shards). Rank 0 renames the finished
    directory into place after all ranks wrote, then prunes to the last `keep`.
    """
    d = trainer.dist
    root = checkpoint_dir(trainer.run_dir)
    name = f"{trainer.progress.step:08d}"
    tmp, final = root / f"{TMP_PREFIX}{name}", root / f"{PREFIX}{name}"
    if d.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    d.barrier()
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
        d.barrier()
        if d.is_main:
            (tmp / COMPLETE).write_text(name + "\n")
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(root, trainer.strategy.checkpoint.keep)
        d.barrier()
    except OSError as e:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(trainer.run_dir)
            kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
            print(f"regimen: warning: saving checkpoint at step {trainer.progress.step} failed ({e}); {kept}", file=sys.stderr)
        raise UserError(f"could not save the checkpoint at step {trainer.progress.step}: {e}") from None
    finally:
        set_train_mode(trainer.optimizer, True)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = [p for p in sorted(root.glob(f"{PREFIX}*")) if is_complete(p)]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_checkpoint(trainer: Trainer, path: str | Path) -> None:
    """Restore the trainer's whole state from a checkpoint (any world size for the model)."""
    path = Path(path)
    if not is_complete(path):
        raise UserError(f"--resume {str(path)!r}: not a complete regimen checkpoint (expected {COMPLETE}, .metadata and train_state.json)")
    set_train_mode(trainer.optimizer, False)
    model_sd, optim_sd = get_state_dict(trainer.model, _optimizers(trainer))
    state = {"model": model_sd, "optim": optim_sd}
    reader = SafeFileSystemReader(str(path))
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader)
    except Exception as e:  # DCP wraps every rank's failure in its own exception types
        text = str(e)
        if "not a valid regimen checkpoint" in text:
            raise UserError(
                f"checkpoint {str(path)!r} is not a valid regimen checkpoint: {text.split('(', 1)[-1].split(')')[0]}; it was not loaded"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(f"checkpoint {str(path)!r} does not match this model and optimizer ({first[:300]})") from None
    set_state_dict(
        trainer.model,
        _optimizers(trainer),
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=True),
    )
    set_train_mode(trainer.optimizer, True)
    try:
        train_state = json.loads((path / "train_state.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {str(path)!r}: train_state.json is corrupt ({e})") from None
    trainer.load_training_state(train_state)
    rng_file = path / f"rng-rank{trainer.dist.rank}.pt"
    if rng_file.exists():  # a different world size has no RNG of its own to restore
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], trainer.device)
    pair_file = path / "noise_pair.pt"
    if pair_file.exists():
        trainer.load_consecutive_state(torch.load(pair_file, weights_only=True))


def resume_trainer(trainer: Trainer, run_dir: Path | None, resume: str) -> Path | None:
    """`--resume auto` (newest complete checkpoint, or a fresh start) or `--resume PATH`."""
    if resume == "auto":
        if run_dir is None:
            return None
        candidates = list_checkpoints(run_dir)
        for path in reversed(candidates):
            try:
                load_checkpoint(trainer, path)
            except UserError as e:
                if trainer.dist.is_main:
                    print(f"regimen: warning: skipping checkpoint {path}: {e}", file=sys.stderr)
                continue
            if trainer.dist.is_main:
                print(f"regimen: resuming from {path} (step {trainer.progress.step})", file=sys.stderr)
            return path
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
    return path


def export_safetensors(trainer: Trainer, path: str | Path) -> None:
    """Write the final model weights (full, unsharded) as safetensors; rank 0 writes."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    set_train_mode(trainer.optimizer, False)  # schedule-free: export the averaged weights
    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    set_train_mode(trainer.optimizer, True)
    if trainer.dist.is_main:
        # safetensors refuses shared storage (the tied head): keep one name per tensor.
        seen: dict[int, str] = {}
        tensors = {}
        for key, value in sd.items():
            ptr = value.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen[ptr] = key
            tensors[key] = value.detach().contiguous().cpu()
        save_file(tensors, str(path), metadata={"format": "pt", "progress": json.dumps(trainer.training_state()["progress"])})


def progress_of(path: str | Path) -> Progress:
    """The progress recorded in a checkpoint (without loading it)."""
    p = json.loads((Path(path) / "train_state.json").read_text())["progress"]
    return Progress(**p)
