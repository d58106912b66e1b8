"""What every benchmark shares: a result table, the machine it ran on, timing helpers, and
the `BENCHMARKS.md` sections that reruns update in place.

A benchmark module exposes `run(quick: bool) -> list[Table]`. Every figure a table shows is a
ratio against a baseline measured in the same run (median of several repeats); the absolute
numbers are printed beside it for context and are never asserted: they depend on the machine
and on whatever else it is doing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = """# Benchmarks

Produced by `python -m benchmarks --write` (`make bench`; the peers need `make bench-env`). Each
section below is rewritten in place by a rerun of its benchmark, between its marker comments.
Every figure is a ratio against a baseline measured in the same run, the median of several
repeats; absolute numbers depend on the machine and its load and are shown for context only.
"""


@dataclass
class Table:
    """One result table: what was measured, how to rerun it, and the rows.

    `rows` hold plain values; floats are formatted with `fmt` (per column name, default 3
    significant digits). `notes` are printed under the table: what the baseline is, which
    targets are met and where regimen is behind.
    """

    title: str
    columns: list[str]
    rows: list[list[Any]]
    command: str
    notes: list[str] = field(default_factory=list)
    fmt: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        rule = "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + " |"
        body = ["| " + " | ".join(self._cell(c, v) for c, v in zip(self.columns, row)) + " |" for row in self.rows]
        parts = [f"### {self.title}", "", f"`{self.command}`", "", head, rule, *body]
        if self.notes:
            parts += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(parts)

    def _cell(self, column: str, value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return format(value, self.fmt.get(column, ".3g"))
        return str(value)


@dataclass
class Section:
    """A benchmark's part of `BENCHMARKS.md`: its tables, or the text a foreign script printed."""

    name: str
    tables: list[Table] = field(default_factory=list)
    text: str = ""
    machine: str = ""
    seconds: float = 0.0

    def markdown(self) -> str:
        parts = [f"## {self.name}", "", f"_{self.machine}; the benchmark took {self.seconds:.0f} s._", ""]
        parts += [t.markdown() + "\n" for t in self.tables]
        if self.text:
            parts += [self.text.rstrip() + "\n"]
        return "\n".join(parts).rstrip() + "\n"


def machine() -> str:
    """One line of machine facts: CPU, cores, torch threads, versions, load, date."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"Python {platform.python_version()}{load}; {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


def rounds(quick: bool, full: int = 5) -> int:
    """Interleaved rounds of a timing benchmark: $BENCH_ROUNDS when set (fewer rounds, a wider range,
    to fit a time budget), else 2 with --quick and `full` without."""
    return int(os.environ.get("BENCH_ROUNDS", "0")) or (2 if quick else full)


def threads() -> int:
    """Torch threads for every measurement: $BENCH_THREADS (`--threads`), else torch's default.

    Set once for the whole suite and passed to every worker process, so every loop and every
    optimizer in one table runs with the same number of threads.
    """
    import torch

    return int(os.environ.get("BENCH_THREADS", "0")) or torch.get_num_threads()


def set_threads() -> int:
    """Apply `threads()` to this process; returns it."""
    import torch

    n = threads()
    torch.set_num_threads(n)
    return n


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def python_command(module: str, *args: str) -> list[str]:
    """`python -m benchmarks.<module> args...` with this interpreter."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def run_worker(cmd: Sequence[str], timeout: float = 900.0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a worker subprocess that prints one JSON object as its last line; return it.

    Workers are separate processes so each measures a clean peak RSS and pays its own imports.
    """
    proc = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        output = (proc.stderr or proc.stdout).strip().splitlines()
        # torchrun ends with its own summary of which rank died; the cause is further up.
        causes = [ln for ln in output[:-15] if any(w in ln for w in ("Error", "error:", "terminate", "what()", "Abort", "Signal"))]
        tail = [*causes[-10:], *(["..."] if causes else []), *output[-15:]]
        raise RuntimeError(f"worker {' '.join(cmd)} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(lines[-1])


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float:
    """Start the peak-RSS count afresh (Linux: /proc/self/clear_refs); returns the RSS now, MiB.

    Workers call it once the data every loop shares is loaded, so that the peak they report is
    the loop's own (model, framework, optimizer state, activations) and not the one-off peak of
    reading the corpus, which is the same for every loop. Where the reset is not possible the
    peak stays the whole process's.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return float("nan")


def rerun_command(module: str, quick: bool) -> str:
    """The command that reproduces one benchmark's section."""
    threads = f" --threads {os.environ['BENCH_THREADS']}" if os.environ.get("BENCH_THREADS") else ""
    env = f"BENCH_ROUNDS={os.environ['BENCH_ROUNDS']} " if os.environ.get("BENCH_ROUNDS") else ""
    return f"{env}python -m benchmarks --only {module}" + (" --quick" if quick else "") + threads


def update_markdown(sections: Sequence[Section], path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) each section between its markers; the rest of the file is kept."""
    text = path.read_text() if path.exists() else HEADER
    for s in sections:
        start, end = f"<!-- bench:{s.name}:start -->", f"<!-- bench:{s.name}:end -->"
        block = f"{start}\n{s.markdown()}{end}"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        found = pattern.search(text)
        if found:
            text = text[: found.start()] + block + text[found.end() :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text.rstrip() + "\n")


def cli(run: Callable[[bool], list[Table]], doc: str | None = None) -> None:
    """`python -m benchmarks.<name> [--quick]`: run one benchmark and print its tables."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke test; noisier numbers)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every measurement (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    set_threads()
    print(machine())
    for t in run(args.quick):
        print()
        print(t.markdown())


def loop_worker_parser(kinds: Sequence[str], steps: int) -> Any:
    """The arguments of a loop benchmark's worker: `--worker KIND --steps N --warmup W --threads T`.

    A benchmark adds its own (`--size`) and prints the run's JSON (`to_json`).
    """
    import argparse

    parser = argparse.ArgumentParser(description="One run of one loop in this process; prints its result as JSON.")
    parser.add_argument("--worker", choices=list(kinds), required=True)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: $BENCH_THREADS, else torch's default)")
    return parser


def to_json(obj: Any) -> str:
    """One compact JSON line (what a worker prints last)."""
    return json.dumps(obj, separators=(",", ":"))
