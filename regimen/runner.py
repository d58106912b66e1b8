"""`regimen train`: the run directory, torchrun for `--nproc`, then build, resume, train, summarise, report.

Example:
    >>> from regimen.strategy import Strategy
    >>> s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "train.steps=2", "observe.report=false"])
    >>> import tempfile; run_training(s.replace({"observe.progress": "none"}), tempfile.mkdtemp() + "/run", quiet=True)
    0
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from regimen import launch
from regimen.errors import UserError
from regimen.strategy import Strategy


def format_summary(summary: dict[str, Any], run_dir: Path | None) -> str:
    """The one-screen summary printed at the end of a run."""
    per = summary.get("loss_unit", "nats")
    lines = [
        f"regimen: finished {summary['steps']} steps, {summary['samples']:,} samples, {summary['tokens']:,} tokens "
        f"in {summary['wall_time']:.1f} s on {summary['world_size']} process{'es' if summary['world_size'] > 1 else ''}",
    ]
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
    result = trainer.fit()
    if trainer.is_main:
        if run_dir is not None and resolved.observe.report:
            _write_plots(run_dir)
        if not quiet:
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
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts = {args.max_restarts}: must be >= 0 (the restarts torchrun may make after a failure)")
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        _check_before_launch(strategy)
        prepare_run_dir(run_dir, args.resume, args.overwrite)
        return launch_torchrun(args, run_dir)
    if launch.in_worker():
        # One of torchrun's workers: a refused input goes to the launcher as one line, and the
        # process ends without the interpreter's finalization (regimen.launch says why).
        launch.end_worker(launch.exit_code_of(lambda: _train(args, strategy, run_dir)))
    return _train(args, strategy, run_dir)


def _train(args: argparse.Namespace, strategy: Strategy, run_dir: Path) -> int:
    # torchrun sets TORCHELASTIC_RESTART_COUNT=0 on the first attempt: check the run directory
    # then, but not on restarts (they resume into it).
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if int(os.environ.get("RANK", "0")) == 0 and first_attempt:
        prepare_run_dir(run_dir, args.resume, args.overwrite)
    return run_training(strategy, run_dir, resume=args.resume)


def _check_before_launch(strategy: Strategy) -> None:
    """Refuse, before torchrun starts N processes that would each refuse it, what costs nothing to check.

    The strategy was validated when it was read; here the data path must exist and a
    `module:factory` model's module must be found (without importing it or torch). A failed
    check is reported by the loader that owns it, in its own words.
    """
    resolved = strategy.resolve()
    kind, _, where = resolved.data.source.partition(":")
    if kind in ("text", "tokens") and not Path(where).expanduser().exists():
        from regimen.data import load_source

        load_source(resolved.data, resolved.model.context)  # raises: the path does not exist
    module, _, factory = resolved.model.name.partition(":")
    if factory:
        try:
            missing = importlib.util.find_spec(module) is None
        except ImportError:  # a parent package is missing
            missing = True
        except ValueError:  # not a module name at all: left to the workers' own check
            missing = False
        if missing:
            from regimen.models import build_model

            build_model(resolved.model)  # raises: the module cannot be imported


def launch_torchrun(args: argparse.Namespace, run_dir: Path) -> int:
    """Run `torchrun --standalone --nproc-per-node N -m regimen train ...` and wait for it (`regimen.launch.torchrun`)."""
    cmd = ["--standalone", f"--nproc-per-node={args.nproc}", f"--max-restarts={args.max_restarts}"]
    cmd += ["-m", "regimen", "train", *([args.config] if args.config else []), *args.overrides, "--run-dir", str(run_dir)]
    if args.resume:
        cmd += ["--resume", args.resume]
    elif args.max_restarts:
        cmd += ["--resume", "auto"]  # restarted workers continue from the last checkpoint
    return launch.torchrun(cmd)
