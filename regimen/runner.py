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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from regimen import launch, rundir
from regimen.errors import UserError
from regimen.strategy import Strategy, flatten, read_toml, safe_to_change, same_value

LOSS_KEYS = ("final_loss", "final_val_loss", "best_val_loss")


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
    # Sources prepared with a tokenizer also report nats per byte of text: what compares across tokenizers.
    per_byte = {k: f", {summary[k + '_per_byte']:.4f} nats/byte" if summary.get(k + "_per_byte") is not None else "" for k in LOSS_KEYS}
    if summary.get("final_loss") is not None:
        lines.append(f"  train loss      {summary['final_loss']:.4f} {per}{per_byte['final_loss']}")
    if summary.get("final_val_loss") is not None:
        lines.append(
            f"  val loss        {summary['final_val_loss']:.4f} {per}{per_byte['final_val_loss']}  "
            f"(best {summary['best_val_loss']:.4f}{per_byte['best_val_loss']})"
        )
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


def run_training(
    strategy: Strategy,
    run_dir: str | Path | None,
    resume: str | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    allow_change: bool = False,
    build: Callable[[Strategy], Any] | None = None,
) -> int:
    """Train the built-in task of `strategy` (or the task `build(resolved strategy)` returns) into `run_dir`; returns the exit code.

    Order matters for what a failure leaves behind: the run directory is checked, the strategy
    compared with the run's, and the data and model built before anything is written; only
    then is the directory made (and locked), an `--overwrite`n run cleared, a checkpoint loaded.
    """
    from regimen.task import build_task
    from regimen.trainer import Trainer

    run_dir = Path(run_dir) if run_dir is not None else None
    resolved = strategy.resolve()
    changes: dict[str, tuple[Any, Any]] = {}
    if run_dir is not None:
        rundir.check_location(run_dir)
        if resume is not None:
            changes = check_strategy_changes(run_dir, resume, resolved, allow_change)
    task = build(resolved) if build is not None else build_task(resolved)
    created = run_dir is not None and not run_dir.exists()
    trainer = Trainer(resolved, task, run_dir)
    launch.keep_until_exit(trainer)  # a torchrun worker must not destroy its process group (regimen.launch)
    try:
        if trainer.is_main and not quiet and task.data is not None:
            print(f"regimen: {task.data.description}", file=sys.stderr)
        if overwrite and resume is None and run_dir is not None and trainer.is_main:
            kept = rundir.clear_for_overwrite(run_dir)
            rundir.record_event(run_dir, "overwrite", kept=kept)
            if kept:
                names = ", ".join(kept)
                print(f"regimen: --overwrite: replaced the run in {run_dir}; kept {len(kept)} file(s) regimen did not write: {names}")
        if resume is not None:
            assert trainer.checkpointer is not None or run_dir is None
            path = trainer.checkpointer.resume(resume) if trainer.checkpointer is not None else None
            if path is not None and trainer.is_main:
                print(f"regimen: resuming from {path} (step {trainer.progress.step})", file=sys.stderr)
            if path is not None and run_dir is not None and _already_finished(trainer, run_dir):
                if trainer.is_main:
                    unit, budget = trainer.budget_unit, trainer.budget
                    print(
                        f"regimen: {run_dir} already finished at step {trainer.progress.step} ({unit} budget {budget:g}); "
                        f"nothing to do (raise the budget, e.g. train.{unit}=..., to train further)"
                    )
                return 0
        if run_dir is not None and resolved.observe.report and trainer.is_main:
            # Before the loggers close, so that they keep the report as an artifact.
            trainer.end_of_run.append(lambda: _write_report(run_dir))
        if changes and run_dir is not None and trainer.is_main:
            rundir.record_event(run_dir, "strategy_changed", changed={k: list(v) for k, v in changes.items()}, allowed_by=_why(changes))
        result = trainer.fit()
    except BaseException:
        trainer.close()
        if created and run_dir is not None and trainer.is_main:
            rundir.remove_if_unused(run_dir)  # a run that never started leaves no directory behind
        raise
    finally:
        trainer.close()
    if trainer.is_main and not quiet:
        print(format_summary(result.summary, run_dir))
    trainer.dist.close()
    return 0


def _write_report(run_dir: Path) -> None:
    from regimen.report import write_report

    write_report([run_dir], run_dir)


def _already_finished(trainer: Any, run_dir: Path) -> bool:
    """The checkpoint is at the end of the budget and the run wrote its summary: nothing is left to do."""
    from regimen.schedules import budget_reached

    summary = rundir.read_summary(run_dir) or {}
    return budget_reached(trainer.progress, trainer.budget_unit, trainer.budget) and summary.get("status") == "finished"


def _why(changes: dict[str, tuple[Any, Any]]) -> str:
    return "safe" if all(safe_to_change(k) for k in changes) else "--allow-change"


