"""The command line as a user meets it: exit codes, one-line errors, run directories."""

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY_GPT, run_cli


def test_help_does_not_import_torch():
    code = "import sys; from regimen.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_print_config_is_resolved_toml():
    r = run_cli("train", "optimizer.name=sgd", "--print-config")
    assert r.returncode == 0, r.stderr
    assert 'name = "sgd"' in r.stdout and 'scale_with_batch = "linear"' in r.stdout


def test_print_config_from_file(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[optimizer]\nname = "adam"\n')
    r = run_cli("train", str(cfg), "optimizer.lr=0.5", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "lr = 0.5" in r.stdout and 'name = "adam"' in r.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["optimizer.lr=-1"], "optimizer.lr = -1: must be > 0"),
        (["optimizer.nme=adam"], "unknown key 'optimizer.nme'"),
        (["lr.warmup=5000", "train.steps=100"], "lr.warmup"),
        (["batch.size=4", "batch.micro=8"], "batch.micro = 8"),
        (["missing.toml"], "does not exist"),
        (["data.source=text:/no/such/file"], "does not exist"),
        (["--nproc", "0"], "--nproc = 0"),
    ],
)
def test_bad_input_exit_2_one_line(tmp_path, args, fragment):
    r = run_cli("train", *args, "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_data_shorter_than_context(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("tiny")
    r = run_cli("train", f"data.source=text:{text}", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "fewer than model.context + 1" in r.stderr


def test_train_writes_a_run_directory(tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", *TINY_GPT, "train.steps=6", "train.eval_every=3", "train.log_every=2", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    assert "unigram entropy" in r.stdout and "nats/byte" in r.stdout and str(run) in r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 3, 4, 6]
    for key in ("step", "samples", "tokens", "loss", "lr", "batch_size", "time"):
        assert key in rows[0]
    assert "val_loss" in rows[1] and "val_loss" in rows[3]
    assert rows[-1]["samples"] == 48 and rows[-1]["tokens"] == 48 * 16
    assert (run / "strategy.toml").read_text().count("[") >= 9
    assert (run / "loss.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
    # --overwrite replaces it
    r = run_cli("train", *TINY_GPT, "train.steps=2", "--run-dir", str(run), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
