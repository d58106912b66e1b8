"""What a run shows as it trains: the progress display, and the logged rows' other sinks (TensorBoard).

Only rank 0 observes. The rows themselves are written to the run directory's `metrics.jsonl`
by `regimen.rundir.MetricsWriter`.

Example:
    >>> import io
    >>> d = ProgressDisplay(10, "steps", mode="lines", stream=io.StringIO())
    >>> d.update(5, {"step": 5, "loss": 2.0, "lr": 1e-3, "batch_size": 8}); d.close()
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO


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
