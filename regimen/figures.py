"""The figures of regimen's reports: loss, schedules, noise scale, as PNG files.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot: no global figure state, and no backend switch that would disturb a user's interactive
session when `regimen.fit` draws its plots at the end of a run. Non-finite values (a diverged
step) are left out of the plots instead of breaking them.

Example:
    >>> from regimen.rundir import load_run
    >>> with plot_style():                                           # doctest: +SKIP
    ...     files = single_figures(load_run("runs/adam"), Path("runs/adam"), include_progress=False)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regimen.ranking import DataUnit, data_unit, loss_unit, rank_runs
from regimen.rundir import Run

# Okabe & Ito's colour-blind-safe palette, ordered so that the first runs get the colours that
# stay readable as thin lines on white (yellow last). Past eight runs the line style changes.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (6, 1.5, 1, 1.5, 1, 1.5)))
DPI = 110


@dataclass(frozen=True)
class FigureFile:
    """A PNG written beside the report: its file name, caption and pixel size."""

    file: str
    caption: str
    alt: str
    width: int
    height: int


def style(i: int) -> tuple[str, Any]:
    """The (colour, line style) of the i-th run, the same in every figure and in the table."""
    return PALETTE[i % len(PALETTE)], LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]


def plot_style() -> Any:
    import matplotlib

    return matplotlib.rc_context(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.titleweight": "bold",
            "axes.labelsize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "grid.linewidth": 0.6,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "figure.facecolor": "white",
            "savefig.facecolor": "white",
        }
    )


def _figure(width: float, height: float, ncols: int = 1, sharex: bool = False) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(1, ncols, squeeze=False, sharex=sharex)[0])
    return fig, axes


def _save(fig: Any, out_dir: Path, file: str, caption: str, alt: str) -> FigureFile:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = out_dir / file
    # Write then rename: a report open in a browser never shows half a PNG while it is redrawn.
    tmp = path.with_name(f".{file}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
    width, height = (round(float(v)) for v in fig.get_size_inches() * DPI)
    return FigureFile(file, caption, alt, width, height)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#59636e")


def _eng_axis(ax: Any, unit: str) -> None:
    # 12,000,000 tokens reads better as "12M" than as "1.2" with a "1e7" in the corner.
    if unit in ("samples", "tokens") and ax.lines:
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _entropy_line(ax: Any, entropy: float) -> None:
    """The data's unigram entropy: the loss of a model that ignores context, a line to beat."""
    ax.axhline(entropy, color="#59636e", lw=1, ls=":", zorder=1)
    ax.text(0.995, entropy, "unigram entropy", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8, color="#59636e")


def _x_label(unit: str) -> str:
    return {"step": "steps", "samples": "samples", "tokens": "tokens", "time": "wall time (s)"}[unit]


