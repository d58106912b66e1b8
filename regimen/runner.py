"""`regimen train`: the run directory, torchrun for `--nproc`, then build, resume, train, summarise, report.

Example:
    >>> from regimen.strategy import Strategy
    >>> s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "train.steps=2", "observe.report=false"])
    >>> import tempfile; run_training(s.replace({"observe.progress": "none"}), tempfile.mkdtemp() + "/run", quiet=True)
    0
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from regimen.errors import UserError
from regimen.strategy import Strategy


def format_summary(summary: dict[str, Any], run_dir: Path | None) -> str:
    """The one-screen summary printed at the end of a run."""
    per = summary.get("loss_unit", "nats")
    lines = [
        f"regimen: finished {summary['steps']} steps, {summary['samples']:,} samples, {summary['tokens']:,} tokens "
        f"in {summary['wall_time']:.1f} s on {summary['world_size']} process{'es' if summary['world_size'] > 1 else ''}",
    ]
    if summary.get("stopped_early"):
        stop = summary["stopped_early"]
        lines.append(f"  stopped early   at step {stop['step']}" + (f": {stop['reason']}" if stop.get("reason") else ""))
    if summary.get("final_loss") is not None:
        lines.append(f"  train loss      {summary['final_loss']:.4f} {per}")
    if summary.get("final_val_loss") is not None:
        lines.append(f"  val loss        {summary['final_val_loss']:.4f} {per}  (best {summary['best_val_loss']:.4f})")
    for key, value in summary.items():
        if key.startswith("val_") and key not in ("val_loss",) and isinstance(value, float):
            lines.append(f"  {key:<15} {value:.4f}")
    if summary.get("unigram_entropy") is not None:
        lines.append(f"  unigram entropy {summary['unigram_entropy']:.4f} {per}  (the loss of a model that ignores context)")
    lines.append(f"  throughput      {summary['tokens_per_s']:,.0f} tokens/s")
    skips = [e for e in summary.get("events", []) if e["event"] == "skip"]
    rollbacks = [e for e in summary.get("events", []) if e["event"] == "rollback"]
    if skips or rollbacks:
        lines.append(
            f"  faults          {len(skips)} skipped step(s), {len(rollbacks)} rollback(s): "
            + ", ".join(f"{e['event']}@{e['step']}" for e in summary["events"])
        )
    if run_dir is not None:
        lines.append(f"  run directory   {run_dir}")
    return "\n".join(lines)


def run_training(strategy: Strategy, run_dir: str | Path | None, resume: str | None = None, quiet: bool = False) -> int:
    """Train the built-in task of `strategy` into `run_dir`; returns the exit code."""
    from regimen.task import build_task
    from regimen.trainer import Trainer

    run_dir = Path(run_dir) if run_dir is not None else None
    resolved = strategy.resolve()
    task = build_task(resolved)
    trainer = Trainer(resolved, task, run_dir)
    if trainer.is_main and not quiet and task.data is not None:
        print(f"regimen: {task.data.description}", file=sys.stderr)
    if resume is not None:
        from regimen.checkpoint import resume_trainer

        resume_trainer(trainer, run_dir, resume)
    if run_dir is not None and resolved.observe.report:
        trainer.end_of_run.append(lambda: _write_plots(run_dir))  # before the loggers close: they keep the report
    result = trainer.fit()
    if trainer.is_main and not quiet:
        print(format_summary(result.summary, run_dir))
    trainer.dist.close()
    return 0


def _write_plots(run_dir: Path) -> None:
    from regimen import report

    report.write_report([run_dir], run_dir)  # draws loss.png (and batch.png) too


def _default_run_dir() -> Path:
    return Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")


def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to clobber an existing run: it needs --resume or --overwrite."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and not (resume or overwrite):
        raise UserError(f"run directory {str(run_dir)!r} exists; pass --resume auto to continue it or --overwrite to replace it")
    if exists and overwrite and not resume:
        shutil.rmtree(run_dir)


def run(args: argparse.Namespace) -> int:
    """`regimen train [CONFIG] [overrides] [--run-dir] [--resume] [--overwrite] [--nproc] [--print-config]`."""
    strategy = Strategy.from_cli(args.config, args.overrides)
    if args.print_config:
        print(strategy.resolve().to_toml(), end="")
        return 0
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir()
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc = {args.nproc}: must be >= 1")
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        prepare_run_dir(run_dir, args.resume, args.overwrite)
        return launch_torchrun(args, run_dir)
    # torchrun sets TORCHELASTIC_RESTART_COUNT=0 on the first attempt: check the run directory
    # then, but not on restarts (they resume into it).
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if int(os.environ.get("RANK", "0")) == 0 and first_attempt:
        prepare_run_dir(run_dir, args.resume, args.overwrite)
    return run_training(strategy, run_dir, resume=args.resume)


def launch_torchrun(args: argparse.Namespace, run_dir: Path) -> int:
    """Start `torchrun --standalone --nproc-per-node N -m regimen train ...` and wait for it."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        f"--max-restarts={args.max_restarts}",
    ]
    cmd += ["-m", "regimen", "train", *([args.config] if args.config else []), *args.overrides, "--run-dir", str(run_dir)]
    if args.resume:
        cmd += ["--resume", args.resume]
    elif args.max_restarts:
        cmd += ["--resume", "auto"]  # restarted workers continue from the last checkpoint
    return subprocess.call(cmd)
