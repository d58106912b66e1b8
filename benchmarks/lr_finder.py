"""How far the LR range test's suggestion is from the best LR of a sweep, per family and task.

For each task (benchmarks/tune_common.py) and each family of tune's default space: the range
test exactly as tune's probe runs it (`regimen.search.plan.PROBE_STEPS` steps from
`PROBE_MIN_LR` to `PROBE_MAX_LR`), and a sweep of full runs at LRs half a decade apart; the best
LR is the sweep's lowest final validation loss. Each suggestion rule is reported as the ratio
suggestion / best LR (1 is perfect; the sweep's resolution is a factor 3.16, so a ratio within
[0.56, 1.78] is as good as the sweep can tell). Rules:

- `steepest`: the LR of steepest descent of the smoothed loss (lr-find's suggestion);
- `min/10`, `min/5`, `min/3`: the LR at the minimum of the smoothed loss over 10 (fastai's older
  rule), 5 (tune's probe: `regimen.search.plan.PROBE_DIVISOR`) and 3;
- `sqrt(steepest x min/10)`: the geometric mean of the two lr-find prints.

Losses and LRs only (no timing). `--json FILE` keeps every curve and sweep for re-analysis.

    python -m benchmarks.lr_finder              # about an hour on 2 CPU cores (the sweeps)
    python -m benchmarks.lr_finder --quick      # the MLP task, half its budget, three families
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.tune_common import TASKS, full_run, task_args

RULES = ("steepest", "min/10", "min/5", "min/3", "sqrt(steepest x min/10)")
SWEEP = [10 ** (k / 2) for k in range(-10, 2)]  # 1e-5 ... 3.16, half a decade apart


def suggestions(result: Any) -> dict[str, float | None]:
    low, steep = result.minimum, result.steepest
    rules = {"steepest": steep, **{f"min/{d}": low / d if low else None for d in (10, 5, 3)}}
    rules["sqrt(steepest x min/10)"] = math.sqrt(steep * low / 10) if low and steep else None
    return rules


def run(quick: bool, out: Path, only: list[str] | None) -> dict[str, Any]:
    from regimen.lr_find import Sweep, range_test
    from regimen.search.plan import PROBE_MAX_LR, PROBE_MIN_LR, PROBE_STEPS
    from regimen.search.space import DEFAULT_FAMILIES
    from regimen.strategy import Strategy
    from regimen.task import build_task

    found: dict[str, Any] = {}
    tasks = only or (["mlp"] if quick else list(TASKS))
    families = list(DEFAULT_FAMILIES)[:3] if quick else list(DEFAULT_FAMILIES)
    for task in tasks:
        args = task_args(task, quick, out / task, space=False)
        config = next((a for a in args if a.endswith(".toml")), None)
        base = Strategy.from_cli(config, [a for a in args if "=" in a])
        for family in families:
            s = base.replace(DEFAULT_FAMILIES[family])
            result = range_test(build_task(s.resolve()), s, Sweep(min_lr=PROBE_MIN_LR, max_lr=PROBE_MAX_LR, steps=PROBE_STEPS))
            losses = {}
            for lr in SWEEP:
                try:
                    loss = full_run(s.replace({"optimizer.lr": lr}), out / task / family / f"lr{lr:.3g}")
                except Exception:  # diverged: no loss at this LR
                    loss = math.inf
                losses[lr] = loss if math.isfinite(loss) else math.inf
            best = min(losses, key=lambda k: losses[k])
            found[f"{task}/{family}"] = {"best": best, "sweep": losses, "rules": suggestions(result), "curve": result.to_json()}
    return found


def table(found: dict[str, Any]) -> str:
    lines = [
        "| task / family | best LR (sweep) | " + " | ".join(f"{r} / best" for r in RULES) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in RULES) + " |",
    ]
    for key, f in found.items():
        cells = []
        for r in RULES:
            v = f["rules"][r]
            cells.append(f"{v / f['best']:.2g}" + (" (>2x off)" if abs(math.log2(v / f["best"])) > 1 else "") if v else "-")
        lines.append(f"| {key} | {f['best']:.3g} | " + " | ".join(cells) + " |")
    summary = []
    for r in RULES:
        logs = [abs(math.log2(f["rules"][r] / f["best"])) for f in found.values() if f["rules"][r]]
        if logs:
            within = sum(v <= 1 for v in logs)
            summary.append(f"{r}: within 2x of the best in {within} of {len(logs)}, median factor {2 ** sorted(logs)[len(logs) // 2]:.2g}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the MLP task, half its budget, three families")
    parser.add_argument("--only", nargs="*", choices=list(TASKS))
    parser.add_argument("--out", default="runs/lr_finder")
    parser.add_argument("--json", help="write every curve and sweep here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    found = run(args.quick, Path(args.out), args.only)
    if args.json:
        Path(args.json).write_text(json.dumps({k: {**v, "sweep": {str(a): b for a, b in v["sweep"].items()}} for k, v in found.items()}))
    print(table(found))
    print(f"\ncommand: python -m benchmarks.lr_finder{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
