"""Shared helpers: run the real `regimen` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: a tiny GPT that still exercises every part of the loop.
TINY_GPT = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.context=16", "batch.size=8", "train.eval_samples=64"]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m regimen ARGS` with captured output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "regimen", *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def cli():
    return run_cli
