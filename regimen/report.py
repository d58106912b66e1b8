"""Plots and the HTML report of one run or of a comparison, read from run directories.

Everything here is a pure function of the files a run directory holds (`strategy.toml`,
`metrics.jsonl`, and `summary.json` once the run has finished), so a report works the same on
runs that finished, runs still going, and runs that died:

- `metrics.jsonl` is read as a stream: a line that does not parse (the half-written last line
  of a running job) is ignored; a step logged twice (a row that only adds `val_loss`) keeps its
  latest value; a step that goes back (a run resumed from an earlier checkpoint) replaces
  everything logged after it; non-finite values (a diverged step) are left out of the plots
  instead of breaking them.
- No `summary.json` means the run has not finished: it is shown as "running".

Decisions the page states as well:

- Runs are ranked by best validation loss; runs that never evaluated come after them, ranked
  by final training loss.
- The target loss for "time to target" is `target_loss` when given, else the worst best
  validation loss among the runs: the lowest loss every evaluated run reached, so the column
  compares all of them. Time is the wall clock from the start of training to the first logged
  evaluation at or below the target.
- Loss against data is plotted against tokens when every run saw more tokens than samples
  (sequence models), else against samples. The loss unit is nats/token for sequence models and
  nats/sample otherwise, unless the summary names it (`loss_unit`).
- The strategy diff shows, for each run, the keys (`section.key`) whose value differs from
  `base`; without a base, the keys on which the runs differ from each other.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot: no global figure state, and no backend switch that would disturb a user's interactive
session when `regimen.fit` draws its plots at the end of a run.

Example:
    >>> run = load_run("runs/adam")                                # doctest: +SKIP
    >>> plot_run("runs/adam")                                      # doctest: +SKIP
    [PosixPath('runs/adam/loss.png')]
    >>> write_report(["runs/adam", "runs/sgd"], "report")          # doctest: +SKIP
    PosixPath('report/report.html')
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from regimen.errors import UserError
from regimen.strategy import read_toml

METRICS_FILE = "metrics.jsonl"
STRATEGY_FILE = "strategy.toml"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"

# Okabe & Ito's colour-blind-safe palette, ordered so that the first runs get the colours that
# stay readable as thin lines on white (yellow last). Past eight runs the line style changes.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (6, 1.5, 1, 1.5, 1, 1.5)))
DPI = 110

DataUnit = Literal["samples", "tokens"]


# --------------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run directory, as read from disk: its strategy, metric rows and summary.

    Every statistic prefers `summary.json` (written once, at the end) and falls back to the
    metric rows, so it has a value for runs still going too.

    Example:
        >>> run = Run("demo", Path("."), {}, [{"step": 10, "loss": 2.0, "val_loss": 2.1}], None)
        >>> run.status, run.best_val_loss, run.final_loss
        ('running', 2.1, 2.0)
    """

    name: str
    path: Path
    strategy: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def status(self) -> str:
        """`running` without a summary, else the summary's status (`finished`, ...)."""
        if self.summary is None:
            return "running"
        return str(self.summary.get("status", "finished"))

    @property
    def flat_strategy(self) -> dict[str, Any]:
        """The strategy as `{"section.key": value}`."""
        return flatten_strategy(self.strategy)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The metric rows in effect, in order.

        A row whose step goes back (a run resumed from an earlier checkpoint) drops every row
        logged after that step: what the rolled-back run did there never happened. Rows that
        repeat the current step (an evaluation) stay; rows without a step are left out.
        """
        if "rows" not in self._cache:
            kept: list[dict[str, Any]] = []
            for row in self.metrics:
                step = _finite(row.get("step"))
                if step is None:
                    continue
                while kept and kept[-1]["step"] > step:
                    kept.pop()
                kept.append(row)
            self._cache["rows"] = kept
        return self._cache["rows"]

    def series(self, y: str, x: str = "step") -> list[tuple[float, float, float]]:
        """`(step, x, y)` for every logged step where both are finite, in step order.

        A step logged twice (a row that only adds `val_loss`) keeps its latest row with `y`.
        """
        key = ("series", y, x)
        if key not in self._cache:
            by_step: dict[float, tuple[float, float]] = {}
            for row in self.rows:
                step, xv, yv = _finite(row.get("step")), _finite(row.get(x)), _finite(row.get(y))
                if step is not None and xv is not None and yv is not None:
                    by_step[step] = (xv, yv)
            self._cache[key] = [(s, xv, yv) for s, (xv, yv) in sorted(by_step.items())]
        return self._cache[key]

    def has(self, key: str) -> bool:
        """Whether any row logged a finite `key`."""
        return bool(self.series(key))

    # ---- statistics (summary first, metrics as the fallback) -------------------------------

    @property
    def best_val_loss(self) -> float | None:
        """The lowest finite validation loss, or None when the run never evaluated."""
        value = self._summary_finite("best_val_loss")
        if value is not None:
            return value
        values = [v for _, _, v in self.series("val_loss")]
        return min(values) if values else None

    @property
    def final_loss(self) -> float | None:
        """The last training loss logged (NaN when the run ended diverged), or None."""
        return self._summary_number("final_loss", self._last("loss"))

    @property
    def final_val_loss(self) -> float | None:
        """The last validation loss logged, or None."""
        return self._summary_number("final_val_loss", self._last("val_loss"))

    @property
    def steps(self) -> int | None:
        """Optimizer steps taken."""
        value = self._summary_number("steps", self._max("step"))
        return None if value is None or not math.isfinite(value) else int(value)

    @property
    def samples(self) -> float | None:
        """Samples consumed."""
        return self._summary_number("samples", self._max("samples"))

    @property
    def tokens(self) -> float | None:
        """Tokens consumed."""
        return self._summary_number("tokens", self._max("tokens"))

    @property
    def wall_time(self) -> float | None:
        """Seconds of wall clock from the start of training to the last row (or the end)."""
        return self._summary_number("wall_time", self._max("time"))

    @property
    def tokens_per_s(self) -> float | None:
        """Throughput: the summary's, else the last logged value."""
        return self._summary_number("tokens_per_s", self._last("tokens_per_s", finite=True))

    @property
    def peak_memory_mb(self) -> float | None:
        """Peak accelerator (or host) memory in MiB, where measured."""
        return self._summary_number("peak_memory_mb", self._max("peak_memory_mb"))

    @property
    def unigram_entropy(self) -> float | None:
        """The data's unigram entropy (nats per token), a baseline the loss should beat."""
        return self._summary_finite("unigram_entropy")

    @property
    def token_level(self) -> bool:
        """True for sequence models: more tokens than samples were seen."""
        samples, tokens = self.samples, self.tokens
        return bool(samples and tokens and tokens > samples)

    def _summary_number(self, key: str, fallback: float | None) -> float | None:
        value = (self.summary or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return fallback

    def _summary_finite(self, key: str) -> float | None:
        return _finite((self.summary or {}).get(key))

    def _last(self, key: str, finite: bool = False) -> float | None:
        # The last row that logged `key` at all, so that a run that ended in NaN says so.
        for row in reversed(self.rows):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if finite and not math.isfinite(value):
                    continue
                return float(value)
        return None

    def _max(self, key: str) -> float | None:
        values = [v for v in (_finite(row.get(key)) for row in self.rows) if v is not None]
        return max(values) if values else None


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; a missing directory or one without metrics.jsonl is a `UserError`.

    Example:
        >>> load_run("runs/adam").status                          # doctest: +SKIP
        'finished'
    """
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"run directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise UserError(f"run directory {str(path)!r} is not a directory")
    if not (path / METRICS_FILE).is_file():
        raise UserError(f"{str(path)!r} is not a run directory: it has no {METRICS_FILE} (runs made by `regimen train` have one)")
    strategy = read_toml(path / STRATEGY_FILE) if (path / STRATEGY_FILE).is_file() else {}
    return Run(
        name=path.resolve().name or str(path),
        path=path,
        strategy=strategy,
        metrics=read_metrics(path / METRICS_FILE),
        summary=_read_summary(path / SUMMARY_FILE),
    )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl file, skipping lines that do not parse.

    Example:
        >>> read_metrics("runs/adam/metrics.jsonl")[0]["step"]    # doctest: +SKIP
        10
    """
    rows = []
    # errors="replace": a line cut inside a multi-byte character is skipped like any other.
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        # Being written right now: treat the run as still going.
        return None
    return summary if isinstance(summary, dict) else None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# Comparing runs: strategy diff, ranking, time to target
# --------------------------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


# A key a run's strategy does not set (TOML has no null: None-valued keys are left out).
MISSING: Any = _Missing()


def flatten_strategy(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`{"section": {"key": v}}` -> `{"section.key": v}`; already-flat keys are kept.

    Example:
        >>> flatten_strategy({"optimizer": {"name": "adam", "lr": 0.001}})
        {'optimizer.name': 'adam', 'optimizer.lr': 0.001}
    """
    flat: dict[str, Any] = {}
    for section, table in tree.items():
        if isinstance(table, Mapping) and "." not in section:
            for key, value in table.items():
                flat[f"{section}.{key}"] = value
        else:
            flat[section] = table
    return flat


def strategy_diff(runs: Sequence[Run], base: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """For each run (by name), the strategy keys that differ from `base`, with the run's value.

    `base` is a flat (`section.key`) or nested mapping; None means "what all runs share", so
    every run lists the keys on which the runs differ from each other. A key a run does not set
    has the value `MISSING`.

    Example:
        >>> a = Run("a", Path("a"), {"optimizer": {"name": "adam", "lr": 0.001}}, [])
        >>> b = Run("b", Path("b"), {"optimizer": {"name": "sgd", "lr": 0.001}}, [])
        >>> strategy_diff([a, b])
        {'a': {'optimizer.name': 'adam'}, 'b': {'optimizer.name': 'sgd'}}
    """
    flats = [run.flat_strategy for run in runs]
    keys = _ordered_keys(flats + ([flatten_strategy(base)] if base is not None else []))
    if base is None:
        varied = [k for k in keys if len({_hashable(f.get(k, MISSING)) for f in flats}) > 1]
        return {run.name: {k: flat.get(k, MISSING) for k in varied} for run, flat in zip(runs, flats)}
    flat_base = flatten_strategy(base)
    return {
        run.name: {k: flat.get(k, MISSING) for k in keys if not same_value(flat.get(k, MISSING), flat_base.get(k, MISSING))}
        for run, flat in zip(runs, flats)
    }


def shared_strategy(runs: Sequence[Run]) -> dict[str, Any]:
    """The `section.key` values every run has in common."""
    flats = [run.flat_strategy for run in runs]
    return {k: flats[0][k] for k in _ordered_keys(flats) if all(k in f and same_value(f[k], flats[0][k]) for f in flats)}


def rank_runs(runs: Sequence[Run]) -> list[Run]:
    """Runs best first: by best validation loss, then (never evaluated) by final train loss.

    Runs with neither come last; ties keep the given order.

    Example:
        >>> a = Run("a", Path("a"), {}, [{"step": 1, "loss": 2.0, "val_loss": 2.5}])
        >>> b = Run("b", Path("b"), {}, [{"step": 1, "loss": 3.0, "val_loss": 2.2}])
        >>> [r.name for r in rank_runs([a, b])]
        ['b', 'a']
    """
    return sorted(runs, key=_rank_key)


def ranked_on(run: Run) -> tuple[str, float] | None:
    """What a run is ranked on: `("val", best val loss)`, `("train", final loss)` or None."""
    if run.best_val_loss is not None:
        return "val", run.best_val_loss
    final = run.final_loss
    if final is not None and math.isfinite(final):
        return "train", final
    return None


def _rank_key(run: Run) -> tuple[int, float]:
    on = ranked_on(run)
    if on is None:
        return 2, 0.0
    return (0 if on[0] == "val" else 1), on[1]


def auto_target(runs: Sequence[Run]) -> tuple[float, str] | None:
    """The default target loss and the rule that chose it (see the module docstring)."""
    vals = [v for v in (r.best_val_loss for r in runs) if v is not None]
    if vals:
        return max(vals), "the worst best validation loss among the runs, so every evaluated run reaches it"
    finals = [v for v in (r.final_loss for r in runs) if v is not None and math.isfinite(v)]
    if finals:
        return max(finals), "no run evaluated: the worst final training loss among the runs"
    return None


def time_to_loss(run: Run, target: float) -> tuple[float, int, str] | None:
    """`(seconds, step, "val" | "train")` when the run first logged a loss <= target, else None.

    Validation loss when the run has any, else training loss.
    """
    key, kind = ("val_loss", "val") if run.has("val_loss") else ("loss", "train")
    for step, seconds, value in run.series(key, "time"):
        if value <= target:
            return seconds, int(step), kind
    return None


def _ordered_keys(flats: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for flat in flats:
        seen.update(dict.fromkeys(flat))
    return list(seen)


def same_value(a: Any, b: Any) -> bool:
    """Strategy values equal (`1 == 1.0`, but `true != 1`)."""
    # In Python 1 == 1.0 == True; in a strategy a bool is never the same as a number.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ("{", tuple((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("[", tuple(_hashable(v) for v in value))
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def data_unit(runs: Sequence[Run]) -> DataUnit:
    """`tokens` when every run with data saw more tokens than samples, else `samples`."""
    with_data = [r for r in runs if r.metrics]
    return "tokens" if with_data and all(r.token_level for r in with_data) else "samples"


def loss_unit(runs: Sequence[Run]) -> str:
    """The loss's unit for axis labels (nats/token, nats/sample, or the summary's `loss_unit`)."""
    named = {str(r.summary["loss_unit"]) for r in runs if r.summary and r.summary.get("loss_unit")}
    if len(named) == 1:
        return named.pop()
    return "nats/token" if data_unit(runs) == "tokens" else "nats/sample"


def unique_names(runs: Sequence[Run]) -> None:
    """Make run names unique (two `runs/*/adam` directories) by adding parent folders."""
    for depth in range(1, 4):
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.name] = counts.get(run.name, 0) + 1
        dupes = {n for n, c in counts.items() if c > 1}
        if not dupes:
            return
        for run in runs:
            if run.name in dupes:
                parts = run.path.resolve().parts
                run.name = "/".join(parts[-1 - depth :])
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} #{seen[run.name]}"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


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


def _rc() -> Any:
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


def _compare_loss_figure(runs: Sequence[Run], out_dir: Path, x: str, unit: str, winner: str | None) -> FigureFile:
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


def _compare_schedule_figure(runs: Sequence[Run], out_dir: Path, data: DataUnit, winner: str | None) -> FigureFile:
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


def _compare_noise_figure(runs: Sequence[Run], out_dir: Path, data: DataUnit) -> FigureFile:
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


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw one run's PNGs into its directory: `loss.png`, and `batch.png` when relevant.

    `batch.png` is drawn when the batch size varied or the noise scale was logged. The trainer
    calls this at the end of every run.

    Example:
        >>> plot_run("runs/adam")                                  # doctest: +SKIP
        [PosixPath('runs/adam/loss.png')]
    """
    run = load_run(run_dir)
    with _rc():
        figures = _single_figures(run, run.path, include_progress=False)
    return [run.path / f.file for f in figures]


def _single_figures(run: Run, out_dir: Path, include_progress: bool) -> list[FigureFile]:
    unit = loss_unit([run])
    figures = [_single_loss_figure(run, out_dir, unit)]
    if include_progress:
        figures.append(_single_progress_figure(run, out_dir, unit, data_unit([run])))
    if _wants_batch_figure(run):
        figures.append(_single_batch_figure(run, out_dir))
    return figures


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    base: Mapping[str, Any] | None = None,
    target_loss: float | None = None,
    title: str | None = None,
) -> Path:
    """Write `report.html` and its PNG figures into `out_dir`; return the report's path.

    Several runs make a comparison (ranked table, loss against steps / data / wall time,
    schedules, noise scale, strategy diff against `base`); a single run makes a one-run page
    (summary numbers, its plots, its strategy). The page is self-contained: inline CSS, images
    by relative path, no scripts and no network.

    Example:
        >>> write_report(["runs/adam", "runs/sgd"], "report", target_loss=2.0)  # doctest: +SKIP
        PosixPath('report/report.html')
    """
    from regimen import report_html

    if not run_dirs:
        raise UserError("report: give at least one run directory")
    if target_loss is not None and not math.isfinite(target_loss):
        raise UserError(f"--target-loss = {target_loss}: must be a finite number")
    runs = [load_run(d) for d in run_dirs]
    unique_names(runs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"report output {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    with _rc():
        if len(runs) == 1:
            run = runs[0]
            figures = _single_figures(run, out, include_progress=True)
            page = report_html.single_page(
                run,
                figures,
                unit=loss_unit(runs),
                data=data_unit(runs),
                base=flatten_strategy(base) if base is not None else None,
                target=target_loss,
                title=title or f"regimen run: {run.name}",
            )
        else:
            page = _comparison(runs, out, base, target_loss, title or "regimen comparison", report_html)

    path = out / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _comparison(runs: list[Run], out: Path, base: Mapping[str, Any] | None, target: float | None, title: str, report_html: Any) -> str:
    ranked = rank_runs(runs)
    winner = ranked[0].name if ranked and ranked_on(ranked[0]) is not None else None
    unit, data = loss_unit(runs), data_unit(runs)
    figures = [_compare_loss_figure(runs, out, x, unit, winner) for x in ("step", data, "time")]
    figures.append(_compare_schedule_figure(runs, out, data, winner))
    if any(r.has("noise_scale") for r in runs):
        figures.append(_compare_noise_figure(runs, out, data))
    if target is not None:
        target_rule: tuple[float, str] | None = (target, "given with --target-loss")
    else:
        target_rule = auto_target(runs)
    return report_html.comparison_page(
        runs,
        ranked,
        figures,
        winner=winner,
        colours={r.name: style(i) for i, r in enumerate(runs)},
        unit=unit,
        data=data,
        target=target_rule,
        diff=strategy_diff(runs, base),
        shared=shared_strategy(runs),
        base_given=base is not None,
        title=title,
    )


def run(args: argparse.Namespace) -> int:
    """`regimen report RUN_DIR [RUN_DIR ...] [--out DIR] [--target-loss X]`; prints the report's path."""
    out = args.out if args.out is not None else (args.run_dirs[0] if len(args.run_dirs) == 1 else "report")
    path = write_report(args.run_dirs, out, target_loss=args.target_loss)
    print(path)
    return 0
