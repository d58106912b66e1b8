"""What a run directory holds: its files, their readers and writers, the lock, the summary.

A run directory is made by `regimen train` (or `rg.fit(run_dir=...)`, `compare`, `tune`):

```
.regimen-run        the marker: regimen made this directory (JSON); --overwrite replaces only such directories
.lock               held by rank 0 while a run trains here (flock: released by the kernel however the holder ends)
strategy.toml       the resolved strategy the run started with; never rewritten
events.jsonl        the run's history (start, resume, overwrite, allowed strategy changes); appended only
metrics.jsonl       one JSON object per logged step; appended only (see below)
summary.json        computed at the end from the whole history; replaced by rename
report.html, *.png  the report and its figures
model.safetensors   the final weights
checkpoints/        see regimen.checkpoint
```

No file that holds history is rewritten in place. A resume (or a rollback) does not cut
`metrics.jsonl` back to its checkpoint: it appends `{"event": "resume", "step": N}`, and every
reader (`read_metrics`) drops the rows past step N that were logged before that marker. A kill
at any moment therefore leaves every row that was ever flushed on disk, and the rows in effect
are a pure function of the file. A torn last line (a run killed mid-write) is skipped.

This module is a leaf: it imports nothing of regimen's but the strategy's TOML reader, so the
trainer, the report, compare and tune all read and write runs through it.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with MetricsWriter(d / METRICS_FILE) as w:
    ...     w.write({"step": 1, "loss": 2.5}); w.write({"step": 2, "loss": 2.0})
    ...     w.resume_from(1); w.write({"step": 2, "loss": 1.9})
    >>> [(r["step"], r["loss"]) for r in read_metrics(d / METRICS_FILE)]
    [(1, 2.5), (2, 1.9)]
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

from regimen.errors import UserError
from regimen.strategy import flatten, read_toml

MARKER_FILE = ".regimen-run"
LOCK_FILE = ".lock"
STRATEGY_FILE = "strategy.toml"
EVENTS_FILE = "events.jsonl"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_FILE = "samples.jsonl"  # text the model wrote at each evaluation (regimen.sample)

# What regimen writes at the top of a run directory (besides figures, `*.png`). `--overwrite`
# removes these and nothing else; a user's own file in a run directory survives it.
OWN_ENTRIES = frozenset(
    {
        MARKER_FILE,
        LOCK_FILE,
        STRATEGY_FILE,
        EVENTS_FILE,
        METRICS_FILE,
        SUMMARY_FILE,
        REPORT_FILE,
        WEIGHTS_FILE,
        CHECKPOINTS_DIR,
        "train.log",  # compare's and tune's log of each run
        "tensorboard",
        "mlruns",
        "loggers.json",  # the MLflow and W&B run ids a resume logs into
        "wandb",
        SAMPLES_FILE,
        "tokenizer.json",
        "tokens_meta.json",
        "lr_find.png",
        "lr_find.json",
    }
)
RESUME_EVENT = "resume"


# --------------------------------------------------------------------------------------------
# Writing files safely
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old file or the new one.

    A full disk or a kill mid-write leaves the previous file whole; the error names the file.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "a.json"; write_atomic(p, "{}"); p.read_text()
    '{}'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"could not write {str(path)!r} ({os_reason(e)}); the previous version, if any, is intact") from None
    _fsync_dir(path.parent)


def os_reason(e: OSError) -> str:
    """An OSError as a few words: 'no space left on device', 'permission denied', ..."""
    if e.errno is not None:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


class JsonlWriter:
    """Appends JSON objects to a file, one per line, flushed line by line (readers see a running job)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.file: IO[str] = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"could not open {str(self.path)!r} for writing ({os_reason(e)})") from None

    def write(self, row: Mapping[str, Any]) -> None:
        # Non-finite floats are not JSON: a diverged value is recorded as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        try:
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
        except OSError as e:
            raise UserError(f"could not write to {str(self.path)!r} ({os_reason(e)}); the rows before this one are on disk") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetricsWriter(JsonlWriter):
    """`metrics.jsonl`: rows are appended; `resume_from(step)` marks the rows past `step` as undone."""

    def resume_from(self, step: int) -> None:
        """Record that training continues from `step`: readers drop the rows past it logged before now."""
        self.write({"event": RESUME_EVENT, "step": int(step)})


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a `.jsonl` file, skipping lines that do not parse (a torn last line).

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "m.jsonl"; _ = p.write_text('{"a": 1}\\n{"a": ')
    >>> read_jsonl(p)
    [{'a': 1}]
    """
    rows: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return rows
    # errors="replace": a line cut inside a multi-byte character is skipped like any other.
    with open(p, encoding="utf-8", errors="replace") as f:
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


def resolve_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows in effect: each resume marker drops the rows logged before it past its step.

    Rows without a step are left out. (Logs of regimen 0.1 were cut back in place on resume; a
    step that goes back still drops what was logged after it, so they read the same.)

    >>> resolve_rows([{"step": 1}, {"step": 2, "x": 0}, {"event": "resume", "step": 1}, {"step": 2, "x": 1}])
    [{'step': 1}, {'step': 2, 'x': 1}]
    """
    kept: list[dict[str, Any]] = []
    for row in rows:
        step = _finite(row.get("step"))
        if step is None:
            continue
        if row.get("event") == RESUME_EVENT:
            kept = [r for r in kept if r["step"] <= step]
            continue
        while kept and kept[-1]["step"] > step:
            kept.pop()
        kept.append(dict(row))
    return kept


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows in effect of a `metrics.jsonl` (`read_jsonl`, then `resolve_rows`): the one reader of run metrics."""
    return resolve_rows(read_jsonl(path))


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The samples in effect of a run's samples.jsonl (none when it has none), resolved like its metrics."""
    return read_metrics(Path(run_dir) / SAMPLES_FILE)


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, being written, or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# The marker, the lock, the events
# --------------------------------------------------------------------------------------------


