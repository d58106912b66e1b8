"""The loggers (TensorBoard, MLflow, W&B) get every row of metrics.jsonl, read back with their own readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import regimen as rg
from regimen.errors import UserError
from regimen.rundir import read_metrics
from regimen.strategy import Strategy
from tests.conftest import ROOT, need, run_cli


def _fit(run_dir: Path, overrides: dict) -> rg.History:
    """A small run with one row per step and an evaluation every 4 steps (rows with val_loss)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    keys = {"train.log_every": 1, "train.eval_every": 4} | overrides
    return rg.fit(
        model,
        (x[:64], y[:64]),
        loss="cross_entropy",
        epochs=2,
        batch_size=8,
        validation_data=(x[64:], y[64:]),
        overrides=keys,
        run_dir=run_dir,
        verbose=False,
    )


def _numbers(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of metrics.jsonl rows, as a logger should hold them."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


def test_tensorboard_gets_every_row(tmp_path):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _fit(run, {"observe.tensorboard": True})
    expected = _numbers(read_metrics(run / "metrics.jsonl"))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert got.keys() == expected.keys() and len(expected["loss"]) == 16 and len(expected["val_loss"]) == 4
    for tag, points in expected.items():  # TensorBoard stores float32
        assert [s for s, _ in got[tag]] == [s for s, _ in points]
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6)


def test_mlflow_file_store_gets_params_every_row_and_the_artifacts(tmp_path):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    h = _fit(run, {"observe.mlflow": True})
    rows = read_metrics(run / "metrics.jsonl")
    assert rows == h.rows and len(rows) == 16
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    run_id = json.loads((run / "loggers.json").read_text())["mlflow"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    strategy = Strategy.load(run / "strategy.toml")
    assert info.data.params == {k: str(v) for k, v in strategy.flat().items()}
    for key, points in _numbers(rows).items():
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == points, key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.safetensors", "summary.json"} <= artifacts
    stored = Path(client.download_artifacts(run_id, "model.safetensors", str(tmp_path / "dl")))
    assert stored.read_bytes() == (run / "model.safetensors").read_bytes()


def test_mlflow_through_the_cli_keeps_the_report_and_a_resume_continues_the_same_run(tmp_path):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = [
        "model.name=mlp",
        "data.source=synthetic",
        "train.log_every=2",
        "train.eval_every=4",
        "observe.mlflow=true",
        "--run-dir",
        str(run),
    ]
    first = run_cli("train", *args, "train.steps=8", "checkpoint.every=4")
    assert first.returncode == 0, first.stderr
    run_id = json.loads((run / "loggers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    assert {"report.html", "loss.png", "model.safetensors"} <= {a.path for a in client.list_artifacts(run_id)}
    again = run_cli("train", *args, "train.steps=12", "checkpoint.every=4", "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "loggers.json").read_text())["mlflow"] == run_id  # the same MLflow run
    assert [m.step for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [2, 4, 6, 8, 10, 12]
    assert client.get_run(run_id).info.status == "FINISHED"


WANDB_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_ERROR_REPORTING": "false",  # no Sentry reports
    "WANDB_DISABLE_GIT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_BASE_URL": "http://127.0.0.1:9",  # were anything to try the network, it would meet a closed local port
}


def _children() -> list[str]:
    """Command lines of this process's live child processes."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            if proc.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and stat.rsplit(")", 1)[1].split()[0] != "Z":
                out.append((proc / "cmdline").read_text().replace("\0", " "))
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_wandb_offline_gets_config_every_row_and_the_artifact(tmp_path, monkeypatch):
    wandb = need("wandb")
    home = tmp_path / "home"  # W&B's settings, cache and staging stay in the test's directory
    env = WANDB_ENV | {
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    try:
        _fit(run, {"observe.wandb": True})
    finally:
        wandb.teardown()  # the wandb-core service ends with it
    assert not [c for c in _children() if "wandb" in c]
    rows = read_metrics(run / "metrics.jsonl")
    (offline,) = (run / "wandb").glob("offline-run-*")
    # W&B's own reader of the run's transaction log (`wandb leet inspect`), as JSON records.
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env}, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged = [{k: v for k, v in item.items() if not k.startswith("_")} for item in history]
    assert len(logged) == len(rows) == 16
    for item, row in zip(logged, rows):
        assert item == pytest.approx({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, rel=1e-12)
    (config,) = [r["run"]["config"]["update"] for r in records if r["type"] == "run"]
    assert config["optimizer"] == Strategy.load(run / "strategy.toml").to_dict()["optimizer"]
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert {"model.safetensors", "summary.json"} <= {c["path"] for c in artifact["manifest"]["contents"]}
    assert artifact["run_id"] == json.loads((run / "loggers.json").read_text())["wandb"]


@pytest.mark.parametrize("logger,extra", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_logger_is_one_line_before_anything_is_written(tmp_path, monkeypatch, logger, extra):
    monkeypatch.setitem(sys.modules, logger, None)  # what an environment without the package looks like to import
    with pytest.raises(UserError, match=rf"observe.{logger} = true needs the {logger} package: pip install 'regimen\[{extra}\]'"):
        _fit(tmp_path / "run", {f"observe.{logger}": True})
    assert not (tmp_path / "run").exists()


def test_a_missing_logger_through_the_cli_is_exit_2(tmp_path):
    argv = ["train", "model.name=mlp", "data.source=synthetic", "train.steps=2", "observe.mlflow=true", "--run-dir", str(tmp_path / "run")]
    code = f"import sys; sys.modules['mlflow'] = None; from regimen.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "regimen: error: observe.mlflow = true needs the mlflow package: pip install 'regimen[mlflow]'"
    ]
    assert not (tmp_path / "run").exists()


def test_loggers_need_a_run_directory_in_fit():
    with pytest.raises(UserError, match=r"observe\.mlflow = true logs beside a run directory: pass run_dir="):
        rg.fit(
            nn.Linear(2, 2),
            (torch.randn(8, 2), torch.randint(0, 2, (8,))),
            loss="cross_entropy",
            batch_size=4,
            overrides={"observe.mlflow": True},
            verbose=False,
        )
