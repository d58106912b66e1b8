"""The result of a search: `best.toml`, the race in the report, the lines printed at the end.

`best.toml` is the winner's complete strategy (resolved: every key explicit, so `diff` against
`regimen train CONFIG --print-config` shows exactly what tune changed), with CONFIG's own
budget, cadences and observe keys; `regimen train DIR/best.toml` trains it. A comment block at
the top says where it came from.

Example:
    >>> format_amount(48_000, 64)
    '3,072,000 tokens'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regimen import rundir
from regimen.errors import UserError
from regimen.search.plan import Candidate

BEST_FILE = "best.toml"


def format_amount(samples: float, per_sample: int) -> str:
    """Samples as tokens for sequence models (`per_sample > 1`), else as samples."""
    return f"{samples * per_sample:,.0f} tokens" if per_sample > 1 else f"{samples:,.0f} samples"


@dataclass
class Outcome:
    """Where a candidate got to: its loss at each rung, the rung it stopped at and why, its compute."""

    candidate: Candidate
    lr: float | None
    losses: list[float | None]
    stopped: str
    compute: float
    run_dir: Path | None


def outcomes(search: Any) -> tuple[list[Outcome], Candidate | None, dict[str, float]]:
    """Every candidate's outcome, the winner (None when no candidate finished), and the compute of each phase (samples)."""
    plan = search.plan
    d = search.decisions()
    trials = search.race_ledger.done([search.rung_key(r, c) for r in range(len(plan.rungs)) for c in plan.candidates])
    phases: dict[str, float] = {"probe": sum(float(t.user_attrs.get("samples", 0)) for t in search.probe_ledger.trials())}
    for r in range(len(plan.rungs)):
        phases[f"rung {r}"] = sum(float(t.user_attrs.get("samples", 0)) for k, t in trials.items() if k.startswith(f"rung{r}:"))
    # Work lost to crashes and re-runs is compute too.
    for t in search.race_ledger.trials():
        if t.state.name == "FAIL" and t.user_attrs.get("samples"):
            phases["lost (crashed runs)"] = phases.get("lost (crashed runs)", 0.0) + float(t.user_attrs["samples"])
    top = len(plan.rungs) - 1
    results: list[Outcome] = []
    finals: list[tuple[float, int, Candidate]] = []
    for i, c in enumerate(plan.candidates):
        losses: list[float | None] = []
        last, error, run_dir, compute = -1, None, None, 0.0
        for r in range(len(plan.rungs)):
            t = trials.get(search.rung_key(r, c))
            if t is None:
                losses.append(None)
                continue
            losses.append(t.value)
            last, compute = r, compute + float(t.user_attrs.get("samples", 0))
            error = t.user_attrs.get("error")
            run_dir = Path(t.user_attrs["run_dir"]) if t.user_attrs.get("run_dir") else run_dir
        final = losses[top]
        if last == top and final is not None and math.isfinite(final):
            finals.append((final, i, c))
        lr = None
        if d is not None:
            lr = float(f"{d.lrs[c.family] * c.lr_factor:.3g}") if c.lr_factor is not None else float(c.keys.get("optimizer.lr", 0))
        results.append(Outcome(c, lr, losses, _why(search, c, last, error, trials), compute, run_dir))
    finals.sort(key=lambda x: (x[0], x[1]))
    winner = finals[0][2] if finals else None
    for o in results:
        if winner is not None and o.candidate.name == winner.name:
            o.stopped = "best: lowest loss at the full budget"
    return results, winner, phases


