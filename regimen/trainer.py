"""The fit loop: one step, top to bottom, readable in one sitting.

```
B      = batch_schedule(progress)            # global batch, in samples
lr     = lr_schedule(progress) * scale(B)    # scaling rule vs the reference batch
split B over world_size ranks, then into micro-batches of at most `micro` on each rank
for each micro-batch: loss * (b_i / B) * world_size -> backward (no gradient sync but the last)
(noise-scale statistics from the micro-batch and global gradient norms, where enabled)
clip -> optimizer.step() -> zero_grad
progress += (1 step, B samples, B*T tokens); log / eval / checkpoint on their cadence
```

The gradient is the mean over the global batch however it is split: DDP averages over ranks,
so each rank's micro-batch loss is weighted by `b_i / B * world_size`.

Host synchronisation: one per step. The loss, the gradient norm and the small-batch gradient
norm travel in one all-reduced vector that is read on the host, because a non-finite step
must be skipped on every rank together (DESIGN, "Bad input and faults"). On a CPU that read is
free; on CUDA it is one sync at the end of the backward pass.

Example:
    >>> from regimen.strategy import Strategy
    >>> s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "train.steps=3", "observe.progress=none"])
    >>> result = Trainer(s, build_task(s.resolve())).fit()
    >>> result.progress.step
    3
"""

from __future__ import annotations

import contextlib
import json
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

from regimen import parallel
from regimen.data import SampleOrder, micro_sizes, split_evenly
from regimen.errors import UserError
from regimen.noise import ConsecutiveGradients, NoiseScaleEstimator, grad_sqnorm
from regimen.observe import MetricsWriter, ProgressDisplay, TensorBoardLogger
from regimen.optim import build_optimizer, set_train_mode
from regimen.progress import Progress, Unit
from regimen.schedules import budget_reached, build_batch_schedule, build_lr_schedule, lr_batch_scale, simulate_budget
from regimen.strategy import Strategy
from regimen.task import Task, build_task, mse

