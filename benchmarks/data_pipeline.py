"""Input pipeline alone against the GPT's consumption: how many batches per second the data path
delivers, as a multiple of how many the default GPT consumes.

The data path is exactly what `Trainer.train_step` runs per micro-batch: `SampleOrder.take`
for the next B positions of the sample order, then `TokenWindows.gather` of those windows into
(x, y) int64 tensors. It is timed for the `stdlib` source (bytes in memory) and for `tokens:`
(a uint16 nanoGPT `.bin`, memory-mapped: the stdlib bytes written as uint16 to a temporary file,
so the same model consumes both). The consumption rate is steps per second of
`Trainer.train_step` on the default strategy (`regimen train` with no arguments: the 4 x 128
GPT, batch 32, context 64, AdamW). The target is a ratio of at least 20: the input pipeline
then costs under 5% of a step even run synchronously, as regimen runs it.

    python -m benchmarks --only data_pipeline [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Table, cli, rerun_command, set_threads

TARGET = 20.0


def pipeline_rate(data: Any, batch: int, seed: int, n_batches: int, repeats: int) -> float:
    """Median batches/s of take + gather over `n_batches` consecutive batches."""
    from regimen.data import SampleOrder

    rates = []
    for r in range(repeats):
        order = SampleOrder(len(data.train), seed + r)  # a fresh order: the permutation is part of the cost
        start = time.perf_counter()
        for i in range(n_batches):
            data.train.gather(order.take(i * batch, batch))
        rates.append(n_batches / (time.perf_counter() - start))
    return statistics.median(rates)


def consumption_rate(steps: int, repeats: int) -> tuple[float, int, int]:
    """Median steps/s of `Trainer.train_step` on the default strategy; (rate, batch, context)."""
    from regimen.strategy import Strategy
    from regimen.task import build_task
    from regimen.trainer import Trainer

    strategy = Strategy.load(None, ["observe.progress=none", "train.device=cpu"]).resolve()
    trainer = Trainer(strategy, build_task(strategy))
    trainer.model.train()
    for _ in range(2):  # warm-up: allocator, optimizer state
        trainer.train_step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates), strategy.batch.size, strategy.model.context


def run(quick: bool) -> list[Table]:
    """Both sources' pipeline rates against the default GPT's step rate."""
    import numpy as np

    from regimen.data import load_source, stdlib_corpus
    from regimen.strategy import DataConfig

    set_threads()
    steps, repeats, n_batches = (5, 3, 200) if quick else (20, 5, 2000)
    consume, batch, context = consumption_rate(steps, repeats)
    rows: list[list[Any]] = [["GPT train_step (default strategy)", consume, 1.0]]
    with tempfile.TemporaryDirectory() as tmp:
        bin_path = Path(tmp) / "stdlib.bin"
        train, _, _ = stdlib_corpus(DataConfig().val_fraction)
        train.astype(np.uint16).tofile(bin_path)
        for label, source in (("stdlib (bytes in memory)", "stdlib"), ("tokens: (uint16 .bin, memory-mapped)", f"tokens:{bin_path}")):
            data = load_source(DataConfig(source=source), context)
            rate = pipeline_rate(data, batch, seed=0, n_batches=n_batches, repeats=repeats)
            rows.append([label, rate, rate / consume])
            del data  # release the memmap before the directory goes
    worst = min(r[2] for r in rows[1:])
    notes = [
        f"Batch {batch} x context {context} (the default strategy); pipeline: median of {repeats} runs of {n_batches} "
        f"batches (SampleOrder.take + TokenWindows.gather); GPT: median of {repeats} runs of {steps} train_step calls.",
        f"Lowest ratio {worst:.0f} (target >= {TARGET:.0f}): " + ("met." if worst >= TARGET else "**not met**."),
    ]
    return [
        Table(
            "Input pipeline against the GPT's consumption",
            ["what", "batches/s", "x GPT consumption"],
            rows,
            rerun_command("data_pipeline", quick),
            notes,
            {"batches/s": ".1f", "x GPT consumption": ".0f"},
        )
    ]


if __name__ == "__main__":
    cli(run, __doc__)
