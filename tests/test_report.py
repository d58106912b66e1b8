"""Tests of regimen.report: run directories in, PNGs and a self-contained report.html out.

The run directories are fakes written here (strategy.toml from `Strategy`, metrics.jsonl rows
from simple formulas), shaped like the trainer's: finished runs have summary.json, running
ones do not and may end in a half-written line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from regimen.cli import main as cli_main
from regimen.errors import UserError
from regimen.figures import plot_style, single_figures
from regimen.ranking import rank_runs, strategy_diff
from regimen.report import write_report
from regimen.rundir import load_run, read_metrics
from regimen.strategy import Strategy
from tests.html_page import Page

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = {"train.steps": 200}


def make_run(
    path: Path,
    overrides: dict[str, Any] | None = None,
    *,
    floor: float = 1.5,
    steps: int = 200,
    every: int = 10,
    val_every: int | None = 50,
    finished: bool = True,
    truncated: bool = False,
    noise: bool = False,
    random_batch: bool = False,
    model: str = "gpt",
    seconds_per_step: float = 0.05,
) -> Path:
    """A fake run directory: loss = floor + 4 exp(-3 t), val loss 0.05 above it, every `every` steps.

    Evaluations are logged as a second row for the same step (as the trainer does), a finished
    run gets a summary.json, and `truncated` ends metrics.jsonl in half a line.
    """
    path.mkdir(parents=True)
    tree: dict[str, Any] = {**BASE, **(overrides or {})}
    if model == "mlp":
        tree |= {"model.name": "mlp", "data.source": "synthetic"}
    Strategy().replace(tree).resolve().save(path / "strategy.toml")
    tokens_per_sample = 64 if model == "gpt" else 1
    peak, constant = tree.get("optimizer.lr", 1e-3), tree.get("lr.schedule") == "constant"
    rows, samples = [], 0
    for step in range(every, steps + 1, every):
        batch = 32 if not random_batch else 16 + 16 * (step // every % 3)
        samples += batch * every
        t = step / steps
        row = {
            "step": step,
            "samples": samples,
            "tokens": samples * tokens_per_sample,
            "loss": floor + 4 * math.exp(-3 * t),
            "lr": peak if constant else peak * (1 + math.cos(math.pi * t)) / 2,
            "batch_size": batch,
            "time": step * seconds_per_step,
            "tokens_per_s": 1000.0 / seconds_per_step,
        }
        if noise:
            row["noise_scale"] = 50 + 400 * t
        rows.append(row)
        if val_every and step % val_every == 0:
            rows.append({**row, "val_loss": row["loss"] + 0.05, "time": row["time"] + 0.01})
    lines = [json.dumps(r) for r in rows]
    if truncated:
        lines.append(json.dumps(rows[-1])[:25])
    (path / "metrics.jsonl").write_text("\n".join(lines) + ("" if truncated else "\n"))
    if finished:
        last = rows[-1]
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        summary = {
            "status": "finished",
            "final_loss": last["loss"],
            "final_val_loss": vals[-1] if vals else None,
            "best_val_loss": min(vals) if vals else None,
            "tokens_per_s": last["tokens_per_s"],
            "wall_time": last["time"],
            "peak_memory_mb": 812.0,
            "steps": last["step"],
            "samples": last["samples"],
            "tokens": last["tokens"],
            "unigram_entropy": 3.2,
        }
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def three_runs(tmp_path: Path) -> list[Path]:
    """a (middle), b (winner: a larger LR), c (still running, truncated last line, worst)."""
    return [
        make_run(tmp_path / "a", {}, floor=1.5),
        make_run(tmp_path / "b", {"optimizer.lr": 3e-3}, floor=1.2, seconds_per_step=0.08),
        make_run(tmp_path / "c", {"lr.schedule": "constant"}, floor=1.8, finished=False, truncated=True),
    ]


def check_self_contained(report: Path) -> Page:
    """Every image is a local PNG beside the report; nothing reaches for the network."""
    text = report.read_text()
    page = Page(text)
    srcs = [img["src"] for img in page.all("img")]
    assert srcs, "the report has no figures"
    for src in srcs:
        assert "/" not in src and ":" not in src, f"not a relative local path: {src}"
        png = report.parent / src
        assert png.is_file(), f"missing figure {src}"
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    assert "http://" not in text and "https://" not in text and "url(" not in text
    return page


def test_comparison_report(tmp_path: Path) -> None:
    runs = three_runs(tmp_path)
    report = write_report(runs, tmp_path / "out")
    assert report == tmp_path / "out" / "report.html"
    page = check_self_contained(report)
    srcs = {img["src"] for img in page.all("img")}
    assert {"loss_steps.png", "loss_tokens.png", "loss_time.png", "schedules.png"} <= srcs
    assert "noise.png" not in srcs  # nobody logged the noise scale

    ranking = page.rows["ranking"]
    assert [r["data-run"] for r in ranking] == ["b", "a", "c"]
    assert [r.get("class") for r in ranking] == ["winner", None, None]
    assert [r["data-rank"] for r in ranking] == ["1", "2", "3"]

    # Without a base: the keys on which the runs differ from each other, and only those.
    varied = {th["data-key"] for th in page.all("th") if "data-key" in th}
    assert varied == {"optimizer.lr", "lr.schedule"}
    assert [r["data-run"] for r in page.rows["diff"]] == ["a", "b", "c"]
    text = report.read_text()
    assert "★ winner" in text and "running" in text
    # The automatic target is the worst best val loss (c's), which every run reaches.
    c_best = 1.8 + 4 * math.exp(-3) + 0.05
    assert f"time to ≤ {c_best:.4f}" in text
    assert "worst best validation loss" in text


def test_strategy_diff_against_base(tmp_path: Path) -> None:
    runs = [load_run(p) for p in three_runs(tmp_path)]
    base = Strategy().replace(BASE).resolve().flat()
    assert strategy_diff(runs, base) == {"a": {}, "b": {"optimizer.lr": 3e-3}, "c": {"lr.schedule": "constant"}}
    assert strategy_diff(runs) == {
        "a": {"optimizer.lr": 1e-3, "lr.schedule": "cosine"},
        "b": {"optimizer.lr": 3e-3, "lr.schedule": "cosine"},
        "c": {"optimizer.lr": 1e-3, "lr.schedule": "constant"},
    }
    # A nested base works the same, and the page shows exactly the differing cells.
    report = write_report([r.path for r in runs], tmp_path / "out", base=Strategy().replace(BASE).resolve().to_dict())
    page = Page(report.read_text())
    cells = [td["data-key"] for td in page.all("td") if "value" in td.get("class", "").split()]
    assert sorted(cells) == ["lr.schedule", "optimizer.lr"]


def test_target_loss_given(tmp_path: Path) -> None:
    runs = three_runs(tmp_path)
    report = write_report(runs, tmp_path / "out", target_loss=2.0)
    text = report.read_text()
    assert "time to ≤ 2.0000" in text and "given with --target-loss" in text
    # b: val loss 1.25 + 4 exp(-3 t) <= 2 from t = 0.56, so first at the evaluation of step 150,
    # logged at 150 x 0.08 + 0.01 s; a at the same step, 150 x 0.05 + 0.01 s; c never gets below 2.
    assert "12.0 s<br><small>step 150</small>" in text
    assert "7.5 s<br><small>step 150</small>" in text
    assert "not reached" in text


def plot_run(run_dir: Path) -> list[Path]:
    """The figures of a one-run page, drawn into the run directory."""
    with plot_style():
        return [run_dir / f.file for f in single_figures(load_run(run_dir), run_dir, include_progress=False)]


def main(argv: list[str]) -> int:
    return cli_main(["report", *argv])


def test_run_figures(tmp_path: Path) -> None:
    fixed = make_run(tmp_path / "fixed")
    assert plot_run(fixed) == [fixed / "loss.png"]
    assert (fixed / "loss.png").read_bytes()[:8] == PNG_MAGIC
    varied = make_run(tmp_path / "varied", random_batch=True)
    assert plot_run(varied) == [varied / "loss.png", varied / "batch.png"]
    noisy = make_run(tmp_path / "noisy", noise=True, finished=False)
    assert [p.name for p in plot_run(noisy)] == ["loss.png", "batch.png"]


def test_running_run_and_truncated_line(tmp_path: Path) -> None:
    path = make_run(tmp_path / "going", finished=False, truncated=True)
    lines = (path / "metrics.jsonl").read_text().splitlines()
    assert len(read_metrics(path / "metrics.jsonl")) == len(lines) - 1
    run = load_run(path)
    assert run.status == "running" and run.summary is None
    assert run.steps == 200 and run.best_val_loss == pytest.approx(1.5 + 4 * math.exp(-3) + 0.05)
    # The evaluation rows repeat their step: one point per step in the train-loss series.
    assert len(run.series("loss")) == 20 and len(run.series("val_loss")) == 4
    report = write_report([path], tmp_path / "out")
    check_self_contained(report)
    assert "still going" in report.read_text()


def test_resumed_run_replaces_rolled_back_steps(tmp_path: Path) -> None:
    """A run resumed from the checkpoint at step 50 logs 60.. again: those rows win, and what
    the first attempt logged after step 50 (up to its crash at 100) is gone."""
    path = make_run(tmp_path / "resumed", steps=100, val_every=None, finished=False)
    with open(path / "metrics.jsonl", "a") as f:
        for step in (60, 70, 80):
            f.write(json.dumps({"step": step, "samples": step * 32, "tokens": step * 2048, "loss": 9.0, "time": step * 0.05}) + "\n")
    run = load_run(path)
    assert [(s, y) for s, _, y in run.series("loss")][-4:] == [
        (50, pytest.approx(1.5 + 4 * math.exp(-1.5))),
        (60, 9.0),
        (70, 9.0),
        (80, 9.0),
    ]
    assert run.steps == 80 and run.final_loss == 9.0


def test_awkward_runs(tmp_path: Path) -> None:
    """No val_loss, a single row, NaN / null values, an empty file: pages, no crash."""
    no_val = make_run(tmp_path / "no_val", val_every=None, finished=False)
    one = make_run(tmp_path / "one", steps=10, every=10, val_every=10, finished=False, floor=1.7)
    nan = make_run(tmp_path / "nan", finished=False)
    with open(nan / "metrics.jsonl", "a") as f:
        f.write('{"step": 210, "samples": 1, "tokens": 1, "loss": NaN, "lr": 0.001, "time": 11.0, "val_loss": Infinity}\n')
        f.write('{"step": 220, "samples": 2, "tokens": 2, "loss": null, "lr": "oops", "time": 12.0}\n')
        f.write("[1, 2]\n\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")

    run = load_run(nan)
    assert run.final_loss is not None and math.isnan(run.final_loss)  # the last logged loss: diverged
    assert all(math.isfinite(y) for _, _, y in run.series("loss"))
    assert run.steps == 220
    assert load_run(empty).best_val_loss is None and load_run(empty).status == "running"

    for path in (no_val, one, nan, empty):
        check_self_contained(write_report([path], tmp_path / "single" / path.name))
    assert plot_run(empty) == [empty / "loss.png"]
    report = write_report([no_val, one, nan, empty], tmp_path / "all")
    page = check_self_contained(report)
    # Ranked on val loss first (one, nan), then on train loss (no_val), then nothing (empty).
    assert [r["data-run"] for r in page.rows["ranking"]] == ["nan", "one", "no_val", "empty"]
    assert [r.name for r in rank_runs([load_run(p) for p in (empty, no_val, one)])] == ["one", "no_val", "empty"]


def test_samples_axis_for_non_sequence_models(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "m1", model="mlp"), make_run(tmp_path / "m2", {"optimizer.lr": 0.01}, model="mlp")]
    report = write_report(runs, tmp_path / "out")
    srcs = {img["src"] for img in check_self_contained(report).all("img")}
    assert "loss_samples.png" in srcs and "loss_tokens.png" not in srcs
    assert "nats/sample" in report.read_text()


def test_noise_scale_figure(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "a", noise=True), make_run(tmp_path / "b", {"optimizer.lr": 0.01})]
    srcs = {img["src"] for img in check_self_contained(write_report(runs, tmp_path / "out")).all("img")}
    assert "noise.png" in srcs


def test_single_run_page(tmp_path: Path) -> None:
    path = make_run(tmp_path / "solo", random_batch=True)
    summary = json.loads((path / "summary.json").read_text())
    events = [{"event": "skip", "step": 7}, {"event": "skip", "step": 8}, {"event": "rollback", "step": 8, "to_step": 5}]
    (path / "summary.json").write_text(json.dumps({**summary, "events": events, "val_accuracy": 0.5}))
    report = write_report([path], path, target_loss=3.0)
    assert report == path / "report.html"
    page = check_self_contained(report)
    assert {img["src"] for img in page.all("img")} == {"loss.png", "loss_progress.png", "batch.png"}
    text = report.read_text()
    for needle in (
        "best val loss",
        "unigram entropy",
        "812 MB",
        "[optimizer]",
        "time to ≤ 3.0000",
        "finished",
        "2 steps skipped, 1 rollback",
    ):
        assert needle in text
    keys = {tr["data-key"] for tr in page.all("tr") if "data-key" in tr}
    assert {"optimizer.lr", "lr.schedule", "batch.size"} <= keys


def test_same_directory_names(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "x" / "adam"), make_run(tmp_path / "y" / "adam", {"optimizer.lr": 0.01})]
    page = check_self_contained(write_report(runs, tmp_path / "out"))
    assert sorted(r["data-run"] for r in page.rows["ranking"]) == ["x/adam", "y/adam"]


def test_bad_run_dirs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(UserError, match=r"no metrics\.jsonl") as info:
        write_report([tmp_path / "not_a_run"], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert main([str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, _ = three_runs(tmp_path)
    assert main([str(a)]) == 0
    assert capsys.readouterr().out.strip() == str(a / "report.html")
    assert (a / "report.html").is_file() and (a / "loss.png").is_file()

    monkeypatch.chdir(tmp_path)
    assert main(["a", "b"]) == 0
    assert capsys.readouterr().out.strip() == str(Path("report") / "report.html")
    assert (tmp_path / "report" / "report.html").is_file()

    assert main([str(a), str(b), "--out", str(tmp_path / "cmp"), "--target-loss", "2.5"]) == 0
    assert "time to ≤ 2.5000" in (tmp_path / "cmp" / "report.html").read_text()
