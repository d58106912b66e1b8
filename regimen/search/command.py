"""`regimen tune`: find the strategy for CONFIG's model and data within a compute budget.

    regimen tune [CONFIG.toml] [section.key=value ...] [--budget 3x | --budget-tokens N | --budget-minutes M]
                 [--space SPACE.toml] [--out DIR] [--jobs N] [--nproc N] [--storage URL]
                 [--executor local|slurm] [--slurm key=value ...] [--dry-run]

Every input is checked before anything is written or trained: a bad space, a budget too small
for one rung, an unreachable storage is one line and exit 2. Then the probe, the race, and the
result (`OUT/best.toml`, `OUT/report.html`, and the `regimen train OUT/best.toml` line). Running
the same command again continues the search where it stopped; several processes (on several
machines, with `--storage` and `--out` on shared storage) work on one search together.

Example:
    >>> parse_budget("3x", None, None), parse_budget(None, 1e6, None)
    (Budget(kind='x', amount=3.0), Budget(kind='tokens', amount=1000000.0))
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from regimen.errors import UserError
from regimen.search.engine import Budget, Search
from regimen.search.plan import format_plan, make_candidates
from regimen.search.space import default_space, read_space
from regimen.strategy import Strategy

DEFAULT_ROOT = Path("tune")


# The default budget: a third of the grid's compute (one full run per three candidates), at least
# 3x. A third is what the hedged final needs for the default space (19 candidates: 6.33x) and what
# it was measured at (docs/tune.md); plain halving at 3x chose strategies 8-105% worse than the grid's best.
MIN_DEFAULT_BUDGET = 3.0


def default_budget(candidates: int) -> float:
    """Full runs the search spends by default: a third of the grid's, at least 3.

    >>> default_budget(19), default_budget(4)
    (6.33, 3.0)
    """
    return max(MIN_DEFAULT_BUDGET, math.floor(candidates / 3 * 100) / 100)


def parse_budget(budget: str | None, tokens: float | None, minutes: float | None, candidates: int = 0) -> Budget:
    """The one budget given (`default_budget(candidates)` full runs when none is); a malformed or non-positive one is a `UserError`."""
    given = [(n, v) for n, v in (("--budget", budget), ("--budget-tokens", tokens), ("--budget-minutes", minutes)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{given[0][0]} and {given[1][0]}: give one budget")
    if tokens is not None:
        if not (math.isfinite(tokens) and tokens > 0):
            raise UserError(f"--budget-tokens = {tokens:g}: must be a number of tokens > 0")
        return Budget("tokens", float(tokens))
    if minutes is not None:
        if not (math.isfinite(minutes) and minutes > 0):
            raise UserError(f"--budget-minutes = {minutes:g}: must be a number of minutes > 0")
        return Budget("minutes", float(minutes))
    if budget is None:
        return Budget("x", default_budget(candidates))
    text = budget.strip().lower()
    try:
        amount = float(text[:-1] if text.endswith("x") else text)
    except ValueError:
        raise UserError(f"--budget {budget!r}: expected a multiple of one full run of CONFIG, e.g. 3x") from None
    if not (math.isfinite(amount) and amount > 0):
        raise UserError(f"--budget {budget!r}: must be > 0 (a multiple of one full run, e.g. 3x)")
    return Budget("x", amount)


def train_size_if_needed(base: Strategy) -> int | None:
    """The training set's size, read only for an epoch budget (the plan counts samples)."""
    if base.train.budget()[0] != "epochs":
        return None
    from regimen.data import load_source

    return len(load_source(base.data, base.model.context).train)


def make_search(args: argparse.Namespace) -> Search:
    """Everything `regimen tune` checks before it writes anything: CONFIG, the budget, the space, the plan, the executor."""
    from regimen.executors import make_executor

    base = Strategy.from_cli(args.config, args.overrides)
    space = read_space(args.space, base) if args.space else default_space(base)
    budget = parse_budget(args.budget, args.budget_tokens, args.budget_minutes, len(make_candidates(base, space)))
    nproc = args.nproc or 1
    size = train_size_if_needed(base)
    search = Search(base, space, budget, Path("."), executor=None, storage_url=args.storage, world=nproc, train_size=size)  # type: ignore[arg-type]
    search.out = Path(args.out) if args.out else DEFAULT_ROOT / search.fingerprint()
    if not args.dry_run:
        search.executor = make_executor(args.executor, slots=args.jobs or 1, nproc=nproc, folder=search.out / "slurm", slurm=args.slurm)
    return search