def check_strategy_changes(run_dir: Path, resume: str, strategy: Strategy, allow_change: bool) -> dict[str, tuple[Any, Any]]:
    """Compare a resumed run's strategy with the one it was trained with; refuse a change that is not safe.

    The run's strategy is `strategy.toml` with the changes its history records (or, for
    `--resume PATH` to a checkpoint, the strategy saved in it). The budget, the logging,
    evaluation and checkpoint cadence and what is observed may change (`safe_to_change`) and
    are recorded in the run's history; anything else needs `--allow-change`, and is recorded too.
    """
    path = Path(resume)
    if resume != "auto" and (path / "strategy.toml").is_file() and (path / "COMPLETE").is_file():
        saved = flatten(read_toml(path / "strategy.toml"))
    elif (run_dir / rundir.STRATEGY_FILE).is_file():
        saved = flatten(rundir.current_strategy(run_dir))
    else:
        return {}
    new = strategy.flat()
    changes = {k: (saved.get(k), new.get(k)) for k in sorted(saved.keys() | new.keys()) if not same_value(saved.get(k), new.get(k))}
    # `batch.micro = "auto"` was resolved to a number when the run started, and stays that number.
    if isinstance(changes.get("batch.micro", (None, None))[0], int) and new.get("batch.micro") == "auto":
        del changes["batch.micro"]
    unsafe = [k for k in changes if not safe_to_change(k)]
    if unsafe and not allow_change:
        listed = ", ".join(f"{k} ({_show(changes[k][0])} -> {_show(changes[k][1])})" for k in unsafe[:4])
        more = f" and {len(unsafe) - 4} more" if len(unsafe) > 4 else ""
        raise UserError(
            f"--resume: the strategy differs from the one {str(run_dir)!r} was trained with: {listed}{more}; "
            "resume with the same strategy (only the budget, cadences and observe keys may change), "
            "or pass --allow-change to continue with the new one (recorded in the run's events.jsonl)"
        )
    return changes


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value)


def _default_run_dir() -> Path:
    return Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")


def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse, before anything is built, a run directory that would be clobbered or cannot be written.

    An existing run needs --resume or --overwrite; --overwrite needs a directory regimen made,
    and deletes nothing here: `run_training` clears it only once the strategy, the data and the
    model have been built.
    """
    rundir.check_location(run_dir)
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    if exists and not (resume or overwrite):
        raise UserError(f"run directory {str(run_dir)!r} exists; pass --resume auto to continue it or --overwrite to replace it")
    if exists and overwrite and not resume and not rundir.is_run_dir(run_dir):
        raise UserError(
            f"--overwrite: {str(run_dir)!r} was not made by regimen (it has no {rundir.MARKER_FILE} marker); "
            "nothing was deleted; choose another --run-dir or empty it yourself"
        )
    holder = rundir.RunLock(run_dir).holder() if exists else None
    if holder is not None:
        who = f"process {holder}" if holder > 0 else "another process"
        raise UserError(
            f"run directory {str(run_dir)!r} is in use by {who} (another regimen run); wait for it to end, or use another --run-dir"
        )


def run(args: argparse.Namespace) -> int:
    """`regimen train [CONFIG] [overrides] [--run-dir] [--resume] [--overwrite] [--allow-change] [--nproc] [--print-config]`."""
    strategy = Strategy.from_cli(args.config, args.overrides)
    if args.print_config:
        print(strategy.resolve().to_toml(), end="")
        return 0
    if args.resume == "auto" and not args.run_dir:
        raise UserError("--resume auto needs --run-dir: the run directory whose newest checkpoint to continue")
    if args.resume and args.overwrite and "LOCAL_RANK" not in os.environ:
        raise UserError("--resume and --overwrite: choose one (continue the run, or replace it)")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts = {args.max_restarts}: must be >= 0 (the restarts torchrun may make after a failure)")
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc = {args.nproc}: must be >= 1")
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir()
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
    # torchrun sets TORCHELASTIC_RESTART_COUNT=0 on the first attempt. A restart resumes into the
    # run directory (the launcher passed --resume auto for restarts), even when the first attempt
    # was told to --overwrite it.
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    overwrite = args.overwrite and first_attempt
    resume = None if overwrite else args.resume
    if int(os.environ.get("RANK", "0")) == 0 and first_attempt:
        prepare_run_dir(run_dir, resume, overwrite)
    return run_training(strategy, run_dir, resume=resume, overwrite=overwrite, allow_change=args.allow_change)


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
    cmd += ["--overwrite"] if args.overwrite else []
    cmd += ["--allow-change"] if args.allow_change else []
    if args.resume:
        cmd += ["--resume", args.resume]
    elif args.max_restarts:
        cmd += ["--resume", "auto"]  # restarted workers continue from the last checkpoint
    return launch.torchrun(cmd)
