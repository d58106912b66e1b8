"""Bytes against a byte-level BPE on the built-in GPT: validation loss per byte of text at equal wall time.

The corpus is the standard library's UTF-8 `.py` files written out as text
(`prepare_speed.stdlib_texts`), prepared twice with `regimen prepare`: `--tokenizer bytes` and
`--tokenizer bpe:8192`. Both directories hold the same validation text (prepare's split is by
content, whatever the tokenizer), so their losses per byte of text compare directly.

The model and strategy are `examples/fast_gpt.toml` (4 layers, 4 heads, width 128, context 64,
Muon, WSD, batch 16). A BPE token carries about 3 bytes, so each step of the BPE run reads about 3x
more text, but its 8,192-way embedding and head make the step slower. Equal wall time: a short
calibration run of each measures its training seconds per step (evaluation excluded), and the BPE
run gets `steps x (bytes s/step) / (BPE s/step)` steps, so both finish their whole LR schedule in the
same training time. Reported: the final validation loss in nats per byte (nats/token divided by the
validation split's bytes per token, `final_val_loss_per_byte` of the run's summary), the steps, the
training time, and the text each run read.

    python -m benchmarks --only bpe_vs_bytes [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Table, cli, rerun_command, threads
from benchmarks.prepare_speed import stdlib_texts

RECIPE = ROOT / "examples" / "fast_gpt.toml"
QUIET = ["observe.progress=none", "observe.report=false", "observe.samples=0", "train.log_every=25"]


def _regimen(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads())}
    proc = subprocess.run([sys.executable, "-m", "regimen", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"regimen {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def train(tokens: Path, run_dir: Path, steps: int, extra: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train fast_gpt.toml on a tokens directory; (summary, metrics rows)."""
    _regimen("train", str(RECIPE), f"data.source=tokens:{tokens}", f"train.steps={steps}", *QUIET, *extra, "--run-dir", str(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, rows


def seconds_per_step(rows: list[dict[str, Any]]) -> float:
    """Training seconds per step between the first and the last logged row (evaluation excluded)."""
    first, last = rows[0], rows[-1]
    train_time = (last["time"] - last["eval_time"]) - (first["time"] - first["eval_time"])
    return train_time / max(last["step"] - first["step"], 1)


def run(quick: bool) -> list[Table]:
    """Bytes and BPE-8192 at equal training time on fast_gpt.toml."""
    steps = 20 if quick else 600
    calibration = 8 if quick else 40
    vocab = 1024 if quick else 8192
    extra = ["train.eval_every=10", "train.eval_samples=64"] if quick else []
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        n_files, n_bytes = stdlib_texts(tmp / "stdlib", 1_500_000 if quick else None)
        dirs = {"bytes": tmp / "bytes", f"BPE {vocab:,}": tmp / "bpe"}
        _regimen("prepare", str(tmp / "stdlib"), "--out", str(dirs["bytes"]), "--tokenizer", "bytes")
        _regimen("prepare", str(tmp / "stdlib"), "--out", str(dirs[f"BPE {vocab:,}"]), "--tokenizer", f"bpe:{vocab}")
        metas = {name: json.loads((d / "meta.json").read_text()) for name, d in dirs.items()}
        assert len({m["splits"]["val"]["bytes"] for m in metas.values()}) == 1, "both must validate on the same text"
        per_step = {
            name: seconds_per_step(
                train(d, tmp / f"calibrate-{d.name}", calibration, [*extra, "train.eval_every=1000", "train.log_every=1"])[1]
            )
            for name, d in dirs.items()
        }
        base = per_step["bytes"]
        for name, d in dirs.items():
            n_steps = max(round(steps * base / per_step[name]), 1)
            summary, metrics = train(d, tmp / f"run-{d.name}", n_steps, extra)
            last = metrics[-1]
            split = metas[name]["splits"]["train"]
            text_read = summary["tokens"] * split["bytes"] / split["tokens"]
            rows.append(
                [
                    name,
                    n_steps,
                    last["time"] - last["eval_time"],
                    text_read / 1e6,
                    summary["final_val_loss"],
                    summary["final_val_loss_per_byte"],
                    summary["bytes_per_token"]["val"],
                ]
            )
    bytes_row, bpe_row = rows
    better = "BPE" if bpe_row[5] < bytes_row[5] else "bytes"
    notes = [
        f"Corpus: {n_files:,} UTF-8 .py files of the standard library, {n_bytes / 1e6:.1f} MB, prepared with bytes and bpe:{vocab} "
        f"(the same validation text, {metas['bytes']['splits']['val']['bytes'] / 1e6:.2f} MB). Strategy: examples/fast_gpt.toml.",
        f"Equal training time: the BPE run's steps are {steps} x (bytes s/step) / (BPE s/step), measured in {calibration}-step "
        "calibration runs; evaluation time is excluded from the training time.",
        f"Lower nats/byte is better: {better} ({min(bytes_row[5], bpe_row[5]):.4f} against {max(bytes_row[5], bpe_row[5]):.4f}).",
    ]
    return [
        Table(
            "Bytes against BPE on the built-in GPT at equal training time",
            ["tokenizer", "steps", "train s", "text read MB", "val nats/token", "val nats/byte", "val bytes/token"],
            rows,
            rerun_command("bpe_vs_bytes", quick),
            notes,
            {"train s": ".0f", "text read MB": ".1f", "val nats/token": ".4f", "val nats/byte": ".4f", "val bytes/token": ".2f"},
        )
    ]


if __name__ == "__main__":
    cli(run, __doc__)
