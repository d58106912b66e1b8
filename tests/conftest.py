"""Shared helpers: run the real `regimen` command in a subprocess."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: a tiny GPT that still exercises every part of the loop.
TINY_GPT = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.context=16", "batch.size=8", "train.eval_samples=64"]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m regimen ARGS` with captured output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "regimen", *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def need(module: str) -> ModuleType:
    """Import an optional integration (optuna, mlflow, ...) for a test.

    Skipped where it is not installed, but an error in CI: `make setup` installs every extra
    (`.[all]`), so there a missing one is a broken install, not a reason to skip.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[all]')")


def error_line(stderr: str) -> str:
    """The one `regimen: error:` line of a command's stderr, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("regimen: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def snapshot(path: Path) -> dict[str, str]:
    """Every file below `path` and a hash of its bytes (but `.lock`, which names the process that held it last)."""
    import hashlib

    files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def forge_manifest(checkpoint: Path) -> None:
    """Recompute a checkpoint's MANIFEST.json over its files as they are now, as someone editing it
    could: only the loader's own checks then stand between a spoiled file and the run."""
    import hashlib
    import json

    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name not in ("MANIFEST.json", "COMPLETE"))
    manifest = {
        p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in files
    }
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's in-process runs (tiny tensors; a shared 2-core machine
    turns extra threads into synchronisation); restored afterwards for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float64_one_thread() -> Iterator[None]:
    """float64 as torch's default dtype and one thread, for one test: equal arithmetic gives equal
    numbers, and tolerances are float64's; restored afterwards, so other tests see torch's defaults."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def write_corpus(path: Path) -> Path:
    """200 kB of real Python source: loads in milliseconds, unlike the whole standard library."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    path.write_bytes(b"\n".join(p.read_bytes() for p in sorted(root.glob("*.py"))[:40])[:200_000])
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")
