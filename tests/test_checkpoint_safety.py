"""Loading a checkpoint never runs code, and a corrupt one is skipped or refused, never half-used.

Each crafted checkpoint carries a payload that, if unpickled, creates a marker file; every test
checks both the refusal (exit 2, one clear line) and that the marker does not exist. The crafted
files are the four places a pickle can hide in a DCP checkpoint: `.metadata`, a call to one of
DCP's own functions from `.metadata` (which a module-prefix allowlist would admit), a non-tensor
item inside a `.distcp` shard (DCP's default planner unpickles those with `weights_only=False`),
and `rng-rank0.pt`.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.format_utils import torch_save_to_dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from regimen.checkpoint import list_checkpoints
from regimen.cli import main
from tests.conftest import TINY_GPT, error_line, forge_manifest, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class CallDCP:
    """Unpickling this calls DCP's own `torch_save_to_dcp`, which unpickles `source` unrestricted."""

    def __init__(self, source: Path, out: Path) -> None:
        self.source, self.out = source, out

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch_save_to_dcp, (str(self.source), str(self.out)))


def args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        *TINY_GPT,
        f"data.source=text:{corpus}",
        "train.steps=4",
        "checkpoint.every=2",
        "observe.progress=none",
        "observe.report=false",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with two genuine checkpoints, step 2 and step 4."""
    run = tmp_path_factory.mktemp("genuine") / "run"
    assert main(args(corpus, run)) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    return run


def craft(kind: str, checkpoint: Path, marker: Path, forge_checksums: bool = True) -> None:
    """Plant a payload of `kind` in a copy of a genuine checkpoint.

    An attacker who can write the checkpoint can also rewrite its MANIFEST.json, so by default
    the checksums are forged to match: the safe unpicklers must refuse the payload on their own.
    """
    _plant(kind, checkpoint, marker)
    if forge_checksums:
        forge_manifest(checkpoint)


def _plant(kind: str, checkpoint: Path, marker: Path) -> None:
    if kind == "metadata":
        (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "metadata-calls-dcp":
        source = checkpoint / "payload.pt"
        torch.save(Payload(marker), source)
        (checkpoint / ".metadata").write_bytes(pickle.dumps(CallDCP(source, checkpoint / "converted")))
    elif kind == "distcp-item":
        # Point one optimizer hyperparameter (a non-tensor item) at a shard holding the payload.
        metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
        key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
        index = next(i for i in metadata.storage_data if i.fqn == key)
        buffer = io.BytesIO()
        torch.save(Payload(marker), buffer)
        (checkpoint / "__9_0.distcp").write_bytes(buffer.getvalue())
        metadata.storage_data[index] = _StorageInfo("__9_0.distcp", 0, len(buffer.getvalue()))
        (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    elif kind == "rng":
        torch.save({"cpu": Payload(marker)}, checkpoint / "rng-rank0.pt")
    else:
        raise AssertionError(kind)


REFUSALS = {
    "metadata": "refused to unpickle posix.system",
    "metadata-calls-dcp": "refused to unpickle torch.distributed.checkpoint.format_utils.torch_save_to_dcp",
    "distcp-item": "is not plain data, refused to unpickle it",
    "rng": "rng-rank0.pt is not a plain tensor file, refused to unpickle it",
}


@pytest.mark.parametrize("kind", ["metadata", "rng"])
def test_crafted_checkpoint_is_refused_by_the_cli(kind: str, corpus: Path, finished_run: Path, tmp_path: Path) -> None:
    """`regimen train --resume PATH` on a crafted checkpoint: exit 2, one line, no code run."""
    checkpoint = tmp_path / "crafted" / "step-00000004"
    shutil.copytree(finished_run / "checkpoints" / "step-00000004", checkpoint)
    marker = tmp_path / "pwned"
    craft(kind, checkpoint, marker)
    r = run_cli(*args(corpus, tmp_path / "run", "--resume", str(checkpoint)), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert REFUSALS[kind] in error_line(r.stderr)
    assert not marker.exists(), "the checkpoint ran code"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_crafted_checkpoint_is_refused(
    kind: str, corpus: Path, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every hiding place, in process (a payload that ran would touch the marker here too)."""
    checkpoint = tmp_path / "crafted" / "step-00000004"
    shutil.copytree(finished_run / "checkpoints" / "step-00000004", checkpoint)
    marker = tmp_path / "pwned"
    craft(kind, checkpoint, marker)
    assert main(args(corpus, tmp_path / "run", "--resume", str(checkpoint))) == 2
    assert REFUSALS[kind] in error_line(capsys.readouterr().err)
    assert not marker.exists(), "the checkpoint ran code"
    assert not (checkpoint / "converted").exists()


def test_auto_skips_a_crafted_or_corrupt_newest_checkpoint(
    corpus: Path, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume auto` names the bad checkpoint in a warning and resumes from the one before."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "pwned"
    craft("distcp-item", run / "checkpoints" / "step-00000004", marker)
    assert main([*args(corpus, run, "train.steps=6"), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"regimen: warning: skipping corrupt checkpoint {run / 'checkpoints' / 'step-00000004'}" in err
    assert f"resuming from {run / 'checkpoints' / 'step-00000002'} (step 2)" in err
    assert not marker.exists()


def test_a_tampered_checkpoint_fails_its_checksum_before_anything_is_read(
    corpus: Path, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a forged MANIFEST.json, any change to any file is caught by the checksums first."""
    checkpoint = tmp_path / "crafted" / "step-00000004"
    shutil.copytree(finished_run / "checkpoints" / "step-00000004", checkpoint)
    craft("rng", checkpoint, tmp_path / "pwned", forge_checksums=False)
    assert main(args(corpus, tmp_path / "run", "--resume", str(checkpoint))) == 2
    assert "rng-rank0.pt does not match the checksum recorded when it was saved" in error_line(capsys.readouterr().err)


def test_auto_never_starts_over_a_run_whose_checkpoints_all_fail(
    corpus: Path, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Starting afresh would truncate metrics.jsonl and prune the checkpoints: refuse instead."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for checkpoint in list_checkpoints(run):
        shard = next(checkpoint.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])  # a torn write
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main([*args(corpus, run), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 checkpoint(s)" in error_line(err) and "nothing was changed" in err
    assert err.count("skipping corrupt checkpoint") == 2
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
