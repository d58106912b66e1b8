"""What `regimen train` does around the trainer: build, resume, train, summarise, report.

Example:
    >>> from regimen.strategy import Strategy
    >>> s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "train.steps=2", "observe.report=false"])
    >>> import tempfile; run_training(s.replace({"observe.progress": "none"}), tempfile.mkdtemp() + "/run", quiet=True)
    0
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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
