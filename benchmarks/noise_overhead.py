"""Cost of measuring the gradient noise scale: training tokens/s with `observe.noise_scale` on and off.

Both trainers live in one process and take turns: each repeat times a block of steps with the
estimator off and a block with it on (alternating which goes first, so a drift in machine load
hits both equally), and the table reports the median tokens/s of each and the median of the
paired per-repeat overheads (time on / time off - 1). The target is an overhead of at most 5%.

Two ways of measuring, the two single-process paths of `Trainer.train_step`:

- micro = None: one micro-batch per step, so the small-batch gradient is the previous step's
  (`ConsecutiveGradients`: the dot product of this and the kept gradient, kept by reference;
  |g|^2 is the non-finite guard's norm, computed anyway).
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
from regimen.noise import ConsecutiveGradients, NoiseScaleEstimator, grad_sqnorm
from regimen.strategy import Strategy
from regimen.task import build_task
from regimen.trainer import Trainer, _to_device

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


def run_steps(trainer: Trainer, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for `steps` steps as `fit` runs them.

    No logging, evaluation or checkpoints: those cost the same either way.
    """
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = trainer.train_step()
        trainer.progress = trainer.progress.advanced(out["batch_size"], trainer.data.tokens_per_sample)
        # fit feeds the batch schedule the noise scale after every step: part of the cost.
        trainer.batch_schedule.observe(trainer.progress, trainer.noise.noise_scale if trainer.noise else None)
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def estimator_ms(trainer: Trainer, batch: int, micro: int | None, iters: int) -> float:
    """The estimator's own work per step, in ms, timed alone on the trainer's real gradients.

    What `train_step` and `fit` add when the estimator is on: the consecutive pair (a dot
    product of two gradients; |g|^2 is the guard's), or one extra norm after the first micro-batch; then the
    update of the averages and the read of B_noise that `fit` does after every step. A short
    loop of pure estimator work is far less exposed to a busy machine than a whole run.
    """
    ids = trainer.order.take(0, micro or batch)
    loss, _, _ = trainer.task.forward(_to_device(trainer.data.train.gather(ids), trainer.device), trainer.wrapped)
    loss.backward()
    params, est = trainer.params, NoiseScaleEstimator()
    pairs = ConsecutiveGradients()
    sqnorm = grad_sqnorm(params)  # the trainer passes the non-finite guard's norm, squared
    pairs.pair(params, batch, sqnorm=sqnorm)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            if micro is None:
                pair = pairs.pair(params, batch, sqnorm=sqnorm)
                assert pair is not None
                est.update(*pair)
            else:
                small = grad_sqnorm(params) * (batch / micro) ** 2
                est.update(small, micro, 1.0, batch)  # the big norm is clipping's, computed anyway
            _ = est.noise_scale  # fit reads it after every step (adaptive batch)
        sync()
        times.append((time.perf_counter() - start) / iters)
    trainer.optimizer.zero_grad(set_to_none=True)
    return 1000 * min(times)  # the least disturbed block: this is a cost, not a throughput


def measure(batch: int, micro: int | None, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Alternate blocks of `steps` steps off / on; medians of tokens/s and of the paired overhead."""
    trainers = {False: make_trainer(False, batch, micro), True: make_trainer(True, batch, micro)}
    for t in trainers.values():
        run_steps(t, warmup)  # allocations, the consecutive-gradient buffer, caches
    tokens = steps * batch * trainers[False].data.tokens_per_sample
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for noise in (False, True) if r % 2 == 0 else (True, False):
            w, c = run_steps(trainers[noise], steps)
            wall[noise].append(w)
            cpu[noise].append(c)
    on = trainers[True]
    assert on.noise is not None and on.noise.num_updates > 0, "the estimator was not fed"
    own = estimator_ms(on, batch, micro, iters=max(20, 10 * steps))
    return {
        "estimator_ms": own,
        "step_ms": 1000 * statistics.median(wall[False]) / steps,
        "micro": micro,
        "off": tokens / statistics.median(wall[False]),
        "on": tokens / statistics.median(wall[True]),
        "overhead": statistics.median(b / a - 1 for a, b in zip(wall[False], wall[True])),
        # CPU time counts only this process's work: on a shared machine it is far less noisy
        # than wall time (on a GPU it misses the device's work, so read the wall column there).
        "cpu_overhead": statistics.median(b / a - 1 for a, b in zip(cpu[False], cpu[True])),
        "noise_scale": on.noise.noise_scale,
        "params": count_parameters(on.model),
    }


def table(rows: list[dict[str, Any]], batch: int) -> str:
    """The results as a markdown table."""
    lines = [
        "| small batch of the estimate | tokens/s off | tokens/s on | end-to-end overhead: wall / CPU time "
        "| estimator's own time per step | share of a step | <= 5% |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in rows:
        how = (
            "previous step (consecutive pair), micro = none"
            if r["micro"] is None
            else f"first micro-batch, micro = {r['micro']} of {batch}"
        )
        share = r["estimator_ms"] / r["step_ms"]
        ok = "yes" if share <= TARGET else "NO"
        lines.append(
            f"| {how} | {r['off']:,.0f} | {r['on']:,.0f} | {100 * r['overhead']:+.1f}% / {100 * r['cpu_overhead']:+.1f}% "
            f"| {r['estimator_ms']:.2f} ms of {r['step_ms']:.0f} ms | {100 * share:.1f}% | {ok} |"
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
    print(
        "end-to-end overhead = median over repeats of (time on / time off - 1), each repeat an adjacent off/on pair; "
        "on a busy machine its spread is several percent either way. The estimator's own time (its work alone, "
        "timed in a tight loop on real gradients) over the step time is the overhead the 5% target is judged on."
    )
    for r in rows:
        if r["noise_scale"] is not None:
            print(f"B_noise after the run, micro = {r['micro'] or 'none'}: {r['noise_scale']:.1f} samples")
    print(f"command: {command}")


def make_device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
