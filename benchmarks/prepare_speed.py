"""`regimen prepare` throughput against encoding the same corpus with `tokenizers` in a plain loop.

The corpus is the standard library's `.py` files (those that are UTF-8, as a tokenizer needs),
written out as text files: the built-in `stdlib` source's text. Three tokenizers: bytes, and the
byte-level BPEs of 8k and 50k tokens that `regimen prepare --tokenizer bpe:N` trains on it
(trained once, beforehand; the timed runs load their tokenizer.json, so what is timed is reading,
splitting, encoding and writing, not training).

- plain loop (the floor): one process reads every file, encodes it with
  `tokenizer.encode(text).ids` (bytes: `np.frombuffer`), and writes the ids as one uint16 file;
- `regimen prepare --jobs 1` and `--jobs 2`: the whole command, into a fresh --out each time.

Each is a fresh process timed from outside (both pay Python's start and their imports), the
median of several repeats, as MB of text per second. The target: prepare with 1 job reaches at
least 0.9 of the plain loop (its orchestration costs at most 10%); 2 jobs should be near 2x on
2 free cores.

    python -m benchmarks --only prepare_speed [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Table, cli, rerun_command

FLOOR = 0.9


def stdlib_texts(out: Path, max_bytes: int | None = None) -> tuple[int, int]:
    """Write the standard library's UTF-8 `.py` files under `out` (their relative paths); (files, bytes).

    The files of the `stdlib` source (sorted, site-packages excluded), less the few that are not
    UTF-8 (a tokenizer reads text); `max_bytes` stops early (quick runs).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    count = total = 0
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        target = out / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        count, total = count + 1, total + len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return count, total


def plain_loop(corpus: Path, tokenizer: str, out: Path) -> None:
    """The floor: read, encode one file at a time, write (run in its own process by `--loop`)."""
    import numpy as np

    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    with out.open("wb") as f:
        if tokenizer == "bytes":
            for path in files:
                np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16).tofile(f)
            return
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer)
        for path in files:
            np.array(tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids, dtype=np.uint16).tofile(f)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return seconds


def run(quick: bool) -> list[Table]:
    """Plain loop vs prepare with 1 and 2 jobs, for bytes and two trained BPEs."""
    repeats = 2 if quick else 3
    vocabs = (512, 1024) if quick else (8192, 50_257)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "stdlib"
        n_files, n_bytes = stdlib_texts(corpus, 1_500_000 if quick else None)
        mb = n_bytes / 1e6
        tokenizers: list[tuple[str, str]] = [("bytes", "bytes")]
        for vocab in vocabs:
            out = tmp / f"bpe{vocab}"
            seconds = timed(
                [sys.executable, "-m", "regimen", "prepare", str(corpus), "--out", str(out), "--tokenizer", f"bpe:{vocab}"], env
            )
            actual = json.loads((out / "meta.json").read_text())["vocab_size"]
            tokenizers.append((f"BPE {actual:,} (trained in {seconds:.0f} s)", str(out / "tokenizer.json")))
        for label, tokenizer in tokenizers:
            loop_cmd = [sys.executable, "-m", "benchmarks.prepare_speed", "--loop", str(corpus), tokenizer, str(tmp / "loop.bin")]
            loop = statistics.median(timed(loop_cmd, env) for _ in range(repeats))
            row: list[Any] = [label, mb / loop]
            for jobs in (1, 2):
                times = []
                for _ in range(repeats):
                    out = tmp / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = [sys.executable, "-m", "regimen", "prepare", str(corpus), "--out", str(out), "--tokenizer", tokenizer]
                    times.append(timed([*cmd, "--jobs", str(jobs)], env))
                seconds = statistics.median(times)
                row += [mb / seconds, loop / seconds]
            rows.append(row)
    worst = min(r[3] for r in rows[1:])  # the floor is against tokenizers; bytes have no tokenizer to compare with
    notes = [
        f"Corpus: {n_files:,} UTF-8 .py files of the standard library, {mb:.1f} MB; median of {repeats} fresh processes each; "
        "prepare with its default --val-fraction 0.1 (writes train.bin and val.bin).",
        "Plain loop: `tokenizer.encode(text).ids` per file, one process, one core (TOKENIZERS_PARALLELISM=false), ids written as uint16.",
        f"Lowest prepare --jobs 1 / plain loop of the BPE rows: {worst:.2f} (floor >= {FLOOR}): "
        + ("met." if worst >= FLOOR else "**not met**."),
        "Bytes: the loop only copies; prepare also hashes every file (SHA-256, for reruns) and every piece (BLAKE2b, for the split) "
        "in passes of their own, and fsyncs; its row shows what that costs.",
    ]
    return [
        Table(
            "regimen prepare throughput against a plain tokenizers loop",
            ["tokenizer", "plain loop MB/s", "prepare 1 job MB/s", "x loop (1 job)", "prepare 2 jobs MB/s", "x loop (2 jobs)"],
            rows,
            rerun_command("prepare_speed", quick),
            notes,
            {
                "x loop (1 job)": ".2f",
                "x loop (2 jobs)": ".2f",
                "plain loop MB/s": ".2f",
                "prepare 1 job MB/s": ".2f",
                "prepare 2 jobs MB/s": ".2f",
            },
        )
    ]


def main() -> None:
    if "--loop" in sys.argv:  # the plain loop's own process
        parser = argparse.ArgumentParser()
        parser.add_argument("--loop", nargs=3, metavar=("CORPUS", "TOKENIZER", "OUT"))
        corpus, tokenizer, out = parser.parse_args().loop
        plain_loop(Path(corpus), tokenizer, Path(out))
        return
    cli(run, __doc__)


if __name__ == "__main__":
    main()
