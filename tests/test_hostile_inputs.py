"""A careless user and a hostile world: every path ends in one line, the right exit code, nothing lost.

Each case asserts three things: the exit code (2 for a user's mistake, 130 for Ctrl-C, 0 when
there is nothing wrong), that stderr holds exactly one `regimen: error:` line and no traceback,
and that nothing on disk was lost (a hash of every file before and after, or the user's file
itself). Runs go through `regimen.cli.main` in this process where that is enough (milliseconds,
the real entry point and exit code); the checks that need their own process use `run_cli`.

docs/reliability.md names the test of each promise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from regimen import rundir
from regimen.checkpoint import list_checkpoints
from regimen.cli import main
from regimen.rundir import read_metrics
from tests.conftest import TINY_GPT, error_line, forge_manifest, run_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def task(corpus: Path, run_dir: Path | None, *extra: str) -> list[str]:
    """`regimen train` on a tiny GPT: 6 steps, evaluations at 2, 4, 6, checkpoints at 2 and 4."""
    args = [
        "train",
        *TINY_GPT,
        f"data.source=text:{corpus}",
        "train.steps=6",
        "train.eval_every=2",
        "train.log_every=1",
        "checkpoint.every=2",
        "checkpoint.keep=5",
        "observe.progress=none",
        "observe.report=false",
        *extra,
    ]
    return [*args, "--run-dir", str(run_dir)] if run_dir is not None else args


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> str:
    """Run `argv` in this process: exit 2 and one line containing `fragment`."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    line = error_line(err)
    assert fragment in line, line
    return line


