"""Two `regimen tune` processes on one study against one, and the search's own bookkeeping.

The same search (a task of benchmarks/tune_common.py, the MLP by default; the default space and budget)
run by one worker (`regimen tune --jobs 1`, one thread), then by two processes started together
on the same `--out` (so the same SQLite study), one thread each: the two-process wall time
(the later one to finish) over the one-worker wall time (target: at most 0.6), and whether both
chose the same strategy (best.toml without its comment header).

Bookkeeping (target: below 2% of the wall time): the one-worker search's wall time less the time
its units spent in their runs (each unit's `seconds`, which include starting each
`regimen train` process), i.e. the storage, the scheduling and the report. Start-up of the run
processes is shown apart: the units' seconds less the runs' own training time.

This measures wall time: run it on a quiet machine (the lead does).

    python -m benchmarks.tune_scale              # about 20-30 minutes on 2 CPU cores
    python -m benchmarks.tune_scale --quick      # half the budget, a small space
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT
from benchmarks.tune_common import env, open_search, regimen, task_args


def body(out: Path) -> str:
    return "\n".join(line for line in (out / "best.toml").read_text().splitlines() if not line.startswith("#"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the budget and a small space (a smoke test)")
    parser.add_argument("--task", default="mlp", choices=["gpt", "mlp", "mlp-1pass", "cnn"])
    parser.add_argument("--out", default="runs/tune_scale")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    one, two = root / "one", root / "two"
    common = task_args(args.task, args.quick, root)
    _, wall_one = regimen("tune", *common, "--out", str(one))
    two.mkdir(parents=True)
    cmd = [sys.executable, "-m", "regimen", "tune", *common, "--out", str(two)]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(err[-3000:])
    wall_two = time.perf_counter() - start

    from regimen.rundir import read_summary

    search = open_search(one)
    trials = [*search.probe_ledger.trials(), *search.race_ledger.trials()]
    units = sum(float(t.user_attrs.get("seconds", 0)) for t in trials)
    training = 0.0
    for run_dir in [*one.glob("trials/*/*/"), *one.glob("probe/*/")]:
        summary = read_summary(run_dir) or {}
        training += float(summary.get("wall_time") or 0.0)
    print("| search | wall time (s) | ratio to one worker | same choice |")
    print("| --- | ---: | ---: | --- |")
    print(f"| one worker | {wall_one:.0f} | 1.00 | - |")
    print(f"| two processes, one study | {wall_two:.0f} | {wall_two / wall_one:.2f} | {'yes' if body(one) == body(two) else 'no'} |")
    print()
    print("| one worker's wall time | in units | of which training | run start-up | bookkeeping | bookkeeping share |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {wall_one:.0f} s | {units:.0f} s | {training:.0f} s | {units - training:.0f} s | {wall_one - units:.1f} s "
        f"| {(wall_one - units) / wall_one:.1%} |"
    )
    print(f"\ncommand: python -m benchmarks.tune_scale --task {args.task}{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