def _why(search: Any, c: Candidate, last: int, error: str | None, trials: dict[str, Any]) -> str:
    plan = search.plan
    if last < 0:
        return "not run"
    if error:
        return f"failed at rung {last}: {error}"
    if last == len(plan.rungs) - 1:
        others = sorted((t.value, k) for k, t in trials.items() if k.startswith(f"rung{last}:"))
        rank = next(i for i, (_, k) in enumerate(others, 1) if k == search.rung_key(last, c))
        if last > 0 and search.rung_key(last - 1, c) not in trials:
            return f"ran the full budget as the lower-LR neighbour of a finalist: {rank} of {len(others)}"
        return f"ran the full budget: {rank} of {len(others)}"
    ranked = sorted((t.value, k) for k, t in trials.items() if k.startswith(f"rung{last}:"))
    rank = next(i for i, (_, k) in enumerate(ranked, 1) if k == search.rung_key(last, c))
    return f"stopped after rung {last}: {rank} of {len(ranked)}, the best {plan.keep[last + 1]} went on"


def write_best(search: Any, winner: Candidate, loss: float) -> Path:
    """`best.toml`: the winner's complete strategy with CONFIG's budget, cadences and observe keys."""
    s = search.candidate_strategy(winner, None)
    header = [
        "# regimen tune: the best of "
        f"{len(search.plan.candidates)} candidates ({winner.name}), validation loss {loss:.4f} at the full budget.",
        f"# Search: {search.out}. Train it with: regimen train {search.out / BEST_FILE}",
        "",
    ]
    path = search.out / BEST_FILE
    rundir.write_atomic(path, "\n".join(header) + s.resolve().to_toml())
    return path


def write_result(search: Any) -> tuple[Path, Path, list[Outcome], Candidate]:
    """best.toml and report.html of a finished search; a search where every candidate failed is a `UserError`.

    Every process that worked on the search writes them when it ends, one at a time (a lock in
    `--out`): the same files, from the same study.
    """
    from regimen.search.study import file_lock

    with file_lock(search.out / ".result-lock"):
        return _write_result(search)


def _write_result(search: Any) -> tuple[Path, Path, list[Outcome], Candidate]:
    from regimen import figures, report
    from regimen.report_html import RaceRow, race_section

    results, winner, phases = outcomes(search)
    if winner is None:
        errors = [o.stopped for o in results if o.stopped.startswith("failed")]
        raise UserError(f"tune: no candidate finished the race ({errors[0] if errors else 'no result'}); see the runs under {search.out}")
    loss = next(o.losses[-1] for o in results if o.candidate.name == winner.name)
    assert loss is not None
    best = write_best(search, winner, loss)
    per = search.per_sample
    amount = "tokens" if per > 1 else "samples"
    rows = [
        RaceRow(
            o.candidate.name,
            _describe(o),
            list(o.losses),
            o.stopped,
            o.compute * per,
            o.candidate.name == winner.name,
        )
        for o in results
    ]
    d = search.decisions()
    notes = {"probe": f"{len(search.probing())} LR range test(s); batch: {d.batch_reason if d else ''}"}
    phase_rows = [(name, value * per, notes.get(name, "")) for name, value in phases.items()]
    measured = [o for o in results if o.run_dir is not None and (o.run_dir / rundir.METRICS_FILE).is_file()]
    run_dirs = [o.run_dir for o in measured if o.run_dir is not None]
    unit = str((rundir.read_summary(run_dirs[0]) or {}).get("loss_unit", "nats")) if run_dirs else "nats"
    with figures.plot_style():
        figure = figures.race_figure(
            [b * per for b in search.plan.rungs], [(r.name, r.losses) for r in rows], search.out, amount, unit, winner.name
        )
    section = race_section([b * per for b in search.plan.rungs], rows, phase_rows, unit, amount, figure)
    base = search.base.resolve().flat()
    names = [o.candidate.name for o in measured]
    html = report.write_report(run_dirs, search.out, base=base, title="regimen tune", extra=[section], names=names)
    return best, html, results, winner


def _describe(o: Outcome) -> str:
    keys = ", ".join(f"{k}={v}" for k, v in o.candidate.keys.items() if k != "optimizer.lr")
    return f"{keys}; lr {o.lr:.3g}; measured by {o.candidate.kind}" if o.lr else f"{keys}; measured by {o.candidate.kind}"
