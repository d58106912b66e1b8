"""The fit loop: one step, top to bottom, readable in one sitting.

```
B      = batch_schedule(progress)            # global batch, in samples
lr     = lr_schedule(progress) * scale(B)    # scaling rule vs the reference batch
split B over world_size ranks, then into micro-batches of at most `micro` on each rank
(the next step's micro-batches are gathered in the background meanwhile: regimen.prefetch)
for each micro-batch: loss * (b_i / B) * world_size -> backward (no gradient sync but the last)
(noise-scale statistics from the micro-batch and global gradient norms, where enabled)
gradient norm (the non-finite guard) -> clip if above train.clip -> optimizer.step() -> zero_grad
progress += (1 step, B samples, B*T tokens); log / eval / checkpoint on their cadence
```

The gradient is the mean over the global batch however it is split: DDP averages over ranks,
so each rank's micro-batch loss is weighted by `b_i / B * world_size`.

Host synchronisation: one per step. The loss, the gradient norm and the small-batch gradient
norm travel in one all-reduced vector that is read on the host, because a non-finite step
must be skipped on every rank together (DESIGN, "Bad input and faults"). On a CPU that read is
free; on CUDA it is one sync at the end of the backward pass. Clipping uses it: the gradients
are multiplied only when their norm is above the limit (bit for bit torch's clip_grad_norm_).

Checkpoints are written in the background where `checkpoint.async_save` says (by default on CUDA); the loop polls
the save in flight once per step, and waits for it before a rollback and at the end.

Example:
    >>> from regimen.strategy import Strategy
    >>> s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "train.steps=3", "observe.progress=none"])
    >>> result = Trainer(s, build_task(s.resolve())).fit()
    >>> result.progress.step
    3
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regimen import host_memory, interrupts, parallel, rundir
from regimen.checkpoint import Checkpointer, ModelState, RNGState, export_safetensors
from regimen.data import SampleOrder, micro_sizes, split_evenly
from regimen.errors import UserError
from regimen.noise import ConsecutiveGradients, NoiseScaleEstimator, grad_sqnorm
from regimen.observe import ProgressDisplay, Sink, Status, check_loggers, open_sinks
from regimen.optim import build_optimizer, set_train_mode
from regimen.prefetch import Prefetcher
from regimen.progress import Progress, Unit
from regimen.schedules import Schedule, budget_reached, build_batch_schedule, build_lr_multiplier, lr_batch_scale, simulate_budget
from regimen.strategy import Strategy
from regimen.task import Task, build_task, loss_unit
from regimen.tokens import write_run_codec

Callback = Callable[[dict[str, Any]], None]
# Validation samples per forward when no micro-batch is set: evaluation keeps no activations
# for a backward pass, so a chunk this size costs a fraction of a training micro-batch.
EVAL_CHUNK = 64
# Called after every optimizer step that was taken (not a skipped one) with the trainer and the
# step's output (`train_step`'s dict: loss, lr, batch_size, grad_norm): the one place for per-step
# code that is not the step itself (timing, probes, custom logging). Runs on every rank.
StepHook = Callable[["Trainer", dict[str, Any]], None]


class StopTraining(Exception):  # a signal, not an error: Keras's `stop_training`
    """Raised by a callback to end the run after the step whose row it was given.

    The run then ends as a finished one does (on every rank): the final checkpoint, the export
    and the summary, which records `stopped_early` with the step and the message. The other
    callbacks still get that row.

    Example:
        >>> def stop_at_2(row):
        ...     if row["step"] >= 2:
        ...         raise StopTraining("enough")
        >>> from regimen.strategy import Strategy
        >>> s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "train.log_every=1", "observe.progress=none"])
        >>> Trainer(s, build_task(s.resolve()), callbacks=[stop_at_2]).fit().summary["stopped_early"]
        {'step': 2, 'reason': 'enough'}
    """


@dataclass
class RunResult:
    """What `Trainer.fit` returns: the final progress, the last metrics and the summary."""

    progress: Progress
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None


@dataclass
class TrainingState:
    """The counters a checkpoint holds besides model, optimizer, schedules, estimator and RNG.

    Example:
        >>> state = TrainingState(progress=Progress(step=3, samples=96))
        >>> restored = TrainingState(); restored.load_state_dict(state.state_dict()); restored.progress.step
        3
    """

    progress: Progress = field(default_factory=Progress)
    elapsed: float = 0.0  # seconds of training, evaluation included, over every attempt
    eval_time: float = 0.0  # of `elapsed`, the seconds spent evaluating
    lr_factor: float = 1.0  # lowered by rollbacks after non-finite steps
    rollbacks: int = 0
    data_offset: int = 0  # samples skipped by rollbacks: the stream reads samples + offset
    window: list[float] = field(default_factory=list)  # train losses since the last logged row
    events: list[dict[str, Any]] = field(default_factory=list)  # skips and rollbacks, for the summary

    def state_dict(self) -> dict[str, Any]:
        p = self.progress
        return {
            "progress": {"step": p.step, "samples": p.samples, "tokens": p.tokens},
            "elapsed": self.elapsed,
            "eval_time": self.eval_time,
            "lr_factor": self.lr_factor,
            "rollbacks": self.rollbacks,
            "data_offset": self.data_offset,
            "window": list(self.window),
            "events": list(self.events),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; a missing or mistyped key raises before anything changes."""
        p = state["progress"]
        counts = [p["step"], p["samples"], p["tokens"], state["rollbacks"], state["data_offset"]]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            raise ValueError(f"counters must be non-negative integers, got {counts}")
        numbers = [state["elapsed"], state.get("eval_time", 0.0), state["lr_factor"], *state["window"]]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            raise ValueError("elapsed, eval_time, lr_factor and window must be numbers")
        if not isinstance(state["events"], list) or not all(isinstance(e, dict) for e in state["events"]):
            raise ValueError("events must be a list of objects")
        self.progress = Progress(p["step"], p["samples"], p["tokens"])
        self.elapsed, self.eval_time = float(state["elapsed"]), float(state.get("eval_time", 0.0))
        self.lr_factor, self.rollbacks, self.data_offset = float(state["lr_factor"]), state["rollbacks"], state["data_offset"]
        self.window, self.events = [float(v) for v in state["window"]], list(state["events"])


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: the CUDA device of this rank when there is one, else the CPU; a device this machine lacks is a `UserError`.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device = {name!r}: this machine has no CUDA device (allowed here: auto, cpu)")
        index = local_rank if name == "cuda" else int(name.partition(":")[2])
        if index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UserError(f"train.device = {name!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        return torch.device("cuda", index)
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("train.device = 'mps': this machine has no Apple GPU (allowed here: auto, cpu)")
    return torch.device(name)


def clip_ratio(norm: float, max_norm: float) -> float:
    """`max_norm / (norm + 1e-6)`: torch's `clip_grad_norm_` multiplies by its minimum with 1.

    >>> clip_ratio(3.0, 1.5)
    0.4999998333333889
    """
    return max_norm / (norm + 1e-6)


def clips(norm: float, max_norm: float) -> bool:
    """Whether gradient clipping at `max_norm` (0: off) changes gradients of global norm `norm`.

    torch's `clip_grad_norm_` multiplies by `min(clip_ratio, 1)` in float32; under the limit
    (with a margin for that float32 rounding) the factor is exactly 1 and the multiply changes
    nothing, so the trainer skips it: the gradients are bitwise those torch would leave.

    >>> clips(0.5, 1.0), clips(2.0, 1.0), clips(2.0, 0.0)
    (False, True, False)
    """
    return max_norm > 0 and clip_ratio(norm, max_norm) < 1.0 + 1e-5


def _out_of_memory(e: BaseException) -> bool:
    """Whether an exception is the allocator running out of memory (CUDA's, or the CPU's)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak resident set size of the process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Runs one strategy on one task, optionally recording into a run directory.

    `callbacks` receive every logged row (the dicts written to `metrics.jsonl`); one may raise
    `StopTraining` to end the run after that step. `hooks` (`StepHook`) run after every optimizer
    step. `end_of_run` holds functions called on rank 0 once the final checkpoint, export and
    summary are written and before the loggers close (the runner writes the report there, so the
    loggers keep it too). `lr_schedule` replaces the strategy's LR schedule: a multiplier of
    `optimizer.lr` as a function of progress in `lr.unit` (what `lr-find` sweeps). With a run
    directory, rank 0 holds its lock from here until `close()`.
    """

    def __init__(
        self,
        strategy: Strategy,
        task: Task,
        run_dir: str | Path | None = None,
        callbacks: list[Callback] | None = None,
        hooks: list[StepHook] | None = None,
        lr_schedule: Schedule | None = None,
    ) -> None:
        self.strategy = s = strategy.resolve()
        self.task = task
        self.callbacks = callbacks or []
        self.hooks = hooks or []
        self._interrupted: Callable[[], bool] = lambda: False  # set by `fit` (regimen.interrupts)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            check_loggers(s.observe)  # a missing logger package fails before anything is built or written
        self.end_of_run: list[Callable[[], None]] = []
        self.sinks: list[Sink] = []
        self.stopped: dict[str, Any] | None = None  # set when a callback ends the run early
        self.device = pick_device(s.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = parallel.Dist.from_env(self.device.type)
        self.is_main = self.dist.is_main
        assert task.data is not None, "the trainer needs the task's data"
        self.data = task.data
        self.model = task.model.to(self.device)
        self.mode = parallel.resolve_mode(s.parallel.mode, self.dist)
        if s.batch.micro == "auto":  # a number before anything below depends on it
            from regimen.micro import choose_micro

            self.strategy = s = choose_micro(s, task, self.mode, self.dist, self.device, self.run_dir)
        self.wrapped = parallel.wrap(self.model, self.mode, self.dist, self.device, s.parallel)
        if s.train.compile:
            self.wrapped = torch.compile(self.wrapped)  # type: ignore[assignment]
        self.optimizer = build_optimizer(self.model, s.optimizer)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.order = SampleOrder(len(self.data.train), s.train.seed)
        self.prefetcher = Prefetcher(self.data.train, pin=self.device.type == "cuda")
        # Every batch size is a multiple of micro x world, so each rank's share splits evenly.
        # (`full` rounds only to the world size: it should drop as few samples as it can.)
        self.multiple = self.dist.world_size * (1 if s.batch.schedule == "full" else (s.batch.micro_size or 1))
        self.batch_schedule = build_batch_schedule(s.batch, seed=s.train.seed, multiple=self.multiple, dataset_size=len(self.data.train))
        largest, n = self.batch_schedule.largest(), len(self.data.train)
        if largest > n:
            raise UserError(
                f"batch.size = {s.batch.size} ({s.batch.schedule}): the batch reaches {largest:,} samples, more than the training set "
                f"holds ({n:,}); lower it, or use batch.schedule = 'full' for the whole set each step"
            )
        unit, self.budget = s.train.budget()
        if unit == "epochs":
            unit, self.budget = "samples", self.budget * len(self.data.train)
        self.budget_unit: Unit = unit  # type: ignore[assignment]
        total = self.budget
        if s.lr.unit != self.budget_unit:
            total = simulate_budget(self.batch_schedule, self.budget_unit, self.budget, s.lr.unit, self.data.tokens_per_sample)
        self.lr_schedule = lr_schedule or build_lr_multiplier(s.lr, s.optimizer.lr, total)
        if self._measure_noise and self.mode == "fsdp":
            # FSDP2 shards gradients: the small-batch norm would need its own reduction.
            raise UserError("observe.noise_scale / batch.schedule = 'adaptive' are not supported with parallel.mode = 'fsdp' yet; use ddp")
        self.noise = NoiseScaleEstimator(s.observe.noise_ema) if self._measure_noise else None
        self.consecutive = ConsecutiveGradients() if self.noise is not None else None
        self.autocast_dtype = torch.bfloat16 if s.train.precision == "bf16" else None
        self.state = TrainingState()
        self.skips_in_row = 0
        torch.manual_seed(s.train.seed + 1000 * self.dist.rank)  # dropout differs per rank
        self.eval_ids = self._eval_positions()
        self.lock: rundir.RunLock | None = None
        if self.run_dir is not None and self.is_main:  # made only now, when strategy, data and model have been built
            rundir.check_location(self.run_dir)
            self.lock = rundir.RunLock(rundir.create(self.run_dir)).acquire()
        # Without a run directory it still loads a checkpoint given by path (and saves nothing).
        self.checkpointer = self._checkpointer(self.run_dir)

    def _checkpointer(self, run_dir: Path | None) -> Checkpointer:
        """Everything a checkpoint holds, by name (see regimen.checkpoint)."""
        ckpt = self.strategy.checkpoint
        background = ckpt.async_save if ckpt.async_save is not None else self.device.type == "cuda"
        c = Checkpointer(run_dir, keep=ckpt.keep, dist=self.dist, device=self.device, background=background)
        c.files["strategy.toml"] = self.strategy.to_toml
        c.add("model", ModelState(self.model, self.optimizer), "tensors")
        c.add("train", self.state, "json")
        c.add("batch_schedule", self.batch_schedule, "json")
        if self.noise is not None:
            c.add("noise", self.noise, "json")
        c.add("rng", RNGState(self.device), "rank", optional=True)  # a rank that did not exist keeps its own
        if self.consecutive is not None and not self.dist.enabled:
            c.add("noise_pair", self.consecutive, "rank", optional=True)
        return c

    @property
    def progress(self) -> Progress:
        """Optimizer steps, samples and tokens so far (`state.progress`)."""
        return self.state.progress

    @progress.setter
    def progress(self, value: Progress) -> None:
        self.state.progress = value

    def training_state(self) -> dict[str, Any]:
        """The counters and the stateful schedule and estimator, as plain JSON data."""
        return {
            "train": self.state.state_dict(),
            "batch_schedule": self.batch_schedule.state_dict(),
            "noise": self.noise.state_dict() if self.noise is not None else None,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["train"])
        self.batch_schedule.load_state_dict(state["batch_schedule"])
        if self.noise is not None and state.get("noise"):
            self.noise.load_state_dict(state["noise"])

    def close(self) -> None:
        """Stop the prefetch thread, finish a background save, release the run directory's lock (rank 0).

        `fit` calls it at the end, also when it fails (a background save whose write completes
        is then published, one that fails is removed); safe to call twice.
        """
        self.prefetcher.close()
        self.checkpointer.close()
        host_memory.release_freed_memory()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def _measure_noise(self) -> bool:
        return self.strategy.observe.noise_scale or self.strategy.batch.schedule == "adaptive"

    def _eval_positions(self) -> np.ndarray:
        val = self.data.val
        if val is None:
            return np.empty(0, dtype=np.int64)
        n = len(val) if self.strategy.train.eval_samples == 0 else min(self.strategy.train.eval_samples, len(val))
        n -= n % self.dist.world_size  # equal shares: every rank runs the same forwards
        # A fixed subset (seed 0, not the training seed): every strategy validates on the same samples.
        return SampleOrder(len(val), seed=0).take(0, n)

    # ---- one step ------------------------------------------------------------------------

    def lr_multiplier(self, batch: int) -> float:
        """The next step's LR as a multiple of the peak: schedule(progress) x batch-size scaling x rollback factor."""
        s = self.strategy
        assert s.lr.scale_with_batch != "auto", "resolved in Strategy.resolve"
        scale = lr_batch_scale(s.lr.scale_with_batch, batch, s.lr.reference_batch or batch)
        return self.lr_schedule(self.progress.value(s.lr.unit)) * scale * self.state.lr_factor

    def current_lr(self, batch: int) -> float:
        """The LR of the next step (`optimizer.lr` x `lr_multiplier`), as logged."""
        return self.strategy.optimizer.lr * self.lr_multiplier(batch)

    def _share(self, progress: Progress) -> tuple[int, np.ndarray, list[int]]:
        """The global batch at `progress`, this rank's samples of it, and their micro-batch sizes."""
        d = self.dist
        B = self.batch_schedule(progress)
        ids = self.order.take(progress.samples + self.state.data_offset, B)
        share = B // d.world_size
        return B, ids[d.rank * share : (d.rank + 1) * share], micro_sizes(share, self.strategy.batch.micro_size)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the next global batch; returns its loss, lr, batch, norms and data wait."""
        s, d = self.strategy, self.dist
        B, mine, sizes = self._share(self.progress)
        factor = self.lr_multiplier(B)
        lr = s.optimizer.lr * factor
        # Each group has its own peak (`initial_lr`: Muon's and AdamW's halves may differ); the
        # schedule is a multiplier of it, so groups keep their ratio at every step.
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        batches, data_wait = self.prefetcher.take(mine, sizes)
        # The next step's samples gather in the background while this one trains (regimen.prefetch:
        # a guess, checked against what the next step asks for).
        self.prefetcher.request(*self._share(self.progress.advanced(B, self.data.tokens_per_sample))[1:])
        # The small batch of the noise-scale estimate: the first micro-batch, else this rank's
        # share (all-reduced by hand below), else the previous step (single process, one micro).
        noise_small = self.noise is not None and (len(sizes) > 1 or d.enabled)
        manual_reduce = noise_small and len(sizes) == 1 and self.mode == "ddp"
        losses: list[torch.Tensor] = []  # b_i x micro-batch mean loss, summed after the loop
        small_sq: torch.Tensor | None = None
        for i, (b, batch) in enumerate(zip(sizes, batches)):
            last = i == len(sizes) - 1
            with parallel.grad_sync(self.wrapped, last and not manual_reduce), self._autocast():
                loss, _, _ = self.task.forward(_to_device(batch, self.device), self.wrapped)
            weight = b / B * d.world_size
            (loss if weight == 1.0 else loss * weight).backward()  # one micro-batch, one rank: no extra graph node
            losses.append(loss.detach().float() * b)
            if noise_small and i == 0:
                # grads now hold (b W / B) x the micro-batch mean gradient.
                small_sq = grad_sqnorm(self.params) * (B / (b * d.world_size)) ** 2
        grads = [p.grad for p in self.params if p.grad is not None]
        if manual_reduce:
            for g in grads:
                d.all_reduce_sum(g)
            torch._foreach_div_(grads, d.world_size)
        # The norm is the non-finite guard's price: one read pass over the gradients. Clipping's
        # multiply (a second pass) waits for the norm on the host below, and is skipped when the
        # norm is under the limit, where torch's clip_grad_norm_ multiplies by 1.0 to save a sync.
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # The consecutive-steps pair is taken before clipping (clipping would bias both norms) and
        # reuses the guard's norm, so it adds one read of this and the last gradient (a dot product).
        pair = None
        if self.consecutive is not None and not noise_small:
            pair = self.consecutive.pair(self.params, B, sqnorm=norm.square())
        if noise_small and self.consecutive is not None:
            self.consecutive.reset()  # measured with micro-batches: no later pair may reach back past this step
        # One vector, one all-reduce, one host read. A non-finite loss or norm on any rank makes
        # its sum non-finite on every rank, so all ranks skip together; the norm is the global
        # one on every rank, so its sum is world_size times it.
        parts = [*losses, parallel.full_tensor(norm).float()] + ([small_sq] if small_sq is not None else [])
        values = d.all_reduce_sum(torch.stack(parts).float()).tolist()  # the step's one host sync
        loss_value, norm_value = math.fsum(values[: len(losses)]), values[len(losses)] / d.world_size
        small_value = values[-1] if small_sq is not None else 0.0
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.consecutive is not None:
                self.consecutive.reset()  # no pair may straddle a skipped step
            return {"skipped": True, "loss": loss_value / B, "lr": lr, "batch_size": B, "data_wait": data_wait}
        if self.noise is not None:
            if noise_small:
                self.noise.update(small_value / d.world_size, sizes[0] if len(sizes) > 1 else sum(sizes), norm_value**2, B)
            elif pair is not None:
                self.noise.update(*pair)
        if clips(norm_value, s.train.clip):
            torch.nn.utils.clip_grads_with_norm_(self.params, s.train.clip, norm, foreach=True)
            if self.consecutive is not None:
                self.consecutive.scaled(min(clip_ratio(norm_value, s.train.clip), 1.0))  # what the multiply was
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"skipped": False, "loss": loss_value / B, "lr": lr, "batch_size": B, "grad_norm": norm_value, "data_wait": data_wait}

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()  # building a disabled torch.autocast costs ~20 us a step
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss (and metrics) over the fixed validation samples, all ranks."""
        if len(self.eval_ids) == 0 or self.data.val is None:
            return {}
        d = self.dist
        # FSDP2 must run the sharded module (its hooks gather parameters); DDP's module is
        # identical on every rank and needs no collective in forward.
        model = self.wrapped if self.mode == "fsdp" else parallel.unwrap(self.wrapped)
        was_training = model.training
        model.eval()
        set_train_mode(self.optimizer, False)
        shares = split_evenly(len(self.eval_ids), d.world_size)
        lo = sum(shares[: d.rank])
        mine = self.eval_ids[lo : lo + shares[d.rank]]
        chunk = self.strategy.batch.micro_size or EVAL_CHUNK
        names = list(self.task.metrics)
        totals = torch.zeros(1 + 2 * len(names), dtype=torch.float64, device=self.device)
        for start in range(0, len(mine), chunk):
            ids = mine[start : start + chunk]
            batch = _to_device(self.data.val.gather(ids), self.device)
            with self._autocast():
                loss, out, target = self.task.forward(batch, model)
            totals[0] += loss.double() * len(ids)
            for j, (value, count) in enumerate(self.task.measure(out, target).values()):
                totals[1 + 2 * j] += float(value)
                totals[2 + 2 * j] += count
        d.all_reduce_sum(totals)
        model.train(was_training)
        set_train_mode(self.optimizer, True)
        values = totals.tolist()
        result = {"val_loss": values[0] / len(self.eval_ids)}
        for j, name in enumerate(names):
            result[f"val_{name}"] = values[1 + 2 * j] / max(values[2 + 2 * j], 1)
        return result

    # ---- the outer loop ------------------------------------------------------------------

    def fit(self) -> RunResult:
        """Train until the budget is spent (or a callback stops it); log, evaluate and checkpoint on their cadence."""
        try:
            with interrupts.remembered() as self._interrupted:
                return self._fit()
        except BaseException as e:
            status: Status = "killed" if isinstance(e, KeyboardInterrupt) else "failed"
            for sink in self.sinks:
                sink.close(status=status)
            self.sinks = []
            raise
        finally:
            self.close()

    def _fit(self) -> RunResult:
        s, state = self.strategy, self.state
        writer = None
        history: list[dict[str, Any]] = []
        if self.is_main and self.run_dir is not None:
            writer, history = self._open_run_dir(self.run_dir)
            self.sinks = open_sinks(s, self.run_dir)
        # A language model on text writes a short sample after each evaluation (observe.samples).
        from regimen.sample import TrainingSamples

        samples = TrainingSamples.start(self)
        mode = s.observe.progress if self.is_main else "none"
        display = ProgressDisplay(self.budget, self.budget_unit, mode, initial=self.progress.value(self.budget_unit))
        last_log_time, last_log_tokens = time.perf_counter(), self.progress.tokens
        t0 = time.perf_counter() - state.elapsed
        last_save = time.perf_counter()
        self.wrapped.train()
        set_train_mode(self.optimizer, True)
        if self.device.type == "cpu":
            host_memory.keep_freed_memory()  # no page faults for the buffers each step frees and takes again
        while not budget_reached(self.progress, self.budget_unit, self.budget):
            if self._interrupted():  # a Ctrl-C whose KeyboardInterrupt something dropped (regimen.interrupts)
                raise KeyboardInterrupt
            self.checkpointer.poll()  # a save written in the background: published, or its failure raised
            out = self._step_or_explain()
            if out["skipped"]:
                if self._on_nonfinite(out, display):  # rolled back: forget the rows after the checkpoint
                    history = [r for r in history if r["step"] <= self.progress.step]
                    if writer:
                        writer.resume_from(self.progress.step)
                    last_log_tokens = self.progress.tokens
                continue
            self.skips_in_row = 0
            self.progress = self.progress.advanced(out["batch_size"], self.data.tokens_per_sample)
            state.window.append(out["loss"])
            wants = self.noise is not None and self.batch_schedule.wants_noise(self.progress)
            self.batch_schedule.observe(self.progress, self.noise.noise_scale if wants and self.noise else None)
            for hook in self.hooks:
                hook(self, out)
            done = budget_reached(self.progress, self.budget_unit, self.budget)
            step = self.progress.step
            evaluate = step % s.train.eval_every == 0 or done
            if step % s.train.log_every == 0 or evaluate:
                now = time.perf_counter()
                row = self._row(out, state.window, now - t0, (self.progress.tokens - last_log_tokens) / max(now - last_log_time, 1e-9))
                state.window, last_log_time, last_log_tokens = [], now, self.progress.tokens
                if evaluate:
                    row.update(self.evaluate())
                    if samples is not None:  # part of the evaluation: its time counts as eval time
                        samples(self, display)
                    last_log_time = time.perf_counter()  # evaluation time is not training throughput
                    state.eval_time += last_log_time - now
                    row["eval_time"] = round(state.eval_time, 4)
                history.append(row)
                if writer:
                    writer.write(row)
                for sink in self.sinks:
                    sink.write(row)
                stop = self._run_callbacks(row)
                display.update(self.progress.value(self.budget_unit), row)
                if evaluate and "val_loss" in row:
                    display.message(self._eval_line(row))
                if stop is not None:
                    self.stopped = {"step": self.progress.step, "reason": str(stop)}
                    display.message(f"step {step}: stopped early" + (f": {stop}" if str(stop) else ""))
                    break
            if self.run_dir is not None and not done and self._checkpoint_due(last_save):
                state.elapsed = time.perf_counter() - t0
                self.save()
                last_save = time.perf_counter()
        state.elapsed = time.perf_counter() - t0
        display.close()
        summary = rundir.summarize(history, self._facts())
        # Sources prepared with a tokenizer also report nats per byte of text (what compares across tokenizers).
        summary.update(self.data.loss_per_byte(summary["final_loss"], [r["val_loss"] for r in history if r.get("val_loss") is not None]))
        if self.run_dir is not None:
            self._save_final(self.run_dir)
        if writer and self.run_dir is not None:
            writer.close()
            rundir.write_summary(self.run_dir, summary)
            rundir.record_event(self.run_dir, "finished", step=self.progress.step)
        if self.is_main:
            for finish in self.end_of_run:
                finish()
        if self.sinks and self.run_dir is not None:
            run = self.run_dir
            artifacts = [
                run / rundir.WEIGHTS_FILE,
                run / rundir.SUMMARY_FILE,
                *sorted(run.glob("report*.html")),
                *sorted(run.glob("*.png")),
            ]
            for sink in self.sinks:
                sink.close([p for p in artifacts if p.is_file()])
            self.sinks = []
        return RunResult(self.progress, summary, history, self.run_dir)

    def _save_final(self, run_dir: Path) -> None:
        """The last checkpoint, on disk before the run ends (a finished run resumed has it already), and the weights."""
        self.checkpointer.wait()
        latest = self.checkpointer.latest()
        if latest is None or latest.name != f"step-{self.progress.step:08d}":
            self.save()
            self.checkpointer.wait()
        export_safetensors(self.model, self.optimizer, run_dir / rundir.WEIGHTS_FILE, self.dist, self.progress)

    def _step_or_explain(self) -> dict[str, Any]:
        """`train_step`, with running out of memory said in one line naming the key to lower."""
        try:
            return self.train_step()
        except (MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            micro = self.strategy.batch.micro
            now = f"batch.micro = {micro}" if micro else "batch.micro unset: the whole share of the batch at once"
            raise UserError(
                f"out of memory at step {self.progress.step + 1} (global batch {self.batch_schedule(self.progress)}, {now}); "
                "lower batch.micro (gradient accumulation keeps the batch), or batch.size"
            ) from None

    def _open_run_dir(self, run_dir: Path) -> tuple[rundir.MetricsWriter, list[dict[str, Any]]]:
        """Rank 0 at the start of `fit`: the strategy (once), the metrics writer, the history so far."""
        step = self.progress.step
        if not (run_dir / rundir.STRATEGY_FILE).is_file():  # the strategy the run started with: never rewritten
            rundir.write_atomic(run_dir / rundir.STRATEGY_FILE, self.strategy.to_toml())
        write_run_codec(run_dir, self.data.tokens_dir, self.data.tokens_meta)  # the run keeps its tokenizer (regimen sample)
        writer = rundir.MetricsWriter(run_dir / rundir.METRICS_FILE)
        if step > 0:
            writer.resume_from(step)  # the rows past the checkpoint are redone
        rundir.record_event(run_dir, "resume" if step > 0 else "start", step=step, pid=os.getpid(), world_size=self.dist.world_size)
        # The summary covers the whole run: the rows logged before a resume count too.
        return writer, rundir.read_metrics(run_dir / rundir.METRICS_FILE) if step > 0 else []

    def _run_callbacks(self, row: dict[str, Any]) -> StopTraining | None:
        """Give `row` to every callback; the first `StopTraining` raised, agreed on by every rank (rank 0 decides)."""
        stop: StopTraining | None = None
        for callback in self.callbacks:
            try:
                callback(row)
            except StopTraining as e:
                stop = stop or e
        if self.dist.enabled and self.callbacks:
            flag = torch.tensor([float(self.is_main and stop is not None)], device=self.device)
            agreed = self.dist.all_reduce_sum(flag).item() > 0
            stop = (stop or StopTraining("a callback on rank 0 stopped the run")) if agreed else None
        return stop

    def _checkpoint_due(self, last_save: float) -> bool:
        """Every `every` steps and/or `every_minutes`; rank 0's clock decides for all ranks."""
        c = self.strategy.checkpoint
        due = c.every > 0 and self.progress.step % c.every == 0
        if c.every_minutes > 0:
            late = float(due or time.perf_counter() - last_save >= 60 * c.every_minutes) if self.is_main else 0.0
            flag = torch.tensor([late], device=self.device)  # NCCL reduces only device tensors
            due = self.dist.all_reduce_sum(flag).item() > 0
        return due

    def save(self) -> Path:
        """Save a checkpoint of the whole training state into the run directory (every rank calls it)."""
        return self.checkpointer.save(self.progress.step)

    def _row(self, out: dict[str, Any], window: list[float], elapsed: float, tokens_per_s: float) -> dict[str, Any]:
        row = {
            "step": self.progress.step,
            "samples": self.progress.samples,
            "tokens": self.progress.tokens,
            "loss": sum(window) / len(window),
            "lr": out["lr"],
            "batch_size": out["batch_size"],
            "time": round(elapsed, 4),
            "eval_time": round(self.state.eval_time, 4),
            "tokens_per_s": tokens_per_s,
            "grad_norm": out["grad_norm"],
            "world_size": self.dist.world_size,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
        }
        if self.noise is not None and self.noise.noise_scale is not None:
            row["noise_scale"] = self.noise.noise_scale
        return row

    def _eval_line(self, row: dict[str, Any]) -> str:
        extras = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_"))
        return f"step {row['step']:>6}  eval: {extras}"

    def _on_nonfinite(self, out: dict[str, Any], display: ProgressDisplay) -> bool:
        """A skipped step: count it; after `max_skips_in_row`, roll back to the last checkpoint."""
        s, state = self.strategy.train, self.state
        self.skips_in_row += 1
        # The skipped batch is consumed (not retried): its samples are what blew up.
        self.progress = self.progress.advanced(out["batch_size"], self.data.tokens_per_sample)
        state.events.append({"event": "skip", "step": self.progress.step, "loss": out["loss"] if math.isfinite(out["loss"]) else None})
        display.message(f"step {self.progress.step}: non-finite loss or gradients; step skipped ({self.skips_in_row} in a row)")
        if self.skips_in_row < s.max_skips_in_row:
            return False
        self.checkpointer.wait()  # a save in flight is a checkpoint to roll back to
        found = self.checkpointer.latest()
        if found is None:
            raise UserError(
                f"training diverged: {self.skips_in_row} non-finite steps in a row at step {self.progress.step} and no checkpoint "
                "to roll back to; lower optimizer.lr, set train.clip, or set checkpoint.every"
            )
        if state.rollbacks >= s.max_rollbacks:
            raise UserError(
                f"training diverged: {self.skips_in_row} non-finite steps in a row at step {self.progress.step} after "
                f"{state.rollbacks} rollback(s) (train.max_rollbacks = {s.max_rollbacks}); lower optimizer.lr or set train.clip"
            )
        failed_at, events = self.progress, state.events
        rollbacks, factor = state.rollbacks + 1, state.lr_factor * s.lr_backoff
        self.checkpointer.load(found)
        # Skip the data between the checkpoint and the failure; lower the LR; keep the history.
        state.data_offset += failed_at.samples - self.progress.samples
        state.rollbacks, state.lr_factor, self.skips_in_row = rollbacks, factor, 0
        state.events = [*events, {"event": "rollback", "step": failed_at.step, "to_step": self.progress.step, "lr_factor": factor}]
        if self.consecutive is not None:
            self.consecutive.reset()
        display.message(f"step {failed_at.step}: rolled back to step {self.progress.step} ({found.name}); LR x {factor:g}")
        return True

    def _facts(self) -> dict[str, Any]:
        """What the summary says that the logged rows cannot (rundir.summarize adds the losses)."""
        elapsed = self.state.elapsed
        return {
            "status": "finished",
            "stopped_early": self.stopped,
            "steps": self.progress.step,
            "samples": self.progress.samples,
            "tokens": self.progress.tokens,
            "unigram_entropy": self.data.unigram_entropy,
            "loss_unit": loss_unit(self.task),
            "wall_time": elapsed,
            "tokens_per_s": self.progress.tokens / max(elapsed, 1e-9),
            "world_size": self.dist.world_size,
            "events": self.state.events,
        }


def train(strategy: Strategy, run_dir: str | Path | None = None) -> RunResult:
    """Train the built-in task a strategy describes (what `regimen train` runs)."""
    return Trainer(strategy, build_task(strategy.resolve()), run_dir).fit()