def _loss_ylim(all_values: Sequence[Sequence[float]], floor: float | None = None) -> tuple[float, float] | None:
    """Y limits that show every run's curve but not a diverged run's spike to 1e4.

    `floor` (the unigram entropy) is kept in view: how far above it a model is matters.
    """
    values = [v for vs in all_values for v in vs]
    if not values:
        return None
    lo, hi = min(values), max(values)
    if floor is not None:
        lo = min(lo, floor)
    curves = [sorted(vs) for vs in all_values if vs]
    start = sorted(vs[0] for vs in all_values if vs)[len(curves) // 2]
    # The typical run's 90th percentile, so that a loss that only rises is seen too.
    high = sorted(c[int(0.9 * (len(c) - 1))] for c in curves)[(len(curves) - 1) // 2]
    # Room for half the typical drop above the typical start: ordinary curves fit whole, while
    # a run that blew up leaves through the top instead of flattening every other curve.
    top = min(hi, max(start + 0.5 * (start - lo), high))
    span = (top - lo) or abs(top) or 1.0
    return lo - 0.04 * span, top + 0.06 * span


def _spans(values: Sequence[float], ratio: float) -> bool:
    """Whether the positive `values` span more than `ratio` times (then a log axis reads better)."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) > ratio * min(positive)


def _scale_y(ax: Any, values: Sequence[float], log: bool) -> None:
    """A log y axis, or a linear one from 0 (batch sizes and LRs are compared with zero)."""
    if log:
        ax.set_yscale("log")
    elif values:
        ax.set_ylim(bottom=0, top=max(values) * 1.08 or 1.0)


def _legend_grid(labels: Sequence[str], width_in: float) -> tuple[int, int]:
    """(columns, rows) of a legend below a figure `width_in` wide."""
    if not labels:
        return 1, 0
    # As many columns as the longest label allows (DejaVu Sans at 9 pt: about 5.3 pt a
    # character, plus the line sample and the gap).
    per = max(len(label) for label in labels) * 5.3 + 45
    ncols = max(1, min(len(labels), int(width_in * 72 // per)))
    return ncols, -(-len(labels) // ncols)


def _height(plot_in: float, labels: Sequence[str], width_in: float) -> float:
    """Figure height: the plot area plus one line per legend row, so many runs never squash it."""
    return plot_in + 0.2 * _legend_grid(labels, width_in)[1]


def _legend(fig: Any, handles: list[Any], labels: list[str], width_in: float) -> None:
    if not handles:
        return
    n = len(labels)
    ncols, rows = _legend_grid(labels, width_in)
    # Matplotlib fills a legend column by column; reorder so that it reads (in rank order) row
    # by row, like text.
    order = [r * ncols + c for c in range(ncols) for r in range(rows) if r * ncols + c < n]
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center", ncols=ncols)


def _single_loss_figure(run: Run, out_dir: Path, unit: str) -> FigureFile:
    """loss.png: train and val loss against steps, the LR on a twin axis."""
    fig, (ax,) = _figure(11.0, 4.8)
    train, val = run.series("loss"), run.series("val_loss")
    handles = []
    if train:
        handles += ax.plot([p[1] for p in train], [p[2] for p in train], color=PALETTE[0], lw=1.4, label="train loss")
    if val:
        handles += ax.plot([p[1] for p in val], [p[2] for p in val], color=PALETTE[1], lw=1.6, marker="o", ms=3.5, label="val loss")
    if run.unigram_entropy is not None:
        handles.append(ax.axhline(run.unigram_entropy, color="#59636e", lw=1, ls=":", label="unigram entropy"))
    if not (train or val):
        _no_data(ax, "no finite loss logged yet")
    ylim = _loss_ylim([[p[2] for p in s] for s in (train, val) if s], run.unigram_entropy)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel("steps")
    ax.set_ylabel(f"loss ({unit})")
    lr = run.series("lr")
    if lr:
        ax2 = ax.twinx()
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
        handles += ax2.plot([p[1] for p in lr], [p[2] for p in lr], color=PALETTE[2], lw=1.2, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate", color=PALETTE[2])
        ax2.tick_params(axis="y", colors=PALETTE[2])
        ax2.set_ylim(bottom=0)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title(f"{run.name}: loss and learning rate")
    _legend(fig, handles, [h.get_label() for h in handles], 11.0)
    return _save(fig, out_dir, "loss.png", "Training and validation loss against steps; the learning rate on the right axis.", "loss curve")


def _wants_batch_figure(run: Run) -> bool:
    sizes = {p[2] for p in run.series("batch_size")}
    return len(sizes) > 1 or run.has("noise_scale")


def _single_batch_figure(run: Run, out_dir: Path) -> FigureFile:
    """batch.png: batch size and (where logged) the noise scale against steps."""
    fig, (ax,) = _figure(11.0, 3.8)
    handles = []
    batch, noise = run.series("batch_size"), run.series("noise_scale")
    if batch:
        handles += ax.plot(
            [p[1] for p in batch], [p[2] for p in batch], color=PALETTE[0], lw=1.4, drawstyle="steps-post", label="batch size"
        )
    if noise:
        handles += ax.plot([p[1] for p in noise], [p[2] for p in noise], color=PALETTE[1], lw=1.4, label="noise scale B_noise")
    values = [p[2] for p in batch + noise]
    _scale_y(ax, values, log=_spans(values, 30))
    ax.set_xlabel("steps")
    ax.set_ylabel("batch size / noise scale (samples)" if noise else "batch size (samples)")
    ax.set_title(f"{run.name}: batch size" + (" and gradient noise scale" if noise else ""))
    _legend(fig, handles, [h.get_label() for h in handles], 11.0)
    caption = "Global batch size (samples) against steps" + (
        "; the measured noise scale B_noise, the critical batch size." if noise else "."
    )
    return _save(fig, out_dir, "batch.png", caption, "batch size")


def _single_progress_figure(run: Run, out_dir: Path, unit: str, data: DataUnit) -> FigureFile:
    """loss_progress.png: loss against tokens/samples and against wall time."""
    fig, axes = _figure(11.0, 4.0, ncols=2)
    handles: list[Any] = []
    for ax, x in zip(axes, (data, "time")):
        train, val = run.series("loss", x), run.series("val_loss", x)
        h = []
        if train:
            h += ax.plot([p[1] for p in train], [p[2] for p in train], color=PALETTE[0], lw=1.4, label="train loss")
        if val:
            h += ax.plot([p[1] for p in val], [p[2] for p in val], color=PALETTE[1], lw=1.6, marker="o", ms=3.5, label="val loss")
        if not h:
            _no_data(ax, f"no loss logged against {_x_label(x)}")
        ylim = _loss_ylim([[p[2] for p in s] for s in (train, val) if s], run.unigram_entropy)
        if ylim:
            ax.set_ylim(*ylim)
        if run.unigram_entropy is not None and h:
            _entropy_line(ax, run.unigram_entropy)
        ax.set_xlabel(_x_label(x))
        ax.set_ylabel(f"loss ({unit})")
        _eng_axis(ax, x)
        ax.set_title(f"loss against {_x_label(x)}")
        handles = handles or h
    _legend(fig, handles, [h.get_label() for h in handles], 11.0)
    return _save(fig, out_dir, "loss_progress.png", f"Loss against {data} seen and against wall-clock time.", "loss against data and time")


def compare_loss_figure(runs: Sequence[Run], out_dir: Path, x: str, unit: str, winner: str | None) -> FigureFile:
    """Train loss (left) and validation loss (right) of every run against `x`."""
    width = 12.0
    # Shared x: the same moment of training sits at the same place in both panels.
    fig, axes = _figure(width, _height(4.4, [r.name for r in runs], width), ncols=2, sharex=True)
    handles: list[Any] = []
    labels: list[str] = []
    for ax, key, title in zip(axes, ("loss", "val_loss"), ("training loss", "validation loss")):
        curves = []
        for i, run in enumerate(runs):
            points = run.series(key, x)
            if not points:
                continue
            color, ls = style(i)
            wide = run.name == winner
            (line,) = ax.plot(
                [p[1] for p in points],
                [p[2] for p in points],
                color=color,
                ls=ls,
                lw=2.4 if wide else 1.3,
                # Markers show where the evaluations are, while there are few enough runs to see.
                marker="o" if key == "val_loss" and len(points) < 40 and len(runs) <= 8 else None,
                ms=3,
                zorder=3 if wide else 2,
                label=run.name,
            )
            curves.append([p[2] for p in points])
            if run.name not in labels:
                handles.append(line)
                labels.append(run.name)
        if not curves:
            _no_data(ax, f"no {title} logged")
        # The unigram entropy as a reference line, when the runs share their data.
        entropies = {r.unigram_entropy for r in runs if r.unigram_entropy is not None}
        entropy = entropies.pop() if len(entropies) == 1 else None
        ylim = _loss_ylim(curves, entropy)
        if ylim:
            ax.set_ylim(*ylim)
        if entropy is not None and curves:
            _entropy_line(ax, entropy)
        ax.set_xlabel(_x_label(x))
        ax.set_ylabel(f"loss ({unit})")
        _eng_axis(ax, x)
        ax.set_title(f"{title} against {_x_label(x)}")
    order = {r.name: i for i, r in enumerate(rank_runs(runs))}
    pairs = sorted(zip(handles, labels), key=lambda hl: order[hl[1]])
    _legend(fig, [h for h, _ in pairs], [lab for _, lab in pairs], width)
    name = {"step": "steps", "time": "time"}.get(x, x)
    what = {"step": "optimizer steps", "time": "wall-clock time (evaluation included)"}.get(x, f"{x} seen")
    note = " The dotted line is the data's unigram entropy." if any(r.unigram_entropy for r in runs) else ""
    caption = f"Loss against {what}. The winner is drawn thicker; the legend is in rank order.{note}"
    return _save(fig, out_dir, f"loss_{name}.png", caption, f"loss against {what}")


def compare_schedule_figure(runs: Sequence[Run], out_dir: Path, data: DataUnit, winner: str | None) -> FigureFile:
    """The learning rate (left) and batch size (right) of every run against data seen."""
    width = 12.0
    fig, axes = _figure(width, _height(4.0, [r.name for r in runs], width), ncols=2)
    handles: list[Any] = []
    for ax, key, label in zip(axes, ("lr", "batch_size"), ("learning rate", "batch size (samples)")):
        values: list[float] = []
        peaks: list[float] = []
        for i, run in enumerate(runs):
            points = run.series(key, data)
            if not points:
                continue
            peaks.append(max(p[2] for p in points))
            color, ls = style(i)
            (line,) = ax.plot(
                [p[1] for p in points],
                [p[2] for p in points],
                color=color,
                ls=ls,
                lw=2.2 if run.name == winner else 1.3,
                drawstyle="steps-post" if key == "batch_size" else "default",
                label=run.name,
            )
            values += [p[2] for p in points]
            if key == "lr":
                handles.append(line)
        if not values:
            _no_data(ax, f"no {label.split(' (')[0]} logged")
        # LR: log only when the peaks differ by 10x (SGD's 0.1 beside Adam's 1e-3); judged on all
        # values, every decay to zero would ask for a log axis and draw a cliff.
        _scale_y(ax, values, log=_spans(peaks, 10) if key == "lr" else _spans(values, 30))
        ax.set_xlabel(_x_label(data))
        ax.set_ylabel(label)
        _eng_axis(ax, data)
        ax.set_title(f"{label.split(' (')[0]} against {data} seen")
    order = {r.name: i for i, r in enumerate(rank_runs(runs))}
    handles.sort(key=lambda h: order[h.get_label()])
    _legend(fig, handles, [h.get_label() for h in handles], width)
    caption = (
        f"Learning rate and global batch size against {data} seen (the clock that keeps strategies with different batch sizes comparable)."
    )
    return _save(fig, out_dir, "schedules.png", caption, "learning rate and batch size schedules")


def compare_noise_figure(runs: Sequence[Run], out_dir: Path, data: DataUnit) -> FigureFile:
    """The measured noise scale (solid) and the batch size used (dashed) of runs that logged it."""
    width = 12.0
    measured = [(i, r) for i, r in enumerate(runs) if r.has("noise_scale")]
    fig, (ax,) = _figure(width, _height(4.2, [r.name for _, r in measured], width))
    values: list[float] = []
    handles = []
    for i, run in measured:
        color, _ = style(i)
        noise, batch = run.series("noise_scale", data), run.series("batch_size", data)
        handles += ax.plot([p[1] for p in noise], [p[2] for p in noise], color=color, lw=1.5, label=run.name)
        ax.plot([p[1] for p in batch], [p[2] for p in batch], color=color, lw=1.0, ls="--", drawstyle="steps-post", alpha=0.8)
        values += [p[2] for p in noise + batch]
    _scale_y(ax, values, log=_spans(values, 30))
    ax.set_xlabel(_x_label(data))
    ax.set_ylabel("noise scale B_noise (samples)")
    _eng_axis(ax, data)
    ax.set_title(f"gradient noise scale against {data} seen")
    _legend(fig, handles, [h.get_label() for h in handles], width)
    caption = "Measured gradient noise scale B_noise (solid), the critical batch size, and the batch size the run used (dashed)."
    return _save(fig, out_dir, "noise.png", caption, "gradient noise scale")


def single_figures(run: Run, out_dir: Path, include_progress: bool) -> list[FigureFile]:
    unit = loss_unit([run])
    figures = [_single_loss_figure(run, out_dir, unit)]
    if include_progress:
        figures.append(_single_progress_figure(run, out_dir, unit, data_unit([run])))
    if _wants_batch_figure(run):
        figures.append(_single_batch_figure(run, out_dir))
    return figures


def race_figure(
    rungs: Sequence[float],
    candidates: Sequence[tuple[str, Sequence[float | None]]],
    out_dir: Path,
    x_unit: str,
    unit: str,
    winner: str | None,
) -> FigureFile:
    """The race of `regimen tune`: each candidate's measured loss at each rung it ran, against the rung's budget.

    `candidates` are (name, loss per rung, None where it did not run); a line ends where the
    candidate was stopped. Log x: the rungs grow geometrically.
    """
    width = 12.0
    names = [name for name, _ in candidates]
    fig, (ax,) = _figure(width, _height(4.6, names, width))
    handles: list[Any] = []
    values: list[float] = []
    for i, (name, losses) in enumerate(candidates):
        points = [(b, v) for b, v in zip(rungs, losses) if v is not None and v == v and v != float("inf")]
        if not points:
            continue
        color, ls = style(i)
        wide = name == winner
        (line,) = ax.plot(
            [p[0] for p in points], [p[1] for p in points], color=color, ls=ls, lw=2.4 if wide else 1.3, marker="o", ms=4, label=name
        )
        handles.append(line)
        values += [p[1] for p in points]
    if not handles:
        _no_data(ax, "no rung measured yet")
    ax.set_xscale("log")
    ylim = _loss_ylim([values]) if values else None
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(f"rung budget ({x_unit})")
    ax.set_ylabel(f"val loss at the end of the rung ({unit})")
    ax.set_title("the race: each candidate's loss at each rung it reached")
    _legend(fig, handles, [h.get_label() for h in handles], width)
    caption = (
        "Successive halving: every candidate runs the first rung, the best of each rung run the next. A line ends at the rung where "
        "its candidate was stopped; the winner is drawn thicker."
    )
    return _save(fig, out_dir, "race.png", caption, "each candidate's validation loss at each rung")
