"""`python -m benchmarks [--quick] [--only NAME ...] [--write]`: run the benchmark suite.

Each benchmark is a module of this package. Those that expose `run(quick: bool) -> list[Table]`
run in this process and return tables; any other script (one that only prints) runs as
`python -m benchmarks.NAME [--quick]` and its output becomes its section as it is. With
`--write`, each benchmark's section of `BENCHMARKS.md` is replaced between its marker comments,
so a rerun of one benchmark updates that section and leaves the others alone.

    python -m benchmarks --quick                      # every benchmark, short (a smoke test)
    python -m benchmarks --only loop_speed --write    # one benchmark, full length, into BENCHMARKS.md
    make bench                                        # the whole suite into BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

from benchmarks.common import BENCHMARKS_MD, ROOT, Section, machine, set_threads, update_markdown

# The suite, in the order of BENCHMARKS.md. Modules that are missing are skipped with a note,
# so the runner keeps working while benchmarks are added.
SUITE = (
    "loop_speed",
    "feature_cost",
    "hf_fit",
    "time_to_loss",
    "profile_step",
    "optimizer_step",
    "own_optimizers",
    "data_pipeline",
    "startup",
    "noise_overhead",
    "batch_strategies",
    "distributed",
    "checkpoint_io",
    "prepare_speed",
    "bpe_vs_bytes",
    "plan_accuracy",
    "memory_strategies",
)


def _has_tables_api(module: object) -> bool:
    """True for a module whose `run` takes exactly `quick` (the table protocol)."""
    run = getattr(module, "run", None)
    if not callable(run):
        return False
    return list(inspect.signature(run).parameters) == ["quick"]


def run_one(name: str, quick: bool) -> Section:
    """Run one benchmark; its tables, or its printed output, become a section."""
    start = time.perf_counter()
    section = Section(name, machine=machine())
    module = importlib.import_module(f"benchmarks.{name}")
    if _has_tables_api(module):
        section.tables = module.run(quick)  # type: ignore[attr-defined]
    else:
        # A script that prints: run it as its own process, pass --quick when it takes one.
        source = (ROOT / "benchmarks" / f"{name}.py").read_text()
        args = ["--quick"] if quick and "--quick" in source else []
        if "--threads" in source and "BENCH_THREADS" in os.environ:
            args += ["--threads", os.environ["BENCH_THREADS"]]
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode}:\n{proc.stderr.strip()[-3000:]}")
        section.text = f"`python -m benchmarks.{name} {' '.join(args)}`".replace(" `", "`") + f"\n\n{proc.stdout.strip()}"
    section.seconds = time.perf_counter() - start
    return section


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats: a smoke test, noisier numbers")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=SUITE, help=f"run only these ({', '.join(SUITE)})")
    parser.add_argument("--write", action="store_true", help=f"update {BENCHMARKS_MD.name} (each benchmark's section in place)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every measurement (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)  # the worker processes read it too
    set_threads()
    names = args.only or list(SUITE)
    print(machine(), flush=True)
    failed: list[str] = []
    for name in names:
        if not (ROOT / "benchmarks" / f"{name}.py").exists():
            print(f"\n## {name}\n\n(not written yet: skipped)", flush=True)
            continue
        print(f"\n## {name}\n", flush=True)
        try:
            section = run_one(name, args.quick)
        except Exception:
            failed.append(name)
            print(f"FAILED:\n{traceback.format_exc()}", flush=True)
            continue
        print(section.markdown().split("\n", 2)[2], flush=True)  # without the repeated heading
        if args.write:
            update_markdown([section])  # after each benchmark: a later failure loses nothing
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
