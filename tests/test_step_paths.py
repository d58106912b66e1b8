"""The step's fast paths change where time goes, never a result.

- Clipping: the trainer multiplies the gradients only when their norm is above `train.clip`
  (torch's `clip_grad_norm_` multiplies by 1.0 otherwise), and with `train.clip = 0` computes the
  norm alone (the non-finite guard's). A hand-written step with torch's `clip_grad_norm_` is the
  oracle: the parameters must be equal bit for bit, clipping on every step, on none, and off; the
  profiler shows the multiply gone where it changes nothing.
- Prefetching: the next step's samples are gathered on a background thread; a run with it is
  the same run as one without, bit for bit; a guess that misses is gathered in the step; an error
  of the background gather is raised by the step; a user's `Dataset` is never gathered off the
  main thread.
- Host memory: after `keep_freed_memory()` a step's buffers, freed and taken again, make no page
  fault, even where glibc was set to map and unmap them (its thresholds fixed low, which is where
  its moving thresholds can leave a process, which then faults in up to 17,500 pages in a step).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from regimen.data import DatasetSamples, TokenWindows
from regimen.prefetch import Prefetcher
from regimen.strategy import Strategy
from regimen.task import build_task
from regimen.trainer import Trainer
from tests.conftest import ROOT, TINY_GPT

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


def _trainer(corpus: Any, *extra: str) -> Trainer:
    overrides = [
        *TINY_GPT,
        f"data.source=text:{corpus}",
        "optimizer.name=adamw",
        "optimizer.lr=1e-2",
        "lr.schedule=constant",
        "train.device=cpu",
        "observe.progress=none",
        *extra,
    ]
    s = Strategy.load(None, overrides).resolve()
    trainer = Trainer(s, build_task(s))
    trainer.model.train()
    return trainer


def _steps(trainer: Trainer, n: int) -> list[dict[str, Any]]:
    outs = []
    for _ in range(n):
        out = trainer.train_step()
        trainer.progress = trainer.progress.advanced(out["batch_size"], trainer.data.tokens_per_sample)
        outs.append(out)
    return outs


@pytest.mark.parametrize("clip", [1e-3, 1e9, 0.0], ids=["clips-every-step", "never-clips", "off"])
def test_clipping_is_torchs_clip_grad_norm_bit_for_bit(corpus: Any, clip: float) -> None:
    trainer = _trainer(corpus, f"train.clip={clip}")
    model = copy.deepcopy(trainer.model)
    optimizer = copy.deepcopy(trainer.optimizer)  # the same fused AdamW, over the copy's parameters
    optimizer.param_groups = [{**g, "params": [dict(model.named_parameters())[n] for n in names]} for g, names in _names(trainer)]
    params = list(model.parameters())
    norms = []
    for step in range(STEPS):
        ids = trainer.order.take(step * 8, 8)
        x, y = trainer.data.train.gather(ids)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        if clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    outs = _steps(trainer, STEPS)
    for (name, a), b in zip(trainer.model.named_parameters(), params, strict=True):
        assert torch.equal(a, b), f"{name} differs from the hand-written step with torch's clip_grad_norm_"
    if clip == 1e-3:
        assert all(n > clip for n in norms)  # really clipped, every step
    if clip == 1e9:
        assert all(n < clip for n in norms)
    assert [o["grad_norm"] for o in outs] == pytest.approx([float(n) for n in norms] if norms else [o["grad_norm"] for o in outs])


def _names(trainer: Trainer) -> list[tuple[dict[str, Any], list[str]]]:
    """Each parameter group of the trainer's optimizer with the names of its parameters."""
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    return [({k: v for k, v in g.items() if k != "params"}, [by_id[id(p)] for p in g["params"]]) for g in trainer.optimizer.param_groups]


@pytest.mark.parametrize(("clip", "multiplies"), [(1e-3, 1), (1e9, 0), (0.0, 0)], ids=["clips", "under-the-limit", "off"])
def test_the_gradients_are_multiplied_only_when_clipping_changes_them(corpus: Any, clip: float, multiplies: int) -> None:
    trainer = _trainer(corpus, f"train.clip={clip}")
    _steps(trainer, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _steps(trainer, 1)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::_foreach_mul_", 0) == multiplies
    assert counts.get("aten::_foreach_norm", 0) == 1  # the guard's norm, always: one read pass


# ---- prefetching --------------------------------------------------------------------------------


def test_a_prefetched_run_is_the_same_run(corpus: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _trainer(corpus, "batch.micro=4")  # two micro-batches a step
    outs = _steps(fast, STEPS)
    assert fast.prefetcher.enabled and fast.prefetcher._pool is not None, "the token windows were gathered in the background"
    monkeypatch.setattr(Prefetcher, "request", lambda self, ids, sizes: None)  # every step gathers its own batch
    plain = _trainer(corpus, "batch.micro=4")
    plain_outs = _steps(plain, STEPS)
    assert [o["loss"] for o in outs] == [o["loss"] for o in plain_outs]
    for a, b in zip(fast.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(o["data_wait"] >= 0 for o in outs)
    fast.close()


def test_a_missed_guess_is_gathered_in_the_step_and_errors_surface() -> None:
    windows = TokenWindows(np.arange(1000, dtype=np.uint16), context=4)
    p = Prefetcher(windows)
    p.request(np.array([1, 2]), [2])
    (batch,), _ = p.take(np.array([7, 9]), [2])  # other ids than those requested
    assert batch[0].tolist() == windows.gather(np.array([7, 9]))[0].tolist()

    class Broken(TokenWindows):
        def gather(self, idx: np.ndarray) -> Any:
            raise ValueError("a bad row")

    q = Prefetcher(Broken(np.arange(100, dtype=np.uint16), context=4))
    q.request(np.array([1]), [1])
    with pytest.raises(ValueError, match="a bad row"):
        q.take(np.array([1]), [1])
    p.close()
    q.close()


def test_a_users_dataset_is_never_gathered_off_the_main_thread() -> None:
    import threading

    threads = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> torch.Tensor:
            threads.append(threading.current_thread())
            return torch.tensor(i)

    p = Prefetcher(DatasetSamples(Recording()))
    p.request(np.array([1, 2]), [2])
    (batch,), _ = p.take(np.array([1, 2]), [2])
    assert batch.tolist() == [1, 2] and set(threads) == {threading.main_thread()}


# ---- host memory --------------------------------------------------------------------------------

_FAULTS = textwrap.dedent(
    """
    import ctypes, resource, sys
    from regimen.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def step():
        # 80 MiB in ten buffers of 8 MiB, written, then freed last first, as a backward pass frees
        # activations: each free merges into the top of the heap, where a trim hands pages back.
        bufs = [libc.malloc(8 << 20) for _ in range(10)]
        for b in bufs:
            ctypes.memset(b, 1, 8 << 20)
        for b in reversed(bufs):
            libc.free(b)
    for _ in range(3):
        step()
    before = faults()
    for _ in range(20):
        step()
    print((faults() - before) / 20)
    """
)


def _faults_per_step(mode: str) -> float:
    # glibc's thresholds fixed at their starting values (128 KiB): every 8 MiB buffer is mapped and unmapped.
    env = {"PATH": "/usr/bin:/bin", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"}
    proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what keep_freed_memory tunes")
def test_kept_memory_is_reused_without_page_faults() -> None:
    from regimen.host_memory import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc")
    default, kept = _faults_per_step("default"), _faults_per_step("keep")
    assert default > 10_000, f"mapped and unmapped, the buffers must be faulted in again every step ({default:.0f} faults)"
    assert kept < 10, f"{kept:.0f} page faults per step with the memory kept"
