"""`regimen report`: the HTML report of one run or of a comparison, read from run directories.

Everything here is a pure function of the files a run directory holds (`regimen.rundir`), so a
report works the same on runs that finished, runs still going, and runs that died: a torn last
line of `metrics.jsonl` is ignored, what a resumed run redid replaces what it undid, and a run
without `summary.json` is shown as "running". The pieces live in their own modules:

- `regimen.rundir`: the run model (`Run`, `load_run`), readers and the summary;
- `regimen.ranking`: ranking, time to a target loss, the strategy diff (`compare_runs`);
- `regimen.figures`: the PNG figures;
- `regimen.report_html`: the page, built from the three above.

Example:
    >>> write_report(["runs/adam", "runs/sgd"], "report")          # doctest: +SKIP
    PosixPath('report/report.html')
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regimen import figures, report_html
from regimen.errors import UserError
from regimen.ranking import compare_runs, data_unit, loss_unit, unique_names
from regimen.rundir import REPORT_FILE, Run, check_location, flatten_strategy, load_run, os_reason, write_atomic


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    base: Mapping[str, Any] | None = None,
    target_loss: float | None = None,
    title: str | None = None,
    extra: Sequence[str] = (),
    names: Sequence[str] | None = None,
) -> Path:
    """Write `report.html` and its PNG figures into `out_dir`; return the report's path.

    Several runs make a comparison (ranked table, loss against steps / data / wall time,
    schedules, noise scale, strategy diff against `base`); a single run makes a one-run page
    (summary numbers, its plots, its strategy). The page is self-contained: inline CSS, images
    by relative path, no scripts and no network. `extra` HTML sections (a tune's race) follow
    the comparison's ranking; `names` replace the run directories' names (a tune's candidates).

    Example:
        >>> write_report(["runs/adam", "runs/sgd"], "report", target_loss=2.0)  # doctest: +SKIP
        PosixPath('report/report.html')
    """
    if not run_dirs:
        raise UserError("report: give at least one run directory")
    if target_loss is not None and not math.isfinite(target_loss):
        raise UserError(f"--target-loss = {target_loss}: must be a finite number")
    runs = [load_run(d) for d in run_dirs]
    if names is not None:
        for run, name in zip(runs, names, strict=True):
            run.name = name
    unique_names(runs)
    out = Path(out_dir)
    check_location(out, "report output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write(runs, out, base, target_loss, title, extra)
    except OSError as e:  # a full disk or a lost mount while drawing: the previous report stays whole
        raise UserError(f"could not write the report into {str(out)!r} ({os_reason(e)})") from None


def _write(
    runs: list[Run], out: Path, base: Mapping[str, Any] | None, target_loss: float | None, title: str | None, extra: Sequence[str] = ()
) -> Path:
    with figures.plot_style():
        if len(runs) == 1:
            run = runs[0]
            page = report_html.single_page(
                run,
                figures.single_figures(run, out, include_progress=True),
                unit=loss_unit(runs),
                data=data_unit(runs),
                base=flatten_strategy(base) if base is not None else None,
                target=target_loss,
                title=title or f"regimen run: {run.name}",
            )
            page = page.replace("<footer>", "".join(extra) + "<footer>", 1)
        else:
            page = _comparison(runs, out, base, target_loss, title or "regimen comparison", extra)
    path = out / REPORT_FILE
    write_atomic(path, page)
    return path


def _comparison(
    runs: list[Run], out: Path, base: Mapping[str, Any] | None, target: float | None, title: str, extra: Sequence[str] = ()
) -> str:
    c = compare_runs(runs, base, target)
    drawn = [figures.compare_loss_figure(runs, out, x, c.unit, c.winner) for x in ("step", c.data, "time")]
    drawn.append(figures.compare_schedule_figure(runs, out, c.data, c.winner))
    if any(r.has("noise_scale") for r in runs):
        drawn.append(figures.compare_noise_figure(runs, out, c.data))
    colours = {r.name: figures.style(i) for i, r in enumerate(runs)}
    return report_html.comparison_page(c, drawn, colours, title, extra)


def run(args: argparse.Namespace) -> int:
    """`regimen report RUN_DIR [RUN_DIR ...] [--out DIR] [--target-loss X]`; prints the report's path."""
    out = args.out if args.out is not None else (args.run_dirs[0] if len(args.run_dirs) == 1 else "report")
    path = write_report(args.run_dirs, out, target_loss=args.target_loss)
    print(path)
    return 0
