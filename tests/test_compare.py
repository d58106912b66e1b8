"""`regimen compare`: the grid, run names, the [[strategies]] format, skip / resume, --jobs, the report.

The end-to-end tests train a tiny MLP on a small synthetic set (a few steps per run), once per
module; the planning tests build plans without training anything.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from regimen.compare import (
    MANIFEST,
    child_env,
    default_out,
    make_plan,
    parse_vary,
    run_names,
    run_status,
    sanitize,
    split_values,
    write_plan,
)
from regimen.errors import UserError
from regimen.ranking import MISSING, same_value, strategy_diff
from regimen.rundir import load_run, read_metrics
from tests.conftest import run_cli
from tests.html_page import Page

BLANK = Path(__file__).parent / "data" / "blank.toml"
TASK = [
    "model.name=mlp",
    "model.hidden=[16]",
    "data.source=synthetic",
    "data.num_samples=400",
    "data.num_features=8",
    "train.steps=6",
    "train.eval_every=3",
    "train.log_every=1",
    "checkpoint.every=2",
    "checkpoint.keep=3",
    "observe.report=false",
]
GRID = ["--vary", "optimizer.name=sgd,adam", "--vary", "lr.schedule=constant,linear"]
NAMES = {"sgd-constant", "sgd-linear", "adam-constant", "adam-linear"}


def metrics_mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2 x 2 grid, trained once, two runs at a time (the resume test covers one at a time)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    r = run_cli("compare", str(BLANK), *TASK, *GRID, "--jobs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_grid_makes_four_runs_and_a_report(grid: tuple[Path, str]) -> None:
    out, stdout = grid
    assert {p.name for p in out.iterdir() if (p / "metrics.jsonl").is_file()} == NAMES
    for name in NAMES:
        assert json.loads((out / name / "summary.json").read_text())["status"] == "finished"
        assert (out / "strategies" / f"{name}.toml").is_file()
    report = out / "report.html"
    assert f"report: {report}" in stdout
    tables = Page(report.read_text())
    assert set(tables.keys["ranking"]) == NAMES
    # Each run differs from the base (adamw, cosine) in exactly the two varied keys; the derived
    # lr.scale_with_batch (sqrt for adam, linear for sgd when left to `auto`) is not among them.
    assert set(tables.keys["diff"]) == NAMES
    for name, keys in tables.keys["diff"].items():
        assert sorted(keys) == ["lr.schedule", "optimizer.name"], name


def test_strategies_differ_only_in_the_varied_keys(grid: tuple[Path, str]) -> None:
    out, _ = grid
    runs = [load_run(out / name) for name in sorted(NAMES)]
    plan = make_plan(BLANK, TASK, GRID[1::2])
    diff = strategy_diff(runs, plan.report_base())
    assert diff["sgd-linear"] == {"optimizer.name": "sgd", "lr.schedule": "linear"}
    assert all(set(d) == {"optimizer.name", "lr.schedule"} for d in diff.values())
    # And without a base the runs differ from each other in the same two keys only.
    assert all(set(d) == {"optimizer.name", "lr.schedule"} for d in strategy_diff(runs).values())


def test_rerun_trains_nothing(grid: tuple[Path, str]) -> None:
    out, _ = grid
    before = metrics_mtimes(out)
    r = run_cli("compare", str(BLANK), *TASK, *GRID, "--jobs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("finished before: skipped") == 4
    assert "(0 trained now)" in r.stdout
    assert metrics_mtimes(out) == before
    assert (out / "report.html").is_file()


def test_unfinished_run_resumes_from_its_checkpoint(grid: tuple[Path, str], tmp_path: Path) -> None:
    """A run killed after its step-4 checkpoint continues from there and ends as the whole run did."""
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    run = out / "adam-linear"
    whole = read_metrics(run / "metrics.jsonl")
    # What a kill between the checkpoints of steps 4 and 6 leaves: no summary, no step-6 checkpoint.
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    r = run_cli("compare", str(BLANK), *TASK, *GRID, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "adam-linear: resuming" in r.stderr and "(step 4)" in r.stderr
    assert r.stderr.count("finished before: skipped") == 3
    resumed = read_metrics(run / "metrics.jsonl")
    assert [(x["step"], x["loss"]) for x in resumed] == [(x["step"], x["loss"]) for x in whole]
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_a_changed_plan_does_not_overwrite(grid: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    r = run_cli("compare", str(BLANK), *TASK, "optimizer.lr=0.5", *GRID, "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "holds a different strategy" in r.stderr and "optimizer.lr" in r.stderr


def test_jobs_and_a_diverging_run(tmp_path: Path) -> None:
    """--jobs 2: two `regimen train` subprocesses; the one that diverges with no checkpoint to roll
    back to is marked failed, the other run and the report go on, the failed run is ranked with
    its reason, and the comparison exits non-zero."""
    out = tmp_path / "out"
    task = [a for a in TASK if not a.startswith("checkpoint.")] + ["optimizer.name=sgd", "train.clip=0"]
    r = run_cli("compare", str(BLANK), *task, "--vary", "optimizer.lr=0.1,1e30", "--jobs", "2", "--out", str(out))
    assert r.returncode == 1, r.stderr
    assert "regimen compare: run lr1e+30 failed: training diverged" in r.stderr
    assert re.search(r"lr1e\+30 .*failed: training diverged", r.stdout), r.stdout
    assert "jobs 2" in r.stderr and r.stderr.count("thread(s)") == 2
    assert json.loads((out / "lr0.1" / "summary.json").read_text())["status"] == "finished"
    assert "regimen: finished 6 steps" in (out / "lr0.1" / "train.log").read_text()
    failed = json.loads((out / "lr1e+30" / "summary.json").read_text())
    assert failed["status"] == "failed" and "diverged" in failed["error"]
    assert "lr1e+30: failed" in r.stderr
    assert set(Page((out / "report.html").read_text()).keys["ranking"]) == {"lr0.1", "lr1e+30"}
    # A re-run would fail the same way: it is skipped.
    plan = make_plan(BLANK, task, ["optimizer.lr=0.1,1e30"])
    assert [run_status(run, out / run.name) for run in plan.runs] == ["finished", "failed"]
    r = run_cli("compare", str(BLANK), *task, "--vary", "optimizer.lr=0.1,1e30", "--out", str(out))
    assert r.returncode == 1 and "run lr1e+30 failed: training diverged" in r.stderr


def test_child_threads_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("regimen.executors.usable_cores", lambda: 8)  # the executors own the split of the cores
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert child_env(2)["OMP_NUM_THREADS"] == "4"
    assert child_env(3)["OMP_NUM_THREADS"] == "2"
    assert child_env(16)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a count the caller set is an upper bound
    assert child_env(1)["OMP_NUM_THREADS"] == "3" and child_env(4)["OMP_NUM_THREADS"] == "2"


@pytest.mark.parametrize(
    ("vary", "fragment"),
    [
        (["optimizer.nme=sgd,adam"], "unknown key 'optimizer.nme'"),
        (["optimizer.name=sgd,adamm"], "did you mean 'adam'"),
        (["optimizer.lr=0.1,-1"], "optimizer.lr = -1: must be > 0"),
        (["optimizer.name"], "expected section.key=v1,v2"),
        (["optimizer.name=sgd,,adam"], "an empty value"),
        (["lr=0.1,0.2"], "the key must be section.key"),
    ],
)
def test_bad_vary_fails_before_training(tmp_path: Path, vary: list[str], fragment: str) -> None:
    out = tmp_path / "out"
    r = run_cli("compare", str(BLANK), *TASK, *[a for v in vary for a in ("--vary", v)], "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


# ---- planning (nothing trains) ---------------------------------------------------------------


def test_vary_values_are_toml() -> None:
    assert split_values("[0.9, 0.95],[0.8, 0.9]") == ["[0.9, 0.95]", "[0.8, 0.9]"]
    assert parse_vary(["optimizer.betas=[0.9, 0.95],[0.8, 0.9]", "optimizer.nesterov=true,false", "batch.size=16,32"]) == [
        ("optimizer.betas", [[0.9, 0.95], [0.8, 0.9]]),
        ("optimizer.nesterov", [True, False]),
        ("batch.size", [16, 32]),
    ]
    with pytest.raises(UserError, match="given twice"):
        parse_vary(["optimizer.lr=1,2", "optimizer.lr=3"])
    with pytest.raises(UserError, match="repeated"):
        parse_vary(["optimizer.lr=0.1,0.1"])


def test_run_names_are_readable_and_safe() -> None:
    plan = make_plan(BLANK, TASK, ["optimizer.name=sgd,adam", "lr.schedule=constant,cosine"])
    assert [r.name for r in plan.runs] == ["sgd-constant", "sgd-cosine", "adam-constant", "adam-cosine"]
    plan = make_plan(BLANK, TASK, ["optimizer.lr=0.1,3e-4", "optimizer.betas=[0.9, 0.95],[0.9, 0.99]"])
    assert [r.name for r in plan.runs] == ["lr0.1-betas0.9_0.95", "lr0.1-betas0.9_0.99", "lr0.0003-betas0.9_0.95", "lr0.0003-betas0.9_0.99"]
    assert sanitize("../a b/c") == "a_b_c"
    assert run_names([(None, {"data.source": "text:/x/a b"}, []), (None, {"data.source": "text:/y/a b"}, [])]) == [
        "text_x_a_b",
        "text_y_a_b",
    ]
    assert run_names([("x", {}, []), ("x", {}, [])]) == ["x", "x-2"]


def test_strategies_file(tmp_path: Path) -> None:
    """[[strategies]]: a name and keys as dotted keys or tables, over the rest of the file; --vary crosses them."""
    cfg = tmp_path / "plan.toml"
    cfg.write_text(
        "\n".join(
            [
                "[model]",
                'name = "mlp"',
                "[data]",
                'source = "synthetic"',
                "[train]",
                "steps = 50",
                "",
                "[[strategies]]",
                'name = "plain sgd"',
                'optimizer.name = "sgd"',
                "optimizer.lr = 0.1",
                "",
                "[[strategies]]",
                'name = "adam"',
                "[strategies.optimizer]",
                'name = "adam"',
                "lr = 3e-3",
                "[strategies.batch]",
                "size = 64",
            ]
        )
    )
    plan = make_plan(cfg, ["train.seed=3"], [])
    assert [(r.name, r.overrides) for r in plan.runs] == [
        ("plain_sgd", {"optimizer.name": "sgd", "optimizer.lr": 0.1}),
        ("adam", {"optimizer.name": "adam", "optimizer.lr": 3e-3, "batch.size": 64}),
    ]
    assert all(r.strategy.train.seed == 3 and r.strategy.train.steps == 50 for r in plan.runs)
    # The reference batch stays the base's (32), so batch 64 scales adam's LR by the base's rule.
    assert plan.runs[1].resolved.lr.reference_batch == 32
    crossed = make_plan(cfg, [], ["train.seed=1,2"])
    assert [r.name for r in crossed.runs] == ["plain_sgd-seed1", "plain_sgd-seed2", "adam-seed1", "adam-seed2"]
    with pytest.raises(UserError, match="set by"):
        make_plan(cfg, [], ["optimizer.name=sgd,adam"])
    cfg.write_text('[[strategies]]\nname = "a"\noptimizer.nam = "sgd"\n')
    with pytest.raises(UserError, match=r"run 'a' .*unknown key 'optimizer.nam'"):
        make_plan(cfg, [], [])
    cfg.write_text('[optimizer]\nname = "sgd"\n')
    with pytest.raises(UserError, match="nothing to compare"):
        make_plan(cfg, [], [])


def test_report_base_diff_is_exactly_the_varied_keys() -> None:
    """resolve() derives lr.scale_with_batch from the optimizer and lr.reference_batch from the batch size."""
    plan = make_plan(BLANK, TASK, ["optimizer.name=sgd,adam", "batch.size=16,64"])
    base = plan.report_base()
    for run in plan.runs:
        flat = run.resolved.flat()
        differ = {k for k in flat.keys() | base.keys() if not same_value(flat.get(k, MISSING), base.get(k, MISSING))}
        assert differ == {"optimizer.name", "batch.size"}, run.name
    assert "lr.scale_with_batch" in plan.notes[0]


def test_classic_plan() -> None:
    plan = make_plan(None, [], [])
    assert plan.classic and len(plan.runs) >= 8
    optimizers = {r.strategy.optimizer.name for r in plan.runs}
    assert {"gd", "sgd", "momentum", "adagrad", "rmsprop", "adam"} <= optimizers
    assert {"constant", "polynomial", "cosine"} <= {r.strategy.lr.schedule for r in plan.runs}
    assert {"full", "fixed", "random"} == {r.strategy.batch.schedule for r in plan.runs}
    assert all(r.strategy.model.name == "mlp" and r.strategy.train.clip == 0 for r in plan.runs)
    assert all(re.fullmatch(r"[a-z0-9-]+", r.name) for r in plan.runs)
    # Overrides apply to the classic base.
    assert {r.strategy.train.epochs for r in make_plan(None, ["train.epochs=2"], []).runs} == {2.0}


def test_dry_run_prints_the_plan(tmp_path: Path) -> None:
    r = run_cli("compare", str(BLANK), *TASK, *GRID, "--out", str(tmp_path / "out"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "4 runs" in r.stdout and "sgd-linear" in r.stdout and "optimizer.name=sgd, lr.schedule=linear" in r.stdout
    assert not (tmp_path / "out").exists()


def test_default_out_continues_the_same_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = make_plan(BLANK, TASK, ["optimizer.name=sgd,adam"])
    first = default_out(plan)
    assert first.parent == Path("compare")
    write_plan(plan, first)
    assert (first / MANIFEST).is_file() and (first / "strategies" / "sgd.toml").is_file()
    assert default_out(plan) == first  # the same command again continues it
    other = make_plan(BLANK, TASK, ["optimizer.name=sgd,rmsprop"])
    assert default_out(other) != first


def test_vary_without_config_starts_from_the_default_task() -> None:
    """One default for every command: `regimen compare --vary ...` varies the task `regimen train` runs."""
    from regimen.strategy import Strategy

    plan = make_plan(None, ["train.steps=10"], ["optimizer.lr=4e-3,8e-3"])
    default = Strategy.default(["train.steps=10"])
    assert plan.base.optimizer.name == default.optimizer.name == "muon"
    assert [r.strategy.optimizer.lr for r in plan.runs] == [4e-3, 8e-3]
    assert plan.runs[0].resolved.replace({"optimizer.lr": default.optimizer.lr}).flat() == default.resolve().flat() | {
        "checkpoint.every_minutes": 1.0
    }


def test_executors_run_the_runs(tmp_path: Path) -> None:
    """`--executor slurm` (submitit's LocalExecutor here) and `--executor inline` train the same runs as local processes."""
    from tests.conftest import need

    need("submitit")
    outs = {}
    for executor, extra in (("slurm", ["--slurm", "local=true", "--jobs", "2"]), ("inline", [])):
        out = tmp_path / executor
        r = run_cli("compare", str(BLANK), *TASK, "--vary", "optimizer.lr=0.1,0.05", "--executor", executor, *extra, "--out", str(out))
        assert r.returncode == 0, r.stderr
        outs[executor] = {d.name: load_run(d).final_loss for d in out.iterdir() if (d / "metrics.jsonl").is_file()}
    assert outs["slurm"] == outs["inline"] and len(outs["slurm"]) == 2