@pytest.fixture(scope="module")
def finished(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: checkpoints at 2, 4 and 6, a summary, exported weights."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(task(corpus, run)) == 0
    return run


def copy_of(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ---- --overwrite never deletes what regimen did not write -------------------------------------


def test_overwrite_refuses_a_directory_regimen_did_not_make(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    refused(capsys, [*task(corpus, precious), "--overwrite"], "was not made by regimen")
    assert (precious / "thesis.tex").read_text() == "x" and sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]


def test_overwrite_deletes_nothing_when_the_new_run_cannot_be_built(
    corpus: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in data.source with --overwrite: the old run is still whole."""
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    refused(capsys, [*task(corpus, run, "data.source=text:/no/such/corpus.txt"), "--overwrite"], "does not exist")
    refused(capsys, [*task(corpus, run, "model.name=no_such_module:factory"), "--overwrite"], "cannot import it")
    assert snapshot(run) == before


def test_overwrite_replaces_a_run_and_keeps_the_users_own_files(corpus: Path, finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path / "run")
    (run / "notes.txt").write_text("my notes")
    assert main([*task(corpus, run, "train.steps=2"), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "my notes"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert [e["event"] for e in rundir.read_events(run)][-3:] == ["overwrite", "start", "finished"]


# ---- history is appended, never rewritten ------------------------------------------------------


def test_resume_appends_to_the_metrics_and_never_rewrites_them(corpus: Path, finished: Path, tmp_path: Path) -> None:
    """A resume from step 4 (as if killed after it) keeps every byte of the log and resolves on read."""
    run = copy_of(finished, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "summary.json").unlink()
    logged = (run / "metrics.jsonl").read_bytes()
    whole = read_metrics(finished / "metrics.jsonl")
    assert main([*task(corpus, run), "--resume", "auto"]) == 0
    assert (run / "metrics.jsonl").read_bytes().startswith(logged), "the log was rewritten"
    keys = ("step", "loss", "val_loss", "lr", "batch_size")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(run / "metrics.jsonl")] == [{k: r.get(k) for k in keys} for r in whole]


def test_summary_covers_the_whole_history_after_a_resume(corpus: Path, finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "summary.json").unlink()
    assert main([*task(corpus, run), "--resume", "auto"]) == 0
    want, got = json.loads((finished / "summary.json").read_text()), json.loads((run / "summary.json").read_text())
    for key in ("final_loss", "final_val_loss", "best_val_loss", "steps", "samples", "tokens"):
        assert got[key] == want[key], key


def test_resuming_a_finished_run_says_so_and_changes_nothing(
    corpus: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    assert main([*task(corpus, run), "--resume", "auto"]) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    assert snapshot(run) == before
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_loss"] is not None and summary["final_loss"] is not None


def test_a_raised_budget_continues_a_finished_run_and_records_the_change(corpus: Path, finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path / "run")
    strategy = (run / "strategy.toml").read_text()
    assert main([*task(corpus, run, "train.steps=8"), "--resume", "auto"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert (run / "strategy.toml").read_text() == strategy, "strategy.toml describes the start of the run"
    changed = [e for e in rundir.read_events(run) if e["event"] == "strategy_changed"]
    assert changed and changed[-1]["changed"] == {"train.steps": [6, 8]} and changed[-1]["allowed_by"] == "safe"
    assert rundir.current_strategy(run)["train"]["steps"] == 8


# ---- strategy drift ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        ("optimizer.lr=0.5", "optimizer.lr (0.01 -> 0.5)"),
        ("train.seed=7", "train.seed (0 -> 7)"),
        ("optimizer.name=adamw", "optimizer.name ('muon' -> 'adamw')"),
    ],
)
def test_resume_refuses_a_changed_strategy(
    change: str, listed: str, corpus: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    line = refused(capsys, [*task(corpus, run, change, "train.steps=8"), "--resume", "auto"], "the strategy differs")
    assert listed in line and "--allow-change" in line and "train.steps" not in line
    assert snapshot(run) == before


def test_allow_change_continues_and_records_it(corpus: Path, finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path / "run")
    assert main([*task(corpus, run, "optimizer.lr=0.004", "train.steps=8"), "--resume", "auto", "--allow-change"]) == 0
    changed = [e for e in rundir.read_events(run) if e["event"] == "strategy_changed"][-1]
    assert changed["changed"] == {"optimizer.lr": [0.01, 0.004], "train.steps": [6, 8]} and changed["allowed_by"] == "--allow-change"
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert rundir.current_strategy(run)["optimizer"]["lr"] == 0.004


# ---- the lock -----------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(
    corpus: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(finished, tmp_path / "run")
    before = snapshot(run)
    with rundir.RunLock(run):
        line = refused(capsys, [*task(corpus, run, "train.steps=8"), "--resume", "auto"], "is in use by process")
        assert str(os.getpid()) in line
    assert snapshot(run) == before


def test_the_lock_is_released_when_its_holder_is_killed(corpus: Path, finished: Path, tmp_path: Path) -> None:
    run = copy_of(finished, tmp_path / "run")
    code = (
        f"import sys, time; from regimen.rundir import RunLock; RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert rundir.RunLock(run).holder() == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert rundir.RunLock(run).holder() is None
    assert main([*task(corpus, run, "train.steps=8"), "--resume", "auto"]) == 0


# ---- checkpoints that fail verification or loading ---------------------------------------------


def spoil_shard(checkpoint: Path) -> None:
    shard = next(checkpoint.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
    shard.write_bytes(bytes(data))


def spoil_train_state(mutate: Any) -> Any:
    def spoil(checkpoint: Path) -> None:
        state = json.loads((checkpoint / "train_state.json").read_text())
        mutate(state)
        (checkpoint / "train_state.json").write_text(json.dumps(state))
        forge_manifest(checkpoint)

    return spoil


def spoil_rng(checkpoint: Path) -> None:
    data = bytearray((checkpoint / "rng-rank0.pt").read_bytes())
    data[-40] ^= 0x10
    (checkpoint / "rng-rank0.pt").write_bytes(bytes(data))


def spoil_metadata(checkpoint: Path) -> None:
    data = bytearray((checkpoint / ".metadata").read_bytes())
    data[len(data) // 3] ^= 0x01
    (checkpoint / ".metadata").write_bytes(bytes(data))


def wrong_size_tensor(checkpoint: Path) -> None:
    torch.save({"cpu": torch.zeros(3, dtype=torch.uint8)}, checkpoint / "rng-rank0.pt")
    forge_manifest(checkpoint)


SPOILERS = {
    "64 random bytes in a shard": spoil_shard,
    "a bit flipped in .metadata": spoil_metadata,
    "a bit flipped in the RNG file": spoil_rng,
    "train_state.json without progress": spoil_train_state(lambda s: s["train"].pop("progress")),
    "train_state.json with a mistyped counter": spoil_train_state(lambda s: s["train"].update(rollbacks="two")),
    "train_state.json without the batch schedule": spoil_train_state(lambda s: s.pop("batch_schedule")),
    "an RNG tensor of the wrong size": wrong_size_tensor,
}


@pytest.mark.parametrize("spoil", list(SPOILERS))
def test_resume_auto_skips_a_checkpoint_that_fails_and_falls_back(
    spoil: str, corpus: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever is wrong with the newest checkpoint, --resume auto names it in a warning and resumes from the one before."""
    run = copy_of(finished, tmp_path / "run")
    (run / "summary.json").unlink()  # as if killed after the last save
    newest = run / "checkpoints" / "step-00000006"
    SPOILERS[spoil](newest)
    assert main([*task(corpus, run), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"regimen: warning: skipping corrupt checkpoint {newest}" in err, err
    assert f"resuming from {run / 'checkpoints' / 'step-00000004'} (step 4)" in err
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_a_flipped_bit_in_a_shard_is_never_loaded_silently(
    corpus: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--resume PATH to a spoiled checkpoint: one line naming the file, exit 2."""
    checkpoint = copy_of(finished / "checkpoints" / "step-00000004", tmp_path / "step-00000004")
    spoil_shard(checkpoint)
    refused(
        capsys, [*task(corpus, tmp_path / "run"), "--resume", str(checkpoint)], "does not match the checksum recorded when it was saved"
    )
    assert not (tmp_path / "run").exists(), "a refused run leaves no directory behind"


# ---- Ctrl-C while saving --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ctrl_c_during_a_save_is_an_ordinary_interrupt(
    mode: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C inside DCP's write: exit 130, the save removed, the previous checkpoint whole (in the
    background, the interrupt reaches the run at its next step)."""
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    saves = []
    real_save = dcp.save

    def save(*args: Any, **kwargs: Any) -> Any:
        saves.append(1)
        if len(saves) == 2:  # the step-4 save
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", save)
    assert main(task(corpus, run, f"checkpoint.async_save={str(mode == 'async').lower()}")) == 130
    err = capsys.readouterr().err
    assert "regimen: interrupted" in err and "could not save" not in err and "Traceback" not in err
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    assert not list((run / "checkpoints").glob(".tmp-*")), "the interrupted save is cleaned up"


# ---- write errors outside the checkpoints ---------------------------------------------------------


class FullDisk:
    """A file object that refuses to write, as a full disk does."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


@pytest.mark.parametrize("name", ["metrics.jsonl", ".summary.json.tmp", ".report.html.tmp"])
def test_a_full_disk_while_writing_run_files_is_one_line(
    name: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import pathlib

    real_open, real_path_open = builtins.open, pathlib.Path.open

    def open_(file: Any, *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, *args, **kwargs)
        return FullDisk(f) if Path(str(file)).name == name else f

    def path_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        f = real_path_open(self, *args, **kwargs)
        return FullDisk(f) if self.name == name else f

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(pathlib.Path, "open", path_open)
    run = tmp_path / "run"
    argv = task(corpus, run, "observe.report=true")
    line = refused(capsys, argv, "no space left on device")
    assert name.strip(".").removesuffix(".tmp") in line
    assert not list(run.glob(".*.tmp")), "no temporary file is left behind"


# ---- where the run directory cannot be ---------------------------------------------------------


def test_a_run_directory_that_is_a_file(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("mine")
    refused(capsys, task(corpus, tmp_path / "file"), "is a file, not a directory")
    refused(capsys, task(corpus, tmp_path / "file" / "run"), "is a file, so nothing can be created below it")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_run_directory_that_cannot_be_written(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/proc/sys is read-only on every Linux, for root too (the tests may run as root, which ignores file modes)."""
    refused(capsys, task(corpus, Path("/proc/sys/regimen-run")), "not writable")
    assert not Path("/proc/sys/regimen-run").exists()


# ---- bad values that torch or the optimizers would refuse deep inside ---------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["optimizer.name=adagrad", "optimizer.lr_decay=-1"], "optimizer.lr_decay = -1: must be >= 0"),
        (
            ["optimizer.name=adagrad", "optimizer.initial_accumulator_value=-0.1"],
            "optimizer.initial_accumulator_value = -0.1: must be >= 0",
        ),
        (["optimizer.name=rmsprop", "optimizer.alpha=-0.5"], "optimizer.alpha = -0.5: must be in [0, 1]"),
        (["optimizer.name=nadam", "optimizer.momentum_decay=-1"], "optimizer.momentum_decay = -1: must be >= 0"),
        (["optimizer.name=adafactor", "optimizer.beta2_decay=0.5"], "optimizer.beta2_decay = 0.5: must be <= 0"),
        (["optimizer.name=adafactor", "optimizer.d=0.5"], "optimizer.d = 0.5: must be >= 1"),
        (["optimizer.name=lars", "optimizer.trust_coefficient=-1"], "optimizer.trust_coefficient = -1: must be > 0"),
        (["optimizer.name=schedulefree_adamw", "optimizer.warmup_steps=-5"], "optimizer.warmup_steps = -5: must be >= 0"),
        (["optimizer.name=muon", "optimizer.ns_steps=0"], "optimizer.ns_steps = 0: must be an integer in [1, 100]"),
        (["optimizer.name=sgd", "optimizer.momentum=0", "optimizer.nesterov=true"], "Nesterov momentum needs optimizer.momentum > 0"),
        (["train.seed=-1"], "train.seed = -1: must be an integer in [0, 2^63)"),
        (["optimizer.name=lamb", "parallel.mode=fsdp"], "FSDP2's shards do not have: use parallel.mode = 'ddp'"),
        (["batch.schedule=ramp", "batch.size=8", "batch.start=4", "batch.span=10", "batch.micro=16"], "batch.micro = 16: must be <="),
        (["data.source=text:"], "give a path: text:PATH"),
        (["model.name=:f"], "package.module:factory"),
        (["model.name=..x:f"], "package.module:factory"),
    ],
)
def test_bad_values_are_refused_when_the_strategy_is_read(
    overrides: list[str], fragment: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(capsys, task(corpus, tmp_path / "run", *overrides), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.device=cuda"], "this machine has no CUDA device"),
        (["train.device=cuda:7"], "this machine has no CUDA device"),
        (["train.device=mps"], "this machine has no Apple GPU"),
        (["batch.size=1000000000000"], "more than the training set holds"),
        (["model.name=tests.user_models:not_callable"], "not a callable that builds a model"),
        (["model.name=tests.user_models:no_parameters"], "has no trainable parameters"),
        (["model.name=tests.user_models:too_few_outputs"], "gives 100 outputs per position, fewer than the 256 tokens"),
        (["model.name=tests.user_models:tiny", "model.kwargs={width = 8, depth = 3}"], "does not take them"),
    ],
)
def test_bad_devices_batches_and_models_are_one_line(
    overrides: list[str], fragment: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if overrides[0].startswith("train.device=cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    refused(capsys, task(corpus, tmp_path / "run", *overrides), fragment)
    assert not (tmp_path / "run").exists()


def test_out_of_memory_names_the_key_to_lower(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from regimen.trainer import Trainer

    def oom(self: Trainer) -> dict[str, Any]:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] . DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes."
        )

    monkeypatch.setattr(Trainer, "train_step", oom)
    refused(
        capsys,
        task(corpus, tmp_path / "run", "batch.micro=4"),
        "out of memory at step 1 (global batch 8, batch.micro = 4); lower batch.micro",
    )


# ---- the command line itself -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "--max-restarts", "-1"], "--max-restarts = -1: must be >= 0"),
        (["train", "--resume", "auto"], "--resume auto needs --run-dir"),
        (["train", "--resume", "auto", "--overwrite", "--run-dir", "x"], "choose one"),
    ],
)
def test_command_line_mistakes(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, argv, fragment)


def test_a_directory_given_as_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["train", str(tmp_path)], "is a directory; give a strategy TOML file")


def test_an_ignored_batch_key_is_one_warning_line(tmp_path: Path) -> None:
    r = run_cli("train", "batch.stages=[{until = 10, size = 8}]", "--print-config")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "regimen: warning: batch.stages ignored: batch.schedule = 'fixed' does not read it"


def test_a_bad_input_in_a_subprocess_is_one_line_and_no_traceback(corpus: Path, tmp_path: Path) -> None:
    r = run_cli(*task(corpus, tmp_path / "run", "optimizer.name=rmsprop", "optimizer.alpha=-1"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    assert "optimizer.alpha = -1" in error_line(r.stderr)
    assert not (tmp_path / "run").exists()