def run(args: argparse.Namespace) -> int:
    """`regimen tune`: check, probe, race, write best.toml and the report; prints the command that trains the winner."""
    search = make_search(args)
    if args.dry_run:
        if search.plan is None:
            print(f"regimen tune: --budget-minutes {search.budget.amount:g}: the rungs are planned after the probe measures the throughput")
        else:
            print(format_plan(search.plan, "tokens" if search.per_sample > 1 else "samples", search.per_sample))
        print(f"into {search.out}/, study {search.study_name} in {args.storage or f'sqlite:///{search.out}/tune.db'}")
        return 0
    search.open()

    def log(line: str) -> None:
        print(f"regimen tune: {line}", file=sys.stderr, flush=True)

    search.log = log
    what = f"{len(search.plan.candidates)} candidates" if search.plan else "the candidates"
    log(f"{what}, budget {search.budget.describe()}, into {search.out}/ (storage {search.storage_url}, {args.jobs or 1} job(s))")
    start = time.perf_counter()
    try:
        search.run(args.jobs or 1)
    finally:
        search.close()
    from regimen.search.result import format_amount, write_result

    best, html, results, _ = write_result(search)
    spent = sum(o.compute for o in results)
    print(f"regimen tune: done in {time.perf_counter() - start:.0f} s; the race spent {format_amount(spent, search.per_sample)}:")
    for o in sorted(results, key=lambda o: (o.losses[-1] is None, o.losses[-1] or 0.0)):
        shown = next((f"{v:.4f}" for v in reversed(o.losses) if v is not None and math.isfinite(v)), "-")
        print(f"  {o.candidate.name:<28} {shown:>8}  {o.stopped}")
    print(f"report: {html}")
    print(f"best:   {best}")
    print(f"regimen train {best}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The `regimen tune` subcommand's arguments (cli.build_parser calls this)."""
    tune = sub.add_parser(
        "tune",
        help="find the best strategy for a task within a compute budget",
        description=(
            "Probe each family's LR (LR range test) and the gradient noise scale, race the candidates by successive halving "
            "(WSD runs cooled down on branches), and write OUT/best.toml and OUT/report.html. Re-running the same command "
            "continues the search; several processes on one --storage work on one search."
        ),
    )
    tune.add_argument("config", nargs="?", help="a strategy TOML file (default: the built-in task)")
    tune.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any strategy key of CONFIG")
    tune.add_argument(
        "--budget",
        metavar="Nx",
        help="the search's compute as a multiple of one full run of CONFIG (default: a third of the grid's, at least 3x)",
    )
    tune.add_argument("--budget-tokens", type=float, metavar="N", help="the search's compute in tokens (samples for non-sequence data)")
    tune.add_argument("--budget-minutes", type=float, metavar="M", help="the search's compute in minutes (via the probe's throughput)")
    tune.add_argument("--space", metavar="SPACE.toml", help="families and ranges to search (default: the built-in space; see docs/tune.md)")
    tune.add_argument("--out", metavar="DIR", help="where the search writes (default: tune/<fingerprint of the search>)")
    tune.add_argument("--jobs", type=int, metavar="N", help="train N units at once in this process, the cores split between them")
    tune.add_argument("--nproc", type=int, metavar="N", help="each run on N processes (torchrun, one per device)")
    tune.add_argument("--storage", metavar="URL", help="Optuna storage (default: sqlite:///OUT/tune.db; journal:PATH: a shared file)")
    tune.add_argument(
        "--executor", default="local", choices=["local", "inline", "slurm"], help="where runs train: processes here, this process, or Slurm"
    )
    tune.add_argument("--slurm", action="append", default=[], metavar="key=value", help="submitit parameters, e.g. slurm_partition=gpu")
    tune.add_argument("--dry-run", action="store_true", help="print the candidates, the rungs and the compute of each phase, and exit")
