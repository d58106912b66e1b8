"""What a run shows and records: the progress display and `metrics.jsonl`.

Only rank 0 observes. `metrics.jsonl` gets one JSON object per logged step (and one per
evaluation), flushed line by line so a report can read a run that is still going; a resumed
run appends after dropping the rows past its checkpoint, so no step is ever duplicated.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with MetricsWriter(d / "metrics.jsonl") as w:
    ...     w.write({"step": 1, "loss": 2.5})
    >>> read_metrics(d / "metrics.jsonl")
    [{'step': 1, 'loss': 2.5}]
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a torn last line (a run killed mid-write) is ignored."""
    rows: list[dict[str, Any]] = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsWriter:
    """Appends rows to `metrics.jsonl`; `truncate_after(step)` drops rows a resume will redo."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file: TextIO = self.path.open("a")

    def truncate_after(self, step: int) -> None:
        """Keep only rows with `step <= step` (rows past a checkpoint are recomputed)."""
        self.file.close()
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"


class ProgressDisplay:
    """A tqdm bar on a terminal, plain log lines otherwise (CI logs, pipes, files).

    `total` is the budget in its own unit (steps, samples or tokens); `update(done, info)`
    moves the bar to `done` and shows step, loss, lr, batch size and tokens/s.
    """

    def __init__(self, total: float, unit: str, mode: str = "auto", stream: TextIO | None = None, initial: float = 0.0) -> None:
        self.stream = stream or sys.stderr
        self.unit = unit
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.total = total
        self.start = time.perf_counter()
        self.initial = initial
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit=unit[:-1] if unit.endswith("s") else unit,
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, done: float, info: dict[str, Any]) -> None:
        done = min(done, self.total)  # the last step may pass a samples or tokens budget: show 100%
        text = f"loss {info['loss']:.4f}  lr {info['lr']:.2e}  bs {info['batch_size']}  {_fmt_rate(info.get('tokens_per_s', 0.0))} tok/s"
        if self.bar is not None:
            self.bar.set_description(f"step {info['step']}", refresh=False)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(done - self.bar.n)
        elif self.mode == "lines":
            elapsed = time.perf_counter() - self.start
            frac = (done - self.initial) / max(self.total - self.initial, 1e-9)
            eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
            print(f"step {info['step']:>6}  {text}  {100 * done / self.total:5.1f}%  eta {eta:5.0f}s", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.mode != "none":
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoardLogger:
    """Optional TensorBoard scalars (needs the `tensorboard` package)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()
