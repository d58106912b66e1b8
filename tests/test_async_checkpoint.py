"""Checkpoints written in the background (`checkpoint.async_save`, CUDA's default) keep every guarantee.

The step loop pays for a copy of the model and optimizer state (DCP's staging) and goes on
training while a thread writes, checksums and renames (docs/reliability.md, "Checkpoints").
These tests pin what that must not change: the checkpoint holds the state of its step, not a
later one; a kill while the write is in flight leaves the previous checkpoint whole and the run
resumes bit-exact; Ctrl-C then finishes the write and exits 130. A write error reported a step or
more later is `tests/test_faults.py::test_write_error_while_saving[async]`; Ctrl-C raised inside
the write, `tests/test_hostile_inputs.py::test_ctrl_c_during_a_save_is_an_ordinary_interrupt[async]`;
a kill during the copy itself in a DDP job, `tests/test_resume.py::test_sigkilled_three_times_resumes_bit_exact[ddp]`.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from regimen.checkpoint import Checkpointer, ModelState, is_complete
from tests.test_resume import (  # noqa: F401  (_no_stray_jobs: the autouse fixture that kills a failed test's job)
    FREEZING,
    STEPS,
    Job,
    _no_stray_jobs,
    assert_resumed_from,
    assert_same_weights,
    compared_rows,
    latest_step,
    rows,
    strategy_args,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_background_save_holds_the_state_of_its_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`save` returns while the write waits; the model then changes; the checkpoint has the old weights."""
    gate = threading.Event()
    real = dcp.FileSystemWriter.write_data

    def held(self: Any, plan: Any, planner: Any) -> Any:
        assert gate.wait(60), "the test never opened the gate"
        return real(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", held)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    kept = Live(torch.arange(4.0))  # a "rank" part whose state is a live buffer, as the noise pair's
    ckpt = Checkpointer(tmp_path, keep=2, background=True)
    ckpt.add("model", ModelState(model, optimizer), "tensors")
    ckpt.add("kept", kept, "rank")
    path = ckpt.save(step=1)
    assert ckpt.pending() == 1 and not path.exists(), "the save returned before its write: it is in flight"
    with torch.no_grad():  # training goes on while the write waits
        for p in model.parameters():
            p.add_(1.0)
        kept.t.mul_(10.0)
    gate.set()
    ckpt.wait()
    assert ckpt.pending() is None and is_complete(path)

    fresh, fresh_kept = torch.nn.Linear(8, 4), Live(torch.zeros(4))
    other = Checkpointer(tmp_path, keep=2)
    other.add("model", ModelState(fresh, torch.optim.AdamW(fresh.parameters(), lr=0.1)), "tensors")
    other.add("kept", fresh_kept, "rank")
    other.load(path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), f"{k}: the checkpoint holds a later state than its step's"
    assert fresh_kept.t.tolist() == [0.0, 1.0, 2.0, 3.0], "the rank part holds a later state than its step's"
    ckpt.close()


class Live:
    """A stateful part whose `state_dict` hands out its live tensor (changed in place later)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = state["t"].clone()


# ---- real processes: a kill and a Ctrl-C while the background write is in flight ---------------

STEP = 15  # the save in flight; the previous one is step 10 (checkpoint.every = 5)
AFTER = STEP + 2  # the training forward the step loop reaches while that write waits


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("async-reference") / "run"
    train(strategy_args(corpus, "checkpoint.async_save=false"), run, run.parent / "log.txt")
    return run


def _frozen_in_the_write(corpus: Path, tmp_path: Path) -> tuple[Job, Path, list[str]]:
    """A fresh run stopped with the write of step 15 in flight, the step loop at step 17."""
    args = strategy_args(corpus, *FREEZING, "checkpoint.async_save=true")
    run = tmp_path / "run"
    tmp = run / "checkpoints" / f".tmp-step-{STEP:08d}"
    job = Job(args, run, tmp_path / "log1.txt", freeze=f"write:{tmp}:{AFTER}")
    job.wait_until(job.stopped, f"the stop in the background write of step {STEP}")
    # The step loop went on while the write was in flight (a synchronous save would still be at step 15).
    assert max(r["step"] for r in rows(run)) >= AFTER - 1
    assert tmp.is_dir() and not (run / "checkpoints" / f"step-{STEP:08d}").exists()
    return job, run, args


@pytest.mark.slow
def test_killed_while_the_background_write_is_in_flight(corpus: Path, tmp_path: Path, reference: Path) -> None:
    """SIGKILL with the write in flight: the previous checkpoint is whole, the run resumes from it bit-exact."""
    job, run, args = _frozen_in_the_write(corpus, tmp_path)
    job.kill()
    assert latest_step(run) == STEP - 5

    log = train([*args, "--resume", "auto"], run, tmp_path / "log2.txt")
    assert_resumed_from(log, STEP - 5)
    assert "skipping incomplete checkpoint" in log and f".tmp-step-{STEP:08d}" in log
    assert_same_weights(run, reference)
    got, want = compared_rows(run), compared_rows(reference)
    assert got == want and len(want) == STEPS


@pytest.mark.slow
def test_ctrl_c_while_the_background_write_is_in_flight(corpus: Path, tmp_path: Path, reference: Path) -> None:
    """SIGINT with the write in flight: the write finishes and is published whole, exit 130, the run resumes from it."""
    job, run, args = _frozen_in_the_write(corpus, tmp_path)
    os.kill(job.proc.pid, signal.SIGINT)
    os.kill(job.proc.pid, signal.SIGCONT)
    assert job.proc.wait(120) == 130, job.text()[-3000:]
    assert "regimen: interrupted" in job.text() and "Traceback" not in job.text()
    assert latest_step(run) == STEP, "the checkpoint whose write was in flight is complete"
    assert not list((run / "checkpoints").glob(".tmp-*"))

    log = train([*args, "--resume", "auto"], run, tmp_path / "log2.txt")
    assert_resumed_from(log, STEP)
    assert_same_weights(run, reference)
    assert compared_rows(run) == compared_rows(reference)
