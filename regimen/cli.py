"""The command line: `regimen train / compare / lr-find / plan / report / prepare / sample`.

Nothing here imports torch at module level, so `regimen --help` answers at once; each
subcommand imports what it needs when it runs. A `UserError` anywhere becomes one line on
stderr and exit code 2, never a traceback.

Example:
    $ regimen train                                   # the built-in default task
    $ regimen train examples/mlp.toml optimizer.lr=3e-3 --print-config
    $ regimen train --nproc 2 parallel.mode=fsdp      # torchrun, 2 processes
    $ regimen compare --vary optimizer.name=sgd,adam  # a grid of strategies, then report.html
    $ regimen lr-find optimizer.name=sgd              # an LR range test
    $ regimen prepare texts/ --out tokens --tokenizer bpe:8192   # text -> tokens:DIR
    $ regimen sample runs/gpt --prompt "def "         # text from a trained GPT
    $ regimen plan --devices 8 --device h100-sxm      # will it fit, how long will it take
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

from regimen.errors import UserError


def _add_strategy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a strategy TOML file (default: the built-in task)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any strategy key, e.g. optimizer.lr=3e-4")


def split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse cannot tell `CONFIG` from a first override; a value with '=' is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith(".toml"):
        return None, [config, *overrides]
    return config, overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regimen",
        description="Train neural networks with an explicit strategy: optimizer x LR schedule x batch-size schedule x parallelism.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="run one strategy",
        description="Run one strategy (with no CONFIG: the built-in byte-level GPT on Python's standard library).",
    )
    _add_strategy_args(train)
    train.add_argument("--run-dir", help="where to write the run (default: runs/<time>)")
    train.add_argument(
        "--resume", metavar="auto|PATH", help="continue from the newest complete checkpoint of the run directory, or from PATH"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing run directory that regimen made (a user's own files in it are kept)"
    )
    train.add_argument(
        "--allow-change",
        action="store_true",
        help="with --resume: continue with a strategy that differs from the run's in more than the budget, cadences and "
        "observe keys (the change is recorded)",
    )
    train.add_argument("--nproc", type=int, default=None, help="start N processes with torchrun on this machine")
    train.add_argument(
        "--max-restarts", type=int, default=0, help="with --nproc: restart the workers this many times after a failure (elastic)"
    )
    train.add_argument("--print-config", action="store_true", help="print the fully resolved strategy and exit")

    compare = sub.add_parser(
        "compare",
        help="run several strategies on the same task and compare them",
        description=(
            "Run a grid of strategies (--vary) or the [[strategies]] of a TOML file on the same model, data and seed, "
            "each in its own run directory under --out, then write report.html. With no CONFIG and no --vary: the classic "
            "comparison (GD, SGD, momentum, AdaGrad, RMSprop, Adam; constant, polynomial, cosine LR; fixed and random batch) "
            "on the built-in MLP task. Re-running the same command skips finished runs and resumes unfinished ones."
        ),
    )
    _add_strategy_args(compare)
    compare.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="section.key=v1,v2",
        help="try each value of a key (repeat for a grid, the cartesian product); TOML values, e.g. optimizer.betas=[0.9,0.95],[0.9,0.99]",
    )
    compare.add_argument(
        "--out", metavar="DIR", help="where the runs and the report go (default: compare/<time>, or the last one with the same plan)"
    )
    compare.add_argument("--jobs", type=int, metavar="N", help="train N runs at once, in subprocesses sharing the cores (default: 1)")
    compare.add_argument("--nproc", type=int, metavar="N", help="each run on N processes (torchrun, one per device)")
    compare.add_argument(
        "--executor", default="local", choices=["local", "inline", "slurm"], help="where runs train: processes here, this process, or Slurm"
    )
    compare.add_argument(
        "--slurm", action="append", default=[], metavar="key=value", help="submitit parameters, e.g. slurm_partition=gpu timeout_min=60"
    )
    compare.add_argument("--target-loss", type=float, metavar="X", help="the loss for the report's time-to-target column")
    compare.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")

    lr_find = sub.add_parser(
        "lr-find",
        help="find a learning rate with an LR range test",
        description=(
            "LR range test: train with the LR growing exponentially from --min to --max over --steps steps, stop when the "
            "loss diverges, plot the smoothed loss against the LR, and print the suggested optimizer.lr."
        ),
    )
    _add_strategy_args(lr_find)
    lr_find.add_argument("--min", type=float, default=1e-7, dest="min_lr", metavar="LR", help="the first LR (default: 1e-7)")
    lr_find.add_argument("--max", type=float, default=10.0, dest="max_lr", metavar="LR", help="the last LR (default: 10)")
    lr_find.add_argument("--steps", type=int, default=100, help="steps of the sweep (default: 100)")
    lr_find.add_argument("--out", metavar="DIR", help="where lr_find.png and lr_find.json go (default: runs/lr-find-<time>)")

    plan = sub.add_parser(
        "plan",
        help="will it fit, how long will it take, and what to change",
        description=(
            "Predict the per-device peak memory (parameters, gradients, optimizer state, activations, the rest) and the time "
            "of a step and of the whole budget, for the strategy as given and for the parallel modes, activation "
            "checkpointing, CPU offload and micro-batch sizes that matter; recommend the fastest that fits."
        ),
    )
    _add_strategy_args(plan)
    plan.add_argument("--devices", metavar="N", help="devices (processes on a CPU) to spread the run over (default: 1)")
    plan.add_argument(
        "--device", metavar="cpu|cuda|NAME", help="this machine's cpu or cuda, or a known accelerator such as h100-sxm (see docs/plan.md)"
    )
    plan.add_argument("--memory", metavar="GiB", help="memory per device in GiB (default: what the device has available)")
    plan.add_argument("--calibrate", action="store_true", help="run a few real steps here and correct the predictions with them")
    plan.add_argument("--apply", metavar="OUT.toml", help="write the recommended strategy to a new file for `regimen train`")

    report = sub.add_parser(
        "report",
        help="make the HTML report of runs",
        description="Make the HTML report (plots and a table) of one or more run directories.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="where to write report.html (default: the run directory, or ./report)")
    report.add_argument("--target-loss", type=float, help="the loss for the time-to-target column")
    _add_data_commands(sub)

    from regimen.search.command import add_parser as add_tune

    add_tune(sub)
    return parser


def _add_data_commands(sub: Any) -> None:
    """`prepare` (text -> tokens) and `sample` (a trained GPT -> text)."""
    prepare = sub.add_parser(
        "prepare",
        help="turn text, jsonl, parquet or a saved dataset into tokens for data.source = tokens:DIR",
        description=(
            "Read text files and directories of them, .jsonl (a field), .parquet (a column) or a dataset saved with datasets' "
            "save_to_disk; split them into train and validation by document (deterministic, by content); encode them with bytes, "
            "a byte-level BPE trained on the training split, or a tokenizer.json, on every core; write train.bin, val.bin, "
            "tokenizer.json and meta.json into DIR. A rerun with unchanged sources and options does nothing. See docs/data.md."
        ),
    )
    prepare.add_argument("sources", nargs="+", metavar="SOURCE", help="a text, .jsonl or .parquet file, or a directory")
    prepare.add_argument("--out", required=True, metavar="DIR", help="the tokens directory to write (new, or an earlier prepare output)")
    prepare.add_argument(
        "--tokenizer", default="bytes", metavar="bytes|bpe:VOCAB|PATH", help="bytes (default), bpe:VOCAB to train one, or a tokenizer.json"
    )
    prepare.add_argument("--field", default="text", help="the jsonl field / parquet or dataset column holding the text (default: text)")
    prepare.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="share of the text for validation (default: 0.1)")
    prepare.add_argument("--jobs", type=int, metavar="N", help="encoding processes (default: every usable core)")

    sample = sub.add_parser(
        "sample",
        help="write text with a trained GPT",
        description=(
            "Generate text with the built-in GPT of a run directory, through the run's tokenizer, from model.safetensors "
            "(else the newest checkpoint, or --checkpoint). The same --seed gives the same text."
        ),
    )
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("--prompt", default="", help="the text to continue (default: none, a new document)")
    sample.add_argument("--tokens", type=int, default=200, metavar="N", help="tokens to generate (default: 200)")
    sample.add_argument("--temperature", type=float, default=0.8, metavar="T", help="softmax temperature; 0 = most likely (default: 0.8)")
    sample.add_argument("--top-k", type=int, default=200, metavar="K", help="sample among the K most likely tokens; 0 = all (default: 200)")
    sample.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampling (default: 0)")
    sample.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory (step-N) instead of model.safetensors")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# Each subcommand is `run(args) -> exit code` in the module that owns it, imported only when it
# runs (so `regimen --help` never imports torch).
COMMANDS = {
    "train": "regimen.runner",
    "compare": "regimen.compare",
    "lr-find": "regimen.lr_find",
    "report": "regimen.report",
    "prepare": "regimen.prepare",
    "sample": "regimen.sample",
    "plan": "regimen.plan",
    "tune": "regimen.search.command",
}


def _one_line_warnings() -> None:
    """regimen's own warnings (a setting ignored, a size rounded) as one line each, like its errors."""
    package = str(Path(__file__).parent)
    default = warnings.showwarning
    if getattr(default, "regimen", False):
        return  # installed by an earlier call in this process

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if filename.startswith(package):
            print(f"regimen: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show.regimen = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `regimen` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _one_line_warnings()
    parser = build_parser()
    commands = _subparsers(parser)
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
    # Options may come after the overrides (`regimen train x.y=1 --run-dir D`): intermixed.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    if hasattr(args, "config"):
        args.config, args.overrides = split_config(args)
    try:
        module = importlib.import_module(COMMANDS[args.command])
        return int(module.run(args))
    except UserError as e:
        print(f"regimen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("regimen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
