"""tune's race replayed in one process at several budgets, against the grid: what each plan would choose.

For each task (benchmarks/tune_common.py) this reads the finished search of
`benchmarks/tune_quality.py` (its probe: the same LRs and batch for every budget), then for each
budget makes tune's plan (`regimen.search.plan.make_plan`: plain successive halving, or the
hedged final where the budget allows it) and replays the race with the engine's own promotion
rule (`regimen.search.plan.promote`), training each (candidate, rung) it needs once, from
scratch, at the rung's budget (a WSD run of that length is what tune's branch measures, a
constant-LR run what its prefix reads, a shorter cosine what its restart trains). The grid's
full runs are tune_quality's. Compute is counted as tune spends it (a trunk continues, a restart
does not). Losses and samples only: no timing.

    python -m benchmarks.tune_quality --only mlp     # first: the search, the grid, the default recipe
    python -m benchmarks.tune_policy --only mlp      # then: 3x and 6.33x replayed (seconds to minutes)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from benchmarks.tune_common import TASKS, full_run, open_search


def replay(search: Any, budget_x: float, task_out: Path, cache: dict[tuple[int, str], float]) -> dict[str, Any]:
    from regimen.search.plan import decay_fraction, make_plan, promote, unit_cost

    plan = make_plan(search.base, search.space, int(budget_x * search.plan.full))
    top = len(plan.rungs) - 1

    def value(r: int, c: Any) -> float:
        key = (plan.rungs[r], c.name)
        if key not in cache:
            where = task_out / "grid" / c.name if r == top else task_out / "replay" / f"{plan.rungs[r]}" / c.name
            try:
                cache[key] = full_run(search.candidate_strategy(c, None if r == top else plan.rungs[r]), where)
            except Exception:  # diverged or failed: a result, as in the race
                cache[key] = math.inf
        return cache[key]

    running = list(plan.candidates)
    history = [running]
    for r in range(1, len(plan.rungs)):
        ranked = sorted(running, key=lambda c: (value(r - 1, c), plan.candidates.index(c)))
        running = promote(plan, r, [c for c in ranked if math.isfinite(value(r - 1, c))])
        history.append(running)
    winner = min(running, key=lambda c: (value(top, c), plan.candidates.index(c)))
    spent, last = plan.probe_cost, dict[str, int]()
    for r, who in enumerate(history):
        for c in who:
            spent += unit_cost(c.kind, plan.rungs, r, decay_fraction(search.base, c), since=last.get(c.name, -1))
            last[c.name] = r
    return {"plan": plan, "winner": winner, "loss": value(top, winner), "spent": spent, "history": [len(h) for h in history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(TASKS), help="these tasks only")
    parser.add_argument(
        "--budgets", nargs="*", type=float, default=[3.0, 6.33], help="budgets, in full runs (6.33: the default for the default space)"
    )
    parser.add_argument("--out", default="runs/tune_quality", help="where tune_quality ran")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(
        "| task | budget | plan | tune's choice | its val loss | grid's best | tune / grid | within 1% | compute / grid "
        "| default recipe | not worse |"
    )
    print("| --- | --- | --- | --- | ---: | --- | ---: | --- | ---: | ---: | --- |")
    for name in args.only or list(TASKS):
        task_out = Path(args.out) / name
        search = open_search(min(task_out.glob("tune-*")))  # any of tune_quality's searches: the probe is the same
        grid = {c.name: full_run(search.candidate_strategy(c, None), task_out / "grid" / c.name) for c in search.plan.candidates}
        best = min(grid, key=lambda k: grid[k])
        default = full_run(search.base, task_out / "default")
        cache: dict[tuple[int, str], float] = {}
        for budget in args.budgets:
            got = replay(search, budget, task_out, cache)
            plan = got["plan"]
            shape = " -> ".join(map(str, got["history"])) + (" (hedged)" if plan.hedge else "")
            ratio = got["loss"] / grid[best]
            compute = got["spent"] / (len(grid) * plan.full)
            print(
                f"| {name} | {budget:g}x | {shape} | {got['winner'].name} | {got['loss']:.4f} | {best} {grid[best]:.4f} | {ratio:.4f} "
                f"| {'yes' if ratio <= 1.01 else 'no'} | {compute:.3f} | {default:.4f} | {'yes' if got['loss'] <= default else 'no'} |"
            )
    print(f"\ncommand: python -m benchmarks.tune_policy --budgets {' '.join(f'{b:g}' for b in args.budgets)}   (reads {args.out}/)")


if __name__ == "__main__":
    main()
