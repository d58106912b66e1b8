"""Faults a run survives or refuses cleanly: non-finite losses, write errors, bad input.

Most runs here go through `regimen.cli.main` in this process (the command line's own entry
point, exit code and all; a traceback would fail the test), which costs milliseconds instead of
a Python start; the checks that need a separate process use `run_cli`.

"Nothing overwritten or lost" is checked by hashing every file of the run directory before and
after.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from regimen.checkpoint import latest_checkpoint
from regimen.cli import main
from regimen.data import SampleOrder
from regimen.rundir import read_metrics
from tests.conftest import TINY_GPT, error_line, run_cli, snapshot
from tests.nan_model import POISON

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, CONTEXT = 8, 16


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir / "metrics.jsonl")


# ---- non-finite losses: skip, roll back, stop ------------------------------------------------


def poison(clean: Path, out: Path, steps: list[int] = (), from_step: int | None = None) -> Path:
    """A copy of `clean` in which one sample of each of `steps` (or every sample read from
    `from_step` on) holds the poison byte, given the sample order of seed 0 and batch 8."""
    data = bytearray(clean.read_bytes())
    n = (len(data) - 1) // CONTEXT  # val_fraction = 0: every window is a training sample
    order = SampleOrder(n, seed=0)
    windows = [int(order.take((s - 1) * BATCH, 1)[0]) for s in steps]
    if from_step is not None:
        start = (from_step - 1) * BATCH
        windows += order.take(start, n - start).tolist()
    for w in windows:
        data[w * CONTEXT + CONTEXT // 2] = POISON  # inside the window's input, shared with no other window
    out.write_bytes(bytes(data))
    return out


def nan_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "model.name=tests.nan_model:factory",
        f"model.context={CONTEXT}",
        f"batch.size={BATCH}",
        f"data.source=text:{data}",
        "data.val_fraction=0",
        "train.steps=16",
        "train.log_every=1",
        "lr.schedule=constant",
        "optimizer.lr=1e-3",
        "checkpoint.every=5",
        "train.max_skips_in_row=3",
        "train.lr_backoff=0.5",
        "train.max_rollbacks=2",
        "observe.progress=lines",
        "observe.report=false",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def test_nonfinite_skip_then_rollback_skips_the_bad_data(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A NaN at step 3 is skipped; NaNs at 7, 8, 9 roll back to step 5 with the LR halved and the
    data of 6-9 skipped, after which training finishes cleanly (the same bad data is never met
    again: were it re-read, the run would roll back again and finally stop)."""
    data = poison(corpus, tmp_path / "poisoned.txt", steps=[3, 7, 8, 9])
    run = tmp_path / "run"
    assert main(nan_args(data, run)) == 0
    out = capsys.readouterr()
    assert "step 3: non-finite loss or gradients; step skipped (1 in a row)" in out.err
    assert "step 9: non-finite loss or gradients; step skipped (3 in a row)" in out.err
    assert "step 9: rolled back to step 5 (step-00000005); LR x 0.5" in out.err

    summary = json.loads((run / "summary.json").read_text())
    assert summary["events"] == [
        {"event": "skip", "step": 3, "loss": None},
        {"event": "skip", "step": 7, "loss": None},
        {"event": "skip", "step": 8, "loss": None},
        {"event": "skip", "step": 9, "loss": None},
        {"event": "rollback", "step": 9, "to_step": 5, "lr_factor": 0.5},
    ]
    assert "4 skipped step(s), 1 rollback(s): skip@3, skip@7, skip@8, skip@9, rollback@9" in out.out

    logged = rows(run)
    assert [r["step"] for r in logged] == [1, 2, 4, *range(5, 17)]  # 3 skipped; 6-9 redone once
    assert all(np.isfinite(r["loss"]) for r in logged)
    assert {r["lr"] for r in logged if r["step"] <= 5} == {1e-3}
    assert {r["lr"] for r in logged if r["step"] > 5} == {0.5e-3}
    state = json.loads((latest_checkpoint(run) / "train_state.json").read_text())["train"]
    assert state["data_offset"] == (9 - 5) * BATCH and state["rollbacks"] == 1
    # Counted in progress: 5 steps before the rollback point plus 11 after, 8 samples each.
    assert summary["steps"] == 16 and summary["samples"] == 16 * BATCH


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"from_step": 7}, "training diverged: 3 non-finite steps in a row at step 8 after 2 rollback(s) (train.max_rollbacks = 2)"),
        ({"steps": [2, 3, 4]}, "training diverged: 3 non-finite steps in a row at step 4 and no checkpoint to roll back to"),
    ],
    ids=["max-rollbacks", "no-checkpoint"],
)
def test_nonfinite_stops_cleanly(
    bad: dict[str, Any], message: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad data everywhere: two rollbacks, then a clean stop (exit 2, one line), checkpoint intact."""
    data = poison(corpus, tmp_path / "poisoned.txt", **bad)
    run = tmp_path / "run"
    assert main(nan_args(data, run)) == 2
    err = capsys.readouterr().err
    assert message in error_line(err)
    if "from_step" in bad:
        assert err.count("rolled back to step 5") == 2
        assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5]  # the rows of the discarded attempts are gone
        assert latest_checkpoint(run) == run / "checkpoints" / "step-00000005"


# ---- a write error while saving ---------------------------------------------------------------


class FullDisk(dcp.FileSystemWriter):
    """DCP's writer on a disk that fills up: the shards are written, then ENOSPC."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        super().write_data(plan, planner)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def base_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        *TINY_GPT,
        f"data.source=text:{corpus}",
        "train.steps=12",
        "train.log_every=1",
        "checkpoint.every=5",
        "observe.progress=none",
        "observe.report=false",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("where", ["inside-dcp", "dcp.save"])
def test_write_error_while_saving(
    where: str, mode: str, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second save fails: exit 2 and one line; the first checkpoint is whole and resumes.

    Saved in the background (`async`), the failure is raised at a later step or at the end of
    the run, so the rows of the steps trained meanwhile are logged too (and superseded on resume).
    """
    real_save = dcp.save
    calls = []

    def save(state: Any, *, storage_writer: Any, **kwargs: Any) -> Any:
        calls.append(storage_writer.path)
        if len(calls) == 2:
            if where == "dcp.save":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            storage_writer = FullDisk(storage_writer.path)
        return real_save(state, storage_writer=storage_writer, **kwargs)

    run = tmp_path / "run"
    mode_args = [f"checkpoint.async_save={str(mode == 'async').lower()}"]
    with monkeypatch.context() as m:
        m.setattr(dcp, "save", save)
        assert main(base_args(corpus, run, *mode_args)) == 2
    line = error_line(capsys.readouterr().err)
    assert "could not save the checkpoint at step 10 (OSError: [Errno 28] No space left on device)" in line
    assert f"the previous checkpoint '{run / 'checkpoints' / 'step-00000005'}' is intact" in line
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000005"], "the partial save must be removed and the previous one kept"
    logged = [r["step"] for r in rows(run)]
    if mode == "sync":
        assert logged == list(range(1, 11))  # nothing logged was lost
    else:
        assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 10, logged

    # The previous checkpoint loads, and the resumed run ends where an uninterrupted one does.
    assert main([*base_args(corpus, run, *mode_args), "--resume", "auto"]) == 0
    assert "resuming from" in capsys.readouterr().err
    reference = tmp_path / "reference"
    assert main(base_args(corpus, reference, "checkpoint.async_save=false")) == 0
    assert [(r["step"], r["loss"]) for r in rows(run)] == [(r["step"], r["loss"]) for r in rows(reference)]


# ---- bad input: exit 2, one line, nothing overwritten -------------------------------------------


@pytest.fixture(scope="module")
def finished_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of a 2-layer tiny GPT with two checkpoints (step 3 and step 6)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    args = base_args(corpus, run, "model.n_layer=2", "train.steps=6", "checkpoint.every=3")
    assert main(args) == 0
    return run


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_resume_with_a_different_model_shape_is_refused(corpus: Path, finished_run: Path, tmp_path: Path) -> None:
    """`--resume auto` with model.d_model changed: exit 2, one line naming the key, nothing changed; with
    --allow-change the checkpoint itself is refused, naming the parameter."""
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    args = base_args(corpus, run, "model.n_layer=2", "model.d_model=64", "--resume", "auto")[1:]
    r = run_cli("train", *args, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert "the strategy differs from the one" in error_line(r.stderr) and "model.d_model (32 -> 64)" in r.stderr
    assert snapshot(run) == before
    r = run_cli("train", *args, "--allow-change", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert "step-00000006' is of a different model: tok_emb.weight has shape [256, 32] there but [256, 64] here" in line
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("model.n_layer=1", "it has 12 parameter(s) this model lacks (blocks.1."),  # DCP alone loads it silently
        ("model.n_layer=3", "parameter(s) of this model are not in it (blocks.2."),
        ("model.context=32", "pos_emb.weight has shape [16, 32] there but [32, 32] here"),
    ],
)
def test_resume_into_another_model_is_refused(
    change: str, fragment: str, corpus: Path, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fewer layers, more layers, another context: refused before anything is loaded or written."""
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    assert main([*base_args(corpus, run, "model.n_layer=2", change), "--resume", "auto", "--allow-change"]) == 2
    assert fragment in error_line(capsys.readouterr().err)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("odd.bin", b"\x01\x00\x02", "odd.bin has 3 bytes, not a whole number of uint16 tokens"),
        ("empty.bin", b"", "empty.bin is empty"),
        ("empty.txt", b"", "the training set is empty"),
    ],
)
def test_bad_data_files(name: str, content: bytes, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A token file of odd size, an empty token file, an empty text file: exit 2, one line, no run dir."""
    path = tmp_path / name
    path.write_bytes(content)
    kind = "tokens" if name.endswith(".bin") else "text"
    run = tmp_path / "run"
    assert main(["train", *TINY_GPT, f"data.source={kind}:{path}", "train.steps=2", "--run-dir", str(run)]) == 2
    assert fragment in error_line(capsys.readouterr().err)
    assert not run.exists()


def test_existing_run_dir_needs_resume_or_overwrite(corpus: Path, finished_run: Path, tmp_path: Path) -> None:
    """A real run directory (checkpoints, metrics, weights) is left byte for byte as it was."""
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    r = run_cli("train", *base_args(corpus, run)[1:])
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert "exists; pass --resume auto to continue it or --overwrite to replace it" in line
    assert snapshot(run) == before


def test_saved_checkpoint_loads_into_a_fresh_trainer(corpus: Path, finished_run: Path) -> None:
    """The plain Python API: a checkpoint restores weights and counters exactly."""
    from regimen.strategy import Strategy
    from regimen.task import build_task
    from regimen.trainer import Trainer

    s = Strategy.load(finished_run / "strategy.toml")  # the run's own resolved strategy
    trainer = Trainer(s, build_task(s.resolve()))
    trainer.checkpointer.load(finished_run / "checkpoints" / "step-00000006")
    assert trainer.progress.step == 6
    from safetensors.torch import load_file

    final = load_file(str(finished_run / "model.safetensors"))
    state = trainer.model.state_dict()
    assert all(torch.equal(final[k], state[k]) for k in final)
