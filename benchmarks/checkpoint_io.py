"""Checkpoint I/O: save and load time of a GPT of about 20M parameters, and the training time
lost to saving at a cadence.

The model is the built-in GPT with 6 layers, width 512, context 128 and a byte vocabulary
(19M parameters), trained with AdamW (so a checkpoint holds three copies of the weights:
parameters, exp_avg, exp_avg_sq), batch 8. A checkpoint is what `regimen train` writes: DCP
shards into a temporary directory, the RNG and training state, every file fsynced, `COMPLETE`,
then the rename into place. The baseline is the plain PyTorch way with the same durability:
`torch.save({"model": ..., "optim": ...})` to one file, then fsync; loading is
`torch.load(weights_only=True)` and the two `load_state_dict` calls. Each time is the median of
several repeats, in a fresh directory under the system's temporary directory (`--dir` for
another disk: the disk decides most of it).

regimen saves in two ways: synchronously (`checkpoint.async_save = false`, the default on CPU:
the step loop waits for the whole save) and in the background (`true`, the default on CUDA): the step loop pays for the small files
and a copy of the tensors (DCP's staging), and a thread writes, checksums, fsyncs and renames
while training goes on. Both are timed, interleaved (one of each per repeat): the background
save's part in the step loop (`save()` returning) and its whole write (until the checkpoint is
published), against the synchronous save.

The share of training time lost to saving is `cost / (interval + cost)`, with the interval a
cadence in steps times the measured CPU step time and the cost the step loop's part of a save
(a GPU step is far shorter, so there the share is larger: read the `every_minutes` rows, which
do not depend on the step). regimen's default cadence is `checkpoint.every = 0`: one save, at
the end of the run.

    python -m benchmarks --only checkpoint_io [--quick]
    python -m benchmarks.checkpoint_io [--quick] [--dir PATH]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Table, cli, median_time, rerun_command
from regimen.models import count_parameters
from regimen.strategy import Strategy
from regimen.task import build_task
from regimen.trainer import Trainer

SHAPE = ["model.n_layer=6", "model.n_head=8", "model.d_model=512", "model.context=128", "batch.size=8"]
BASE_DIR: str | None = None  # --dir: where the checkpoints are written (default: the system temp dir)


@contextmanager
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="regimen-ckpt-bench-", dir=BASE_DIR))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_trainer(root: Path, run_dir: Path | None) -> Trainer:
    """The benchmark's trainer; the data are random bytes (only the step's cost matters here)."""
    data = root / "bytes.bin"
    if not data.exists():
        data.write_bytes(np.random.default_rng(0).integers(0, 256, 2_000_000, dtype=np.uint8).tobytes())
    s = Strategy.load(None, [*SHAPE, f"data.source=text:{data}", "observe.progress=none", "observe.report=false"])
    return Trainer(s, build_task(s.resolve()), run_dir)


def step_time(trainer: Trainer, steps: int) -> float:
    """Median seconds of one training step (after one untimed step that allocates the state)."""

    def step() -> None:
        out = trainer.train_step()
        trainer.progress = trainer.progress.advanced(out["batch_size"], trainer.data.tokens_per_sample)

    return median_time(step, steps)  # its one warm-up step allocates the optimizer state


def torch_save(trainer: Trainer, path: Path) -> None:
    """The baseline: one torch.save of model and optimizer, fsynced like regimen's save."""
    torch.save({"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict()}, path)
    with path.open("rb") as f:
        os.fsync(f.fileno())


def torch_load(trainer: Trainer, path: Path) -> None:
    state = torch.load(path, weights_only=True)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optim"])


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def run(quick: bool) -> list[Table]:
    """Measure save, load and step time; return the two tables."""
    repeats, steps = (1, 1) if quick else (3, 6)
    with scratch() as root:
        trainer = make_trainer(root, root / "run")
        params = count_parameters(trainer.model)
        step = step_time(trainer, steps)
        saved: list[Path] = []
        ckpt = trainer.checkpointer

        def save(background: bool) -> float:
            """Seconds until `save()` returns (the step loop's part); the whole write is published before this returns."""
            ckpt.background = background
            trainer.progress = trainer.progress.advanced(8, 128)  # a new step: a new checkpoint
            start = time.perf_counter()
            saved.append(trainer.save())
            returned = time.perf_counter() - start
            ckpt.wait()
            return returned

        save(False)  # untimed: creates the directories
        sync_times, loop_part, whole = [], [], []
        for _ in range(repeats):  # interleaved: one synchronous and one background save each
            start = time.perf_counter()
            save(False)
            sync_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            loop_part.append(save(True))
            whole.append(time.perf_counter() - start)
        regimen_save, async_part, async_whole = (statistics.median(t) for t in (sync_times, loop_part, whole))
        checkpoint = saved[-1]
        baseline_file = root / "baseline.pt"
        baseline_save = median_time(lambda: torch_save(trainer, baseline_file), repeats, warmup=0)

        fresh = make_trainer(root, None)
        fresh.train_step()  # both loads restore into an optimizer whose state already exists
        regimen_load = median_time(lambda: fresh.checkpointer.load(checkpoint), repeats, warmup=0)
        baseline_load = median_time(lambda: torch_load(fresh, baseline_file), repeats, warmup=0)
        mb, baseline_mb = size_mb(checkpoint), size_mb(baseline_file)

    io = Table(
        title=f"Checkpoint save and load: GPT {params / 1e6:.1f}M parameters + AdamW state",
        columns=["operation", "regimen s", "torch.save/load s", "x torch", "MB", "regimen MB/s"],
        rows=[
            ["save, synchronous (atomic, fsynced)", regimen_save, baseline_save, regimen_save / baseline_save, mb, mb / regimen_save],
            ["save in the background: the step loop's part", async_part, baseline_save, async_part / baseline_save, mb, None],
            ["save in the background: until published", async_whole, baseline_save, async_whole / baseline_save, mb, mb / async_whole],
            ["load (weights_only)", regimen_load, baseline_load, regimen_load / baseline_load, mb, mb / regimen_load],
        ],
        command=rerun_command("checkpoint_io", quick),
        notes=[
            "regimen: `torch.distributed.checkpoint` into `.tmp-step-N`, RNG and training state, fsync of every file, "
            "`COMPLETE`, rename; load checks every unpickled byte (restricted metadata unpickler, weights-only items).",
            f"torch: one `torch.save` file of both state dicts ({baseline_mb:.0f} MB), fsynced; "
            "`torch.load(weights_only=True)` + `load_state_dict`.",
            f"In the background, the step loop's part is {async_part / regimen_save:.2f} of a synchronous save "
            "(target: below 1, a save costs the step loop less than the write takes).",
            f"median of {repeats} repeat(s), the two kinds of save interleaved; written under {BASE_DIR or tempfile.gettempdir()}.",
        ],
        fmt={"regimen s": ".3f", "torch.save/load s": ".3f", "x torch": ".2f", "MB": ".0f", "regimen MB/s": ".0f"},
    )
    cadences: list[tuple[str, float]] = [
        ("every = 100 steps", 100 * step),
        ("every = 1000 steps", 1000 * step),
        ("every_minutes = 1", 60.0),
        ("every_minutes = 10", 600.0),
        ("default (every = 0): once, at the end of a 10000-step run", 10000 * step),
    ]
    lost = Table(
        title="Training time lost to saving",
        columns=["cadence", "training between saves s", "share lost %, synchronous", "share lost %, background"],
        rows=[
            [name, interval, 100 * regimen_save / (interval + regimen_save), 100 * async_part / (interval + async_part)]
            for name, interval in cadences
        ],
        command=rerun_command("checkpoint_io", quick),
        notes=[
            f"measured step: {step:.3f} s (batch 8 x context 128, {torch.get_num_threads()} CPU threads, median of {steps}); "
            f"synchronous save {regimen_save:.3f} s; background save, the step loop's part {async_part:.3f} s (the write "
            "itself then shares the CPU with training: `benchmarks.feature_cost` measures what that costs the steps).",
        ],
        fmt={"training between saves s": ".1f", "share lost %, synchronous": ".2f", "share lost %, background": ".2f"},
    )
    return [io, lost]


def main() -> None:
    """`python -m benchmarks.checkpoint_io [--quick] [--dir PATH]`."""
    global BASE_DIR
    if "--dir" in sys.argv:  # cli() knows --quick and --threads; --dir is this benchmark's own
        i = sys.argv.index("--dir")
        BASE_DIR = sys.argv[i + 1]
        del sys.argv[i : i + 2]
    cli(run, __doc__)


if __name__ == "__main__":
    main()
