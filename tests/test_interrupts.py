"""Ctrl-C stops a run even when something on the way drops its KeyboardInterrupt (regimen.interrupts)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from regimen.interrupts import remembered
from regimen.strategy import Strategy
from regimen.task import build_task
from regimen.trainer import Trainer


def _trainer(hook: Any) -> Trainer:
    s = Strategy.load(
        None, ["model.name=mlp", "data.source=synthetic", "batch.size=8", "train.steps=10", "train.device=cpu", "observe.progress=none"]
    )
    return Trainer(s, build_task(s), hooks=[hook])


def _ctrl_c_swallowed() -> bool:
    """Send this process SIGINT and drop the KeyboardInterrupt, as a library that catches it would; whether it came."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs here, in the main thread
    except KeyboardInterrupt:
        return True
    return False


def test_a_dropped_ctrl_c_stops_the_run_at_the_next_step() -> None:
    came: list[bool] = []

    def swallow_at_step_3(trainer: Trainer, out: dict[str, Any]) -> None:
        if trainer.progress.step == 3:
            came.append(_ctrl_c_swallowed())

    trainer = _trainer(swallow_at_step_3)
    # Python's own handler, as in a terminal (a suite started in the background has SIGINT ignored).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone again
    finally:
        signal.signal(signal.SIGINT, before)
    assert came == [True]
    assert trainer.progress.step == 3  # stopped before step 4, not trained to the end


def test_a_handler_of_the_programs_own_is_left_alone() -> None:
    calls: list[int] = []
    mine = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with remembered() as interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert not interrupted()
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, mine)
