"""Cost of measuring the gradient noise scale: training tokens/s with `observe.noise_scale` on and off.

Both trainers live in one process and take turns: each repeat times a block of steps with the
estimator off and a block with it on (alternating which goes first, so a drift in machine load
hits both equally), and the table reports the median tokens/s of each and the median of the
paired per-repeat overheads (time on / time off - 1). The target is an overhead of at most 5%.

Two ways of measuring, the two single-process paths of `Trainer.train_step`:

- micro = None: one micro-batch per step, so the small-batch gradient is the previous step's
  (`ConsecutiveGradients`: one gradient-sized copy and two foreach norms per step).
- micro = B / 4: four micro-batches, the small batch is the first one (one foreach norm after
  its backward).

A timed step is the step as `Trainer.fit` runs it (train_step, advance the counters, feed the
batch schedule the noise scale), without logging, evaluation or checkpoints. The model is the
GPT of examples/batch_*.toml (2 layers, d_model 64, context 64): a small model is the worst
case, since the estimator's cost grows with the parameters and the step's with parameters x tokens.

Threads: `--threads 1` by default. On a shared 2-core machine a second intra-op thread
oversubscribes the cores and makes every number noisy; one thread measures the work itself.

    .venv/bin/python benchmarks/noise_overhead.py            # about 2-3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/noise_overhead.py --quick    # fewer repeats (noisier)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from regimen.models import count_parameters
from regimen.strategy import Strategy
from regimen.task import build_task
from regimen.trainer import Trainer

MODEL = ["model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.context=64"]
TARGET = 0.05  # the issue's bound on the overhead


def make_trainer(noise: bool, batch: int, micro: int | None) -> Trainer:
    """A trainer for the built-in GPT with the noise-scale estimator on or off."""
    overrides = [
        *MODEL,
        f"batch.size={batch}",
        f"batch.micro={micro if micro is not None else 'none'}",
        f"observe.noise_scale={'true' if noise else 'false'}",
        "observe.progress=none",
        "lr.schedule=constant",
        "train.steps=1000000",
    ]
    strategy = Strategy.load(None, overrides).resolve()
    return Trainer(strategy, build_task(strategy))


def run_steps(trainer: Trainer, steps: int) -> float:
    """Seconds for `steps` steps as `fit` runs them (without logging, eval and checkpoints)."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        out = trainer.train_step()
        trainer.progress = trainer.progress.advanced(out["batch_size"], trainer.data.tokens_per_sample)
        # fit feeds the batch schedule the noise scale after every step: part of the cost.
        trainer.batch_schedule.observe(trainer.progress, trainer.noise.noise_scale if trainer.noise else None)
    sync()
    return time.perf_counter() - start


def measure(batch: int, micro: int | None, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Alternate blocks of `steps` steps off / on; medians of tokens/s and of the paired overhead."""
    trainers = {False: make_trainer(False, batch, micro), True: make_trainer(True, batch, micro)}
    for t in trainers.values():
        run_steps(t, warmup)  # allocations, the consecutive-gradient buffer, caches
    tokens = steps * batch * trainers[False].data.tokens_per_sample
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for noise in (False, True) if r % 2 == 0 else (True, False):
            seconds[noise].append(run_steps(trainers[noise], steps))
    on = trainers[True]
    assert on.noise is not None and on.noise.num_updates > 0, "the estimator was not fed"
    return {
        "micro": micro,
        "off": tokens / statistics.median(seconds[False]),
        "on": tokens / statistics.median(seconds[True]),
        "overhead": statistics.median(b / a - 1 for a, b in zip(seconds[False], seconds[True])),
        "noise_scale": on.noise.noise_scale,
        "params": count_parameters(on.model),
    }


def table(rows: list[dict[str, Any]], batch: int) -> str:
    """The results as a markdown table."""
    lines = [
        "| small batch of the estimate | micro | tokens/s off | tokens/s on | overhead (median of pairs) | <= 5% | B_noise at the end |",
        "| --- | ---: | ---: | ---: | ---: | :---: | ---: |",
    ]
    for r in rows:
        how = "previous step (consecutive pair)" if r["micro"] is None else f"first micro-batch ({r['micro']} of {batch})"
        ok = "yes" if r["overhead"] <= TARGET else "NO"
        ns = f"{r['noise_scale']:.0f}" if r["noise_scale"] is not None else "-"
        lines.append(
            f"| {how} | {r['micro'] or '-'} | {r['off']:,.0f} | {r['on']:,.0f} | {100 * r['overhead']:+.1f}% | {ok} | {ns} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the arguments, measure both estimator paths, print the table and the command."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter repeats (a smoke test; noisier numbers)")
    parser.add_argument("--batch", type=int, default=32, help="global batch in samples (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see the module docstring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, repeats, warmup = (4, 3, 2) if args.quick else (8, 9, 3)
    rows = [measure(args.batch, micro, steps, repeats, warmup) for micro in (None, args.batch // 4)]
    command = "python benchmarks/noise_overhead.py" + (" --quick" if args.quick else "")
    print(
        f"GPT n_layer=2 d_model=64 context=64 ({rows[0]['params'] / 1e6:.2f}M parameters), batch {args.batch}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {make_device_name()}; "
        f"{repeats} alternating repeats of {steps} steps after {warmup} warmup steps"
    )
    print()
    print(table(rows, args.batch))
    print()
    print(f"command: {command}")


def make_device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