Callback = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    """What `Trainer.fit` returns: the final progress, the last metrics and the summary."""

    progress: Progress
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: the CUDA device of this rank when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak resident set size of the process (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Runs one strategy on one task, optionally recording into a run directory.

    `callbacks` receive every logged row (the dicts written to `metrics.jsonl`).
    """

    def __init__(self, strategy: Strategy, task: Task, run_dir: str | Path | None = None, callbacks: list[Callback] | None = None) -> None:
        self.strategy = s = strategy.resolve()
        self.task = task
        self.callbacks = callbacks or []
        self.run_dir = Path(run_dir) if run_dir is not None else None
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
        # Every batch size is a multiple of micro x world, so each rank's share splits evenly.
        # (`full` rounds only to the world size: it should drop as few samples as it can.)
        self.multiple = self.dist.world_size * (1 if s.batch.schedule == "full" else (s.batch.micro_size or 1))
        self.batch_schedule = build_batch_schedule(s.batch, seed=s.train.seed, multiple=self.multiple, dataset_size=len(self.data.train))
        unit, self.budget = s.train.budget()
        if unit == "epochs":
            unit, self.budget = "samples", self.budget * len(self.data.train)
        self.budget_unit: Unit = unit  # type: ignore[assignment]
        total = self.budget
        if s.lr.unit != self.budget_unit:
            total = simulate_budget(self.batch_schedule, self.budget_unit, self.budget, s.lr.unit, self.data.tokens_per_sample)
        self.lr_schedule = build_lr_schedule(s.lr, s.optimizer.lr, total)
        if self._measure_noise and self.mode == "fsdp":
            # FSDP2 shards gradients: the small-batch norm would need its own reduction.
            raise UserError("observe.noise_scale / batch.schedule = 'adaptive' are not supported with parallel.mode = 'fsdp' yet; use ddp")
        self.noise = NoiseScaleEstimator(s.observe.noise_ema) if self._measure_noise else None
        self.consecutive = ConsecutiveGradients() if self.noise is not None else None
        self.autocast_dtype = torch.bfloat16 if s.train.precision == "bf16" else None
        # Training state (everything a checkpoint must hold besides model and optimizer).
        self.progress = Progress()
        self.elapsed = 0.0
        self.eval_time = 0.0  # of `elapsed`, the seconds spent evaluating
        self.lr_factor = 1.0  # lowered by rollbacks after non-finite steps
        self.skips_in_row = 0
        self.rollbacks = 0
        self.data_offset = 0  # samples skipped by rollbacks: the stream reads samples + offset
        self.window: list[float] = []  # train losses since the last logged row
        self.events: list[dict[str, Any]] = []  # skips and rollbacks, for the summary
        torch.manual_seed(s.train.seed + 1000 * self.dist.rank)  # dropout differs per rank
        self.eval_ids = self._eval_positions()

    # ---- training state (what a checkpoint holds besides model, optimizer and RNG) ----------

    def training_state(self) -> dict[str, Any]:
        """Counters and the stateful schedule and estimator, as plain JSON data."""
        p = self.progress
        return {
            "progress": {"step": p.step, "samples": p.samples, "tokens": p.tokens},
            "elapsed": self.elapsed,
            "eval_time": self.eval_time,
            "lr_factor": self.lr_factor,
            "rollbacks": self.rollbacks,
            "data_offset": self.data_offset,
            "window": self.window,
            "events": self.events,
            "batch_schedule": self.batch_schedule.state_dict(),
            "noise": self.noise.state_dict() if self.noise is not None else None,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.progress = Progress(**state["progress"])
        self.elapsed = state["elapsed"]
        self.eval_time = state.get("eval_time", 0.0)
        self.lr_factor = state["lr_factor"]
        self.rollbacks = state["rollbacks"]
        self.data_offset = state["data_offset"]
        self.window = list(state["window"])
        self.events = list(state["events"])
        self.batch_schedule.load_state_dict(state["batch_schedule"])
        if self.noise is not None and state.get("noise"):
            self.noise.load_state_dict(state["noise"])

    def consecutive_state(self) -> dict[str, Any] | None:
        """The consecutive-steps gradient pair's buffer (single process only), or None."""
        if self.consecutive is None or self.dist.enabled:
            return None
        return self.consecutive.state_dict() or None

    def load_consecutive_state(self, state: dict[str, Any]) -> None:
        if self.consecutive is not None:
            self.consecutive.load_state_dict(state)

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

    def current_lr(self, batch: int) -> float:
        """The LR of the next step: schedule(progress) x batch-size scaling x rollback factor."""
        s = self.strategy
        assert s.lr.scale_with_batch != "auto", "resolved in Strategy.resolve"
        scale = lr_batch_scale(s.lr.scale_with_batch, batch, s.lr.reference_batch or batch)
        return self.lr_schedule(self.progress.value(s.lr.unit)) * scale * self.lr_factor

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the next global batch; returns its loss, lr, batch and norms."""
        s, d = self.strategy, self.dist
        B = self.batch_schedule(self.progress)
        lr = self.current_lr(B)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr / s.optimizer.lr
        ids = self.order.take(self.progress.samples + self.data_offset, B)
        share = B // d.world_size
        mine = ids[d.rank * share : (d.rank + 1) * share]
        sizes = micro_sizes(share, s.batch.micro_size)
        # The small batch of the noise-scale estimate: the first micro-batch, else this rank's
        # share (all-reduced by hand below), else the previous step (single process, one micro).
        noise_small = self.noise is not None and (len(sizes) > 1 or d.enabled)
        manual_reduce = noise_small and len(sizes) == 1 and self.mode == "ddp"
        losses: list[torch.Tensor] = []  # b_i x micro-batch mean loss, summed after the loop
        small_sq: torch.Tensor | None = None
        start = 0
        for i, b in enumerate(sizes):
            batch = _to_device(self.data.train.gather(mine[start : start + b]), self.device)
            start += b
            last = i == len(sizes) - 1
            with parallel.grad_sync(self.wrapped, last and not manual_reduce), self._autocast():
                loss, _, _ = self.task.forward(batch, self.wrapped)
            weight = b / B * d.world_size
            (loss if weight == 1.0 else loss * weight).backward()  # one micro-batch, one rank: no extra graph node
            losses.append(loss.detach().float() * b)
            if noise_small and i == 0:
                # grads now hold (b W / B) x the micro-batch mean gradient.
                small_sq = grad_sqnorm(self.params) * (B / (b * d.world_size)) ** 2
        if manual_reduce:
            grads = [p.grad for p in self.params if p.grad is not None]
            for g in grads:
                d.all_reduce_sum(g)
            torch._foreach_div_(grads, d.world_size)
        # The consecutive-steps pair is taken before clipping: clipping would bias both norms.
        pair = self.consecutive.pair(self.params, B) if self.consecutive is not None and not noise_small else None
        if noise_small and self.consecutive is not None:
            self.consecutive.reset()  # measured with micro-batches: no later pair may reach back past this step
        max_norm = s.train.clip if s.train.clip > 0 else math.inf
        grad_norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True))
        # One vector, one all-reduce, one host read. A non-finite loss or norm on any rank makes
        # its sum non-finite on every rank, so all ranks skip together; the norm is the global
        # one on every rank, so its sum is world_size times it.
        parts = [*losses, grad_norm.float()] + ([small_sq] if small_sq is not None else [])
        values = d.all_reduce_sum(torch.stack(parts).float()).tolist()  # the step's one host sync
        loss_value, norm_value = math.fsum(values[: len(losses)]), values[len(losses)] / d.world_size
        small_value = values[-1] if small_sq is not None else 0.0
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.consecutive is not None:
                self.consecutive.reset()  # no pair may straddle a skipped step
            return {"skipped": True, "loss": loss_value / B, "lr": lr, "batch_size": B}
        if self.noise is not None:
            if noise_small:
                self.noise.update(small_value / d.world_size, sizes[0] if len(sizes) > 1 else share, norm_value**2, B)
            elif pair is not None:
                self.noise.update(*pair)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"skipped": False, "loss": loss_value / B, "lr": lr, "batch_size": B, "grad_norm": norm_value}

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
        chunk = self.strategy.batch.micro_size or 64
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
        """Train until the budget is spent; log, evaluate and checkpoint on their cadence."""
        s = self.strategy
        writer = tb = None
        if self.is_main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            s.save(self.run_dir / "strategy.toml")
            writer = MetricsWriter(self.run_dir / "metrics.jsonl")
            writer.truncate_after(self.progress.step)  # a resumed run redoes what followed its checkpoint
            if s.observe.tensorboard:
                tb = TensorBoardLogger(self.run_dir / "tensorboard")
        mode = s.observe.progress if self.is_main else "none"
        display = ProgressDisplay(self.budget, self.budget_unit, mode, initial=self.progress.value(self.budget_unit))
        history: list[dict[str, Any]] = []
        last_log_time, last_log_tokens = time.perf_counter(), self.progress.tokens
        t0 = time.perf_counter() - self.elapsed
        last_save = time.perf_counter()
        self.wrapped.train()
        set_train_mode(self.optimizer, True)
        while not budget_reached(self.progress, self.budget_unit, self.budget):
            out = self.train_step()
            if out["skipped"]:
                if self._on_nonfinite(out, display):  # rolled back: forget the rows after the checkpoint
                    history = [r for r in history if r["step"] <= self.progress.step]
                    if writer:
                        writer.truncate_after(self.progress.step)
                    last_log_tokens = self.progress.tokens
                continue
            self.skips_in_row = 0
            self.progress = self.progress.advanced(out["batch_size"], self.data.tokens_per_sample)
            self.window.append(out["loss"])
            wants = self.noise is not None and self.batch_schedule.wants_noise(self.progress)
            self.batch_schedule.observe(self.progress, self.noise.noise_scale if wants and self.noise else None)
            done = budget_reached(self.progress, self.budget_unit, self.budget)
            step = self.progress.step
            evaluate = step % s.train.eval_every == 0 or done
            if step % s.train.log_every == 0 or evaluate:
                now = time.perf_counter()
                row = self._row(out, self.window, now - t0, (self.progress.tokens - last_log_tokens) / max(now - last_log_time, 1e-9))
                self.window, last_log_time, last_log_tokens = [], now, self.progress.tokens
                if evaluate:
                    row.update(self.evaluate())
                    last_log_time = time.perf_counter()  # evaluation time is not training throughput
                    self.eval_time += last_log_time - now
                    row["eval_time"] = round(self.eval_time, 4)
                history.append(row)
                if writer:
                    writer.write(row)
                if tb:
                    tb.write(row)
                for callback in self.callbacks:
                    callback(row)
                display.update(self.progress.value(self.budget_unit), row)
                if evaluate and "val_loss" in row:
                    display.message(self._eval_line(row))
            if self.run_dir is not None and not done and self._checkpoint_due(last_save):
                self.elapsed = time.perf_counter() - t0
                self.save()
                last_save = time.perf_counter()
        self.elapsed = time.perf_counter() - t0
        display.close()
        summary = self._summary(history)
        if self.run_dir is not None:
            self.save()
            from regimen.checkpoint import export_safetensors

            export_safetensors(self, self.run_dir / "model.safetensors")
        if writer and self.run_dir is not None:
            writer.close()
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if tb:
            tb.close()
        return RunResult(self.progress, summary, history, self.run_dir)

    def _checkpoint_due(self, last_save: float) -> bool:
        """Every `every` steps and/or `every_minutes`; rank 0's clock decides for all ranks."""
        c = self.strategy.checkpoint
        due = c.every > 0 and self.progress.step % c.every == 0
        if c.every_minutes > 0:
            flag = torch.tensor([float(due or time.perf_counter() - last_save >= 60 * c.every_minutes)] if self.is_main else [0.0])
            due = self.dist.all_reduce_sum(flag).item() > 0
        return due

    def save(self) -> Path:
        """Save a checkpoint of the whole training state into the run directory."""
        from regimen.checkpoint import save_checkpoint

        return save_checkpoint(self)

    def _row(self, out: dict[str, Any], window: list[float], elapsed: float, tokens_per_s: float) -> dict[str, Any]:
        row = {
            "step": self.progress.step,
            "samples": self.progress.samples,
            "tokens": self.progress.tokens,
            "loss": sum(window) / len(window),
            "lr": out["lr"],
            "batch_size": out["batch_size"],
            "time": round(elapsed, 4),
            "eval_time": round(self.eval_time, 4),
            "tokens_per_s": tokens_per_s,
            "grad_norm": out["grad_norm"],
            "world_size": self.dist.world_size,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
        }
        if self.noise is not None and self.noise.noise_scale is not None:
            row["noise_scale"] = self.noise.noise_scale
        return row

    def _loss_unit(self) -> str:
        if self.data.tokens_per_sample > 1:
            return "nats/byte" if self.data.unigram_entropy is not None else "nats/token"
        return "nats/sample" if self.task.loss is not mse else "squared error"

    def _eval_line(self, row: dict[str, Any]) -> str:
        extras = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_"))
        return f"step {row['step']:>6}  eval: {extras}"

    def _on_nonfinite(self, out: dict[str, Any], display: ProgressDisplay) -> bool:
        """A skipped step: count it; after `max_skips_in_row`, roll back to the last checkpoint."""
        s = self.strategy.train
        self.skips_in_row += 1
        # The skipped batch is consumed (not retried): its samples are what blew up.
        self.progress = self.progress.advanced(out["batch_size"], self.data.tokens_per_sample)
        self.events.append({"event": "skip", "step": self.progress.step, "loss": out["loss"] if math.isfinite(out["loss"]) else None})
        display.message(f"step {self.progress.step}: non-finite loss or gradients; step skipped ({self.skips_in_row} in a row)")
        if self.skips_in_row < s.max_skips_in_row:
            return False
        from regimen.checkpoint import latest_checkpoint, load_checkpoint

        found = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        if found is None:
            raise UserError(
                f"training diverged: {self.skips_in_row} non-finite steps in a row at step {self.progress.step} and no checkpoint "
                "to roll back to; lower optimizer.lr, set train.clip, or set checkpoint.every"
            )
        if self.rollbacks >= s.max_rollbacks:
            raise UserError(
                f"training diverged: {self.skips_in_row} non-finite steps in a row at step {self.progress.step} after "
                f"{self.rollbacks} rollback(s) (train.max_rollbacks = {s.max_rollbacks}); lower optimizer.lr or set train.clip"
            )
        failed_at, events = self.progress, self.events
        rollbacks, factor = self.rollbacks + 1, self.lr_factor * s.lr_backoff
        load_checkpoint(self, found)
        # Skip the data between the checkpoint and the failure; lower the LR; keep the history.
        self.data_offset += failed_at.samples - self.progress.samples
        self.rollbacks, self.lr_factor, self.skips_in_row = rollbacks, factor, 0
        self.events = [*events, {"event": "rollback", "step": failed_at.step, "to_step": self.progress.step, "lr_factor": factor}]
        if self.consecutive is not None:
            self.consecutive.reset()
        display.message(f"step {failed_at.step}: rolled back to step {self.progress.step} ({found.name}); LR x {factor:g}")
        return True

    def _summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        last = history[-1] if history else {}
        vals = [r["val_loss"] for r in history if r.get("val_loss") is not None]
        return {
            "status": "finished",
            "steps": self.progress.step,
            "samples": self.progress.samples,
            "tokens": self.progress.tokens,
            "final_loss": last.get("loss"),
            "final_val_loss": vals[-1] if vals else None,
            "best_val_loss": min(vals) if vals else None,
            **{k: v for k, v in last.items() if k.startswith("val_") and k != "val_loss"},
            "unigram_entropy": self.data.unigram_entropy,
            "loss_unit": self._loss_unit(),
            "wall_time": self.elapsed,
            "tokens_per_s": self.progress.tokens / max(self.elapsed, 1e-9),
            "peak_memory_mb": last.get("peak_memory_mb"),
            "world_size": self.dist.world_size,
            "events": self.events,
        }


def train(strategy: Strategy, run_dir: str | Path | None = None) -> RunResult:
    """Train the built-in task a strategy describes (what `regimen train` runs)."""
    return Trainer(strategy, build_task(strategy.resolve()), run_dir).fit()