def is_run_dir(path: str | Path) -> bool:
    """Whether regimen made this directory (its marker is there)."""
    return (Path(path) / MARKER_FILE).is_file()


def check_location(path: str | Path, what: str = "run directory") -> None:
    """Refuse a path that cannot be a directory regimen writes into, in one line, before anything is built.

    A file, a path below a file, a directory that is not writable, or a parent that cannot be created.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {str(p)!r} is a file, not a directory; choose another path")
    existing = p
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{what} {str(p)!r}: {str(existing)!r} is a file, so nothing can be created below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == p else f"{str(existing)!r} is"
        raise UserError(f"{what} {str(p)!r}: {where} not writable (permission denied)")


def create(path: str | Path) -> Path:
    """Make the run directory (and its parents) and its marker; a directory regimen made before is kept as it is."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        if not is_run_dir(p):
            marker = {"made_by": "regimen", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_atomic(p / MARKER_FILE, json.dumps(marker) + "\n")
    except OSError as e:
        raise UserError(f"could not create the run directory {str(p)!r} ({os_reason(e)})") from None
    return p


def remove_if_unused(path: str | Path) -> None:
    """Remove a run directory this process made that holds nothing but its marker and lock (a run that never started)."""
    p = Path(path)
    with contextlib.suppress(OSError):
        if {e.name for e in p.iterdir()} <= {MARKER_FILE, LOCK_FILE}:
            for name in (MARKER_FILE, LOCK_FILE):
                (p / name).unlink(missing_ok=True)
            p.rmdir()


def clear_for_overwrite(path: str | Path) -> list[str]:
    """Remove what regimen wrote in a run directory it made; return the names of the user's files it kept.

    Refuses (one line) a directory without regimen's marker: `--overwrite` never deletes files
    regimen did not write.
    """
    import shutil

    p = Path(path)
    if not p.is_dir() or not any(p.iterdir()):
        return []
    if not is_run_dir(p):
        raise UserError(
            f"--overwrite: {str(p)!r} was not made by regimen (it has no {MARKER_FILE} marker); "
            "nothing was deleted; choose another --run-dir or empty it yourself"
        )
    kept = []
    for entry in sorted(p.iterdir()):
        if entry.name == MARKER_FILE or entry.name == LOCK_FILE:
            continue  # the marker stays (the directory is still regimen's); the lock is held by us
        if entry.name in OWN_ENTRIES or (entry.suffix == ".png" and entry.is_file()) or entry.name.startswith(f".{METRICS_FILE}"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        else:
            kept.append(entry.name)
    return kept


class RunLock:
    """An exclusive lock on a run directory, held by rank 0 for the life of a run.

    `flock` on `.lock`: the kernel releases it when the holder's process ends, however it ends
    (kill -9 included), so a lock is never stale. The holder's PID is written inside, for the
    one-line refusal a second process gets.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> with RunLock(d):
    ...     RunLock(d).holder() == os.getpid()
    True
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def holder(self) -> int | None:
        """The PID that holds the lock now, or None when it is free."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = self.path.read_text(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self) -> RunLock:
        """Take the lock or raise a `UserError` naming the process that holds it."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"could not lock the run directory {str(self.path.parent)!r} ({os_reason(e)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"could not lock the run directory {str(self.path.parent)!r} ({os_reason(e)})") from None
            pid = self.holder()
            who = f"process {pid}" if pid and pid > 0 else "another process"
            raise UserError(
                f"run directory {str(self.path.parent)!r} is in use by {who} (another regimen run); "
                "wait for it to end, or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def record_event(run_dir: str | Path, event: str, **fields: Any) -> None:
    """Append one entry to the run's history (`events.jsonl`): start, resume, overwrite, strategy changes."""
    with JsonlWriter(Path(run_dir) / EVENTS_FILE) as w:
        w.write({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields})


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's history, oldest first."""
    return read_jsonl(Path(run_dir) / EVENTS_FILE)


def current_strategy(run_dir: str | Path) -> dict[str, Any]:
    """`strategy.toml` (the start of the run) with the changes its history records applied, as a nested table."""
    p = Path(run_dir)
    tree = read_toml(p / STRATEGY_FILE) if (p / STRATEGY_FILE).is_file() else {}
    for event in read_events(p):
        for key, (_, new) in (event.get("changed") or {}).items():
            section, _, name = key.partition(".")
            table = tree.setdefault(section, {})
            if new is None:
                table.pop(name, None)
            else:
                table[name] = new
    return tree


# --------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------


def summarize(rows: Sequence[Mapping[str, Any]], facts: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of a run from its whole history (the rows in effect) and the trainer's final facts.

    `facts` holds what the rows cannot say (status, counters, wall time, world size, events,
    loss unit, unigram entropy). Losses come from every row of the run, before and after any
    resume, so a resumed run's summary equals an uninterrupted one's.

    >>> rows = [{"step": 1, "loss": 3.0, "val_loss": 2.5}, {"step": 2, "loss": 2.0, "val_loss": 2.7}]
    >>> summarize(rows, {"status": "finished"})["best_val_loss"]
    2.5
    """
    last = rows[-1] if rows else {}
    vals = [v for v in (_finite(r.get("val_loss")) for r in rows) if v is not None]
    last_val: Mapping[str, Any] = next((r for r in reversed(rows) if r.get("val_loss") is not None), {})
    summary: dict[str, Any] = {
        "status": facts.get("status", "finished"),
        "final_loss": last.get("loss"),
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        **{k: v for k, v in last_val.items() if k.startswith("val_") and k != "val_loss"},
        "peak_memory_mb": max((v for v in (_finite(r.get("peak_memory_mb")) for r in rows) if v is not None), default=None),
    }
    summary.update({k: v for k, v in facts.items() if k not in summary or summary[k] is None})
    return summary


def write_summary(run_dir: str | Path, summary: Mapping[str, Any]) -> None:
    """Replace `summary.json` by rename (never a torn summary)."""
    write_atomic(Path(run_dir) / SUMMARY_FILE, json.dumps(dict(summary), indent=2) + "\n")


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """`summary.json`, or None for a run that has not finished (or is writing it right now)."""
    return read_json(Path(run_dir) / SUMMARY_FILE)


# --------------------------------------------------------------------------------------------
# A run, as read from disk
# --------------------------------------------------------------------------------------------


def flatten_strategy(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`{"section": {"key": v}}` -> `{"section.key": v}` (`regimen.strategy.flatten`, the one flattener).

    Example:
        >>> flatten_strategy({"optimizer": {"name": "adam", "lr": 0.001}})
        {'optimizer.name': 'adam', 'optimizer.lr': 0.001}
    """
    return flatten(tree)


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
        """The metric rows in effect, in order (`resolve_rows`: what a resumed run redid replaces what it undid)."""
        if "rows" not in self._cache:
            self._cache["rows"] = resolve_rows(self.metrics)
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

    The strategy is the one in effect at the end (`current_strategy`: the start plus the changes
    the run's history records).

    Example:
        >>> load_run("runs/adam").status                          # doctest: +SKIP
        'finished'
    """
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"run directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise UserError(f"run directory {str(path)!r} is not a directory")
    summary = read_summary(path)
    if not (path / METRICS_FILE).is_file() and summary is None:
        raise UserError(f"{str(path)!r} is not a run directory: it has no {METRICS_FILE} (runs made by `regimen train` have one)")
    return Run(
        name=path.resolve().name or str(path),
        path=path,
        strategy=current_strategy(path),
        metrics=read_metrics(path / METRICS_FILE),  # none for a run that failed before its first step
        summary=summary,
    )


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
