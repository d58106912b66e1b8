"""`regimen tune`: successive halving, the WSD branches, resuming a killed search, two processes
on one study, submitit's local executor, and the inputs refused before anything starts.

Everything trains a tiny MLP on a small synthetic set (tens of steps per run), mostly in this
process (`--executor inline`); the tests that kill or share a search run the real command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regimen.cli import main
from tests.conftest import ROOT, need, snapshot

TASK = [
    "model.name=mlp",
    "model.hidden=[16]",
    "data.source=synthetic",
    "data.num_samples=600",
    "data.num_features=8",
    "batch.size=16",
    "train.steps=60",
    "train.eval_samples=0",
    "train.eval_every=1000",
    "train.log_every=10",
    "train.clip=0",  # unclipped, so the far too large LR diverges (the race reports it failed)
    "observe.progress=none",
]
# Three LRs of one WSD family: far too small, right, far too large. The ranking is known.
KNOWN = """
[search]
eta = 3
batch = "keep"
config = false

[[family]]
name = "sgd-wsd"
optimizer.name = "sgd"
optimizer.momentum = 0.9
lr.schedule = "wsd"
lr.decay_fraction = 0.25
optimizer.lr = [1e-5, 0.1, 30.0]
"""


def two_families(eta: int, wsd_lrs: str, cos_lrs: str) -> str:
    """A space of AdamW + WSD (branches) and AdamW + cosine (restarts) at the given LRs."""
    return f"""
[search]
eta = {eta}
batch = "keep"
config = false

[[family]]
name = "wsd"
optimizer.name = "adamw"
lr.schedule = "wsd"
optimizer.lr = {wsd_lrs}

[[family]]
name = "cos"
optimizer.name = "adamw"
lr.schedule = "cosine"
optimizer.lr = {cos_lrs}
"""


# A wider race for the resume and sharing tests: WSD (branches), cosine (restarts).
WIDE = two_families(2, "[3e-3, 3e-2]", "[1e-3, 1e-2]")
# Two families of three LRs each: at 5.5x the plan is three rungs and a hedged final.
HEDGED = two_families(3, "[1e-3, 1e-2, 1e-1]", "[1e-3, 1e-2, 1e-1]")


@pytest.fixture(autouse=True)
def _optuna() -> None:
    need("optuna")


def space(tmp_path: Path, text: str, name: str = "space.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tune(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["tune", *args])
    out, err = capsys.readouterr()
    return code, out, err


def study(out: Path, name: str | None = None) -> list:
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'tune.db'}")
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage)]
    race = name or next(n for n in names if not n.endswith(":probe"))
    return optuna.load_study(study_name=race, storage=storage).get_trials(deepcopy=False)


def best_body(out: Path) -> str:
    """best.toml without its comment header (which names the directory)."""
    return "\n".join(line for line in (out / "best.toml").read_text().splitlines() if not line.startswith("#"))


def test_successive_halving_keeps_the_right_lr(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    out = tmp_path / "out"
    args = [*TASK, "--space", str(space(tmp_path, KNOWN)), "--budget", "2x", "--out", str(out), "--executor", "inline"]
    code, stdout, err = tune(args, capsys)
    assert code == 0, err
    trials = study(out)
    rungs = {t.user_attrs["unit"]: t for t in trials if t.state.name == "COMPLETE"}
    # Every candidate ran rung 0; only the right LR ran rung 1 (the full budget).
    assert sorted(k for k in rungs if k.startswith("rung0:")) == ["rung0:sgd-wsd.lr0.1", "rung0:sgd-wsd.lr1e-05", "rung0:sgd-wsd.lr30"]
    assert [k for k in rungs if k.startswith("rung1:")] == ["rung1:sgd-wsd.lr0.1"]
    assert rungs["rung0:sgd-wsd.lr0.1"].value < min(rungs["rung0:sgd-wsd.lr1e-05"].value, rungs["rung0:sgd-wsd.lr30"].value)
    assert f"regimen train {out / 'best.toml'}" in stdout
    # The report has the race: each candidate, where it stopped and why, the compute of each phase.
    html = (out / "report.html").read_text()
    assert "id='race'" in html and "stopped after rung 0: 2 of 3" in html and "data-phase='rung 1'" in html
    assert "failed at rung 0: training diverged" in html, "lr 30 diverges unclipped: the race says so"
    # best.toml is a complete strategy that regimen train runs as it stands.
    from regimen.strategy import Strategy

    best = Strategy.load(out / "best.toml")
    assert (best.optimizer.name, best.optimizer.lr, best.lr.schedule, best.train.steps) == ("sgd", 0.1, "wsd", 60)


def test_hedged_final_runs_each_finalists_lower_lr_too(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    """With the budget for it, the last rung runs every survivor of the rung before and, with each, its lower-LR neighbour."""
    out = tmp_path / "out"
    task = [*TASK, "train.steps=180"]  # a first rung of 20 steps at eta 3 over three rungs
    args = [*task, "--space", str(space(tmp_path, HEDGED)), "--budget", "5.5x", "--out", str(out), "--executor", "inline"]
    code, _, err = tune(args, capsys)
    assert code == 0, err
    done = {t.user_attrs["unit"]: t.value for t in study(out) if t.state.name == "COMPLETE"}
    assert len([k for k in done if k.startswith("rung0:")]) == 6
    second = [k.split(":")[1] for k in done if k.startswith("rung1:")]
    assert len(second) == 2, "eta 3: two of six go on"
    finals = sorted(k.split(":")[1] for k in done if k.startswith("rung2:"))
    lower = {"wsd.lr0.1": "wsd.lr0.01", "wsd.lr0.01": "wsd.lr0.001", "cos.lr0.1": "cos.lr0.01", "cos.lr0.01": "cos.lr0.001"}
    assert finals == sorted({*second, *(lower[n] for n in second if n in lower)})
    winner = min(finals, key=lambda n: (done[f"rung2:{n}"], n))
    assert f"({winner})" in (out / "best.toml").read_text()
    html = (out / "report.html").read_text()
    carried = [lower[n] for n in second if n in lower and lower[n] not in second]
    assert carried, "the test needs a finalist whose lower LR was stopped"
    assert "as the lower-LR neighbour of a finalist" in html


def test_the_plan_hedges_the_final_when_the_budget_allows() -> None:
    from regimen.search.command import default_budget
    from regimen.search.plan import full_run_samples, lower_neighbour, make_plan, promote
    from regimen.search.space import default_space
    from regimen.strategy import Strategy

    base = Strategy.default([*TASK, "train.steps=600"])  # planned only: a first rung of 20 steps needs 540
    space = default_space(base)
    full = full_run_samples(base)
    plain = make_plan(base, space, int(3.2 * full))
    hedged = make_plan(base, space, int(default_budget(len(plain.candidates)) * full))
    assert not plain.hedge and plain.keep[-1] == 1
    assert hedged.hedge and hedged.keep[-1] == hedged.keep[-2] and hedged.total <= hedged.budget
    by = {c.name: c for c in hedged.candidates}
    # A finalist brings its lower LR, even one stopped at rung 0; the lowest LR and CONFIG have none.
    ranked = [by["muon-wsd.lr+1"], by["config.lr0.01"], by["adamw-wsd.lr-1"]]
    assert hedged.keep[-2:] == [2, 2]
    going = promote(hedged, len(hedged.rungs) - 1, ranked)
    assert [c.name for c in going] == ["muon-wsd.lr+1", "config.lr0.01", "muon-wsd.lr+0"]
    assert lower_neighbour(by["adamw-wsd.lr-1"], hedged.candidates) is None
    assert lower_neighbour(by["config.lr0.01"], hedged.candidates) is None
    # Before the last rung, and in a plain plan, promotion is the best keep[r].
    assert promote(hedged, 1, ranked) == ranked[: hedged.keep[1]]
    top = len(plain.rungs) - 1
    assert [c.name for c in promote(plain, top, ranked)] == ["muon-wsd.lr+1"]


def test_branch_leaves_the_trunk_bitwise_unchanged(tmp_path: Path, one_thread: None) -> None:
    """A cooldown branch is exactly a WSD run of its length, and the trunk it left continues as if it had never branched."""
    from safetensors.torch import load_file

    from regimen.runner import run_training
    from regimen.search.engine import latest_checkpoint, trunk_strategy
    from regimen.strategy import Strategy

    base = Strategy.load(None, [*TASK, "optimizer.name=adamw", "optimizer.lr=3e-3", "lr.schedule=wsd", "lr.decay_fraction=0.25"])

    def wsd(steps: int) -> Strategy:
        return base.replace({"train.steps": steps})

    def train(s: Strategy, run_dir: Path, resume: str | None = None) -> dict:
        assert run_training(s, run_dir, resume=resume, quiet=True, allow_change=resume not in (None, "auto")) == 0
        return load_file(str(run_dir / "model.safetensors"))

    # The search's path: trunk to rung 0's cooldown start (15 of 20 steps), branch, trunk on to 30, branch to 40.
    trunk = tmp_path / "trunk"
    train(trunk_strategy(wsd(20), 1), trunk, "auto")
    assert latest_checkpoint(trunk) is not None and latest_checkpoint(trunk).name == "step-00000015"
    branch20 = train(wsd(20), tmp_path / "branch20", str(latest_checkpoint(trunk)))
    trunk30 = train(trunk_strategy(wsd(40), 1), trunk, "auto")
    branch40 = train(wsd(40), tmp_path / "branch40", str(latest_checkpoint(trunk)))
    # References: a trunk that never branched, and plain WSD runs of 20 and 40 steps.
    never = train(trunk_strategy(wsd(40), 1), tmp_path / "never")
    plain20, plain40 = train(wsd(20), tmp_path / "plain20"), train(wsd(40), tmp_path / "plain40")
    for got, want in ((trunk30, never), (branch20, plain20), (branch40, plain40)):
        assert got.keys() == want.keys()
        assert all(got[k].equal(want[k]) for k in want), "not bitwise equal"


def _run(out: Path, spec: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "regimen", "tune", *TASK, "--space", str(spec), "--budget", "3.7x", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_search_finishes_without_repeating_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    spec = space(tmp_path, WIDE)
    out = tmp_path / "killed"
    proc = _run(out, spec, "--executor", "inline")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("trials/*/rung0/summary.json"))) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = study(out)
    done_before = {t.user_attrs["unit"]: t.value for t in before if t.state.name == "COMPLETE"}
    running = [t.number for t in before if t.state.name == "RUNNING"]
    assert done_before, "killed before any unit finished: the test proves nothing"
    measured = {k: snapshot(out / "trials" / k.split(":")[1] / k.split(":")[0]) for k in done_before}
    code, _, err = tune([*TASK, "--space", str(spec), "--budget", "3.7x", "--out", str(out), "--executor", "inline"], capsys)
    assert code == 0, err
    trials = study(out)
    after = {t.user_attrs["unit"]: t for t in trials if t.state.name == "COMPLETE"}
    for key, value in done_before.items():
        assert after[key].value == value
        assert snapshot(out / "trials" / key.split(":")[1] / key.split(":")[0]) == measured[key], f"{key} was trained again"
    # The unit the kill interrupted (if it was not between two units) went stale, failed, and was done again.
    # (A kill between the claim and its attributes leaves no pid: stale after CLAIM_GRACE instead.)
    stale = ("process gone", "claimed, then nothing")
    assert all(trials[n].state.name == "FAIL" and trials[n].user_attrs.get("stale") in stale for n in running)
    # The same choice, and the same numbers, as a search that was never interrupted.
    clean = tmp_path / "clean"
    code, _, err = tune([*TASK, "--space", str(spec), "--budget", "3.7x", "--out", str(clean), "--executor", "inline"], capsys)
    assert code == 0, err
    assert best_body(out) == best_body(clean)
    assert {t.user_attrs["unit"]: t.value for t in study(clean) if t.state.name == "COMPLETE"} == {k: t.value for k, t in after.items()}


def test_two_processes_on_one_sqlite_study_never_run_a_unit_twice(tmp_path: Path) -> None:
    spec = space(tmp_path, WIDE)
    out = tmp_path / "shared"
    out.mkdir()
    procs = [_run(out, spec, "--executor", "inline") for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
        assert "regimen train" in stdout
    trials = study(out)
    complete = [t.user_attrs["unit"] for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == len(set(complete)), "a unit was recorded twice"
    # A trial that is not COMPLETE is a duplicate enqueue the claimer set aside, never a second run.
    assert all(t.user_attrs.get("duplicate") is not None for t in trials if t.state.name != "COMPLETE")
    # Every measurement run directory was trained by one process, once.
    for run_dir in out.glob("trials/*/rung*/"):
        events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
        assert sum(e in ("start", "resume") for e in events) == 1, (run_dir, events)
    assert best_body(out)


def test_submitit_local_executor_runs_a_trial(tmp_path: Path) -> None:
    need("submitit")
    from regimen.executors import Job, SlurmExecutor
    from regimen.rundir import read_summary
    from regimen.strategy import Strategy

    file = tmp_path / "s.toml"
    Strategy.load(None, [*TASK, "train.steps=10", "observe.report=false"]).save(file)
    executor = SlurmExecutor(tmp_path / "slurm", local=True)
    assert executor.run(Job("train", file, tmp_path / "run", resume="auto")) == 0
    assert (read_summary(tmp_path / "run") or {}).get("status") == "finished"


def test_rg_tune_on_a_python_model(tmp_path: Path, one_thread: None) -> None:
    import torch

    import regimen as rg

    g = torch.Generator().manual_seed(0)
    x = torch.randn(480, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    spec = space(tmp_path, KNOWN.replace("[1e-5, 0.1, 30.0]", "[1e-5, 0.1]").replace("eta = 3", "eta = 2"))
    best = rg.tune(
        lambda: torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
        (x[:400], y[:400]),
        validation_data=(x[400:], y[400:]),
        loss="cross_entropy",
        overrides={"train.steps": 60, "batch.size": 16},
        space=spec,
        budget="2x",
        out=tmp_path / "out",
        verbose=False,
    )
    assert isinstance(best, rg.Strategy) and best.optimizer.lr == 0.1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--space", "{unknown_family}"], "unknown family 'adamw-sgd'"),
        (["--space", "{unknown_key}"], "unknown key 'optimizer.learning_rate'"),
        (["--space", "{empty}"], "the space is empty"),
        (["--budget", "0.5x"], "too small for one race"),
        (["--budget", "lots"], "--budget 'lots'"),
        (["--budget-minutes", "0"], "--budget-minutes = 0"),
        (["--budget", "2x", "--budget-tokens", "1000"], "give one budget"),
        (["--storage", "sqlite:////nonexistent-dir/x/tune.db"], "--storage 'sqlite:////nonexistent-dir/x/tune.db': cannot open it"),
        (["--storage", "journal:/nonexistent-dir/x.log"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    files = {
        "{unknown_family}": '[search]\nfamilies = ["adamw-wsd", "adamw-sgd"]\n',
        "{unknown_key}": '[[family]]\nname = "x"\noptimizer.learning_rate = 0.1\n',
        "{empty}": "[search]\nfamilies = []\n",
    }
    args = [str(space(tmp_path, files[a], "s.toml")) if a in files else a for a in args]
    out = tmp_path / "out"
    code, _, err = tune([*TASK, "--space", str(space(tmp_path, KNOWN)), *args, "--out", str(out)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("regimen: error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_dry_run_prints_candidates_rungs_and_compute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*TASK, "--space", str(space(tmp_path, WIDE)), "--budget", "3.7x", "--dry-run", "--out", str(tmp_path / "out")]
    code, stdout, _ = tune(args, capsys)
    assert code == 0
    assert "4 candidates in 2 families" in stdout and "wsd.lr0.003" in stdout and "measured by branch" in stdout
    assert "rung 0  4 candidate(s)" in stdout and "rung 1  2 candidate(s)" in stdout and "total   about" in stdout
    assert not (tmp_path / "out").exists()


def test_executor_commands(tmp_path: Path) -> None:
    """torchrun per run is `regimen train --nproc N`; an inline executor cannot start processes; --slurm needs slurm."""
    from regimen.errors import UserError
    from regimen.executors import Job, LocalExecutor, make_executor

    job = Job("train", tmp_path / "s.toml", tmp_path / "run", resume="auto", allow_change=True)
    command = LocalExecutor(slots=2, nproc=4).command(job)
    assert command[1:4] == ["-m", "regimen", "train"] and command[-2:] == ["--nproc", "4"] and "--allow-change" in command
    assert "--nproc" not in LocalExecutor().command(job)
    for kind, kwargs, fragment in (
        ("inline", {"nproc": 2}, "cannot start --nproc"),
        ("inline", {"slots": 2}, "one run at a time"),
        ("local", {"slurm": ["slurm_partition=gpu"]}, "--slurm is for --executor slurm"),
        ("gpu", {}, "allowed: local, inline, slurm"),
    ):
        with pytest.raises(UserError, match=fragment):
            make_executor(kind, **kwargs)


def test_a_claim_whose_process_died_before_its_attributes_goes_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed between a claim's two writes (state RUNNING, then host/pid/heartbeat) left a
    trial nothing would ever free: the search resumed and waited forever (seen once in the suite)."""
    from regimen.search import study as study_module

    storage = study_module.optuna_module().storages.RDBStorage(f"sqlite:///{tmp_path / 'q.db'}")
    ledger = study_module.Ledger(storage, tmp_path / "q.lock", "q")
    ledger.enqueue_missing([("u", {"x": 1})])
    (waiting,) = ledger.trials()
    assert storage.set_trial_state_values(waiting._trial_id, state=ledger.optuna.trial.TrialState.RUNNING)
    assert ledger.fail_stale(["u"]) == 0, "just claimed: its claimer may still be writing"
    monkeypatch.setattr(study_module, "CLAIM_GRACE", -1.0)
    assert ledger.fail_stale(["u"]) == 1
    (failed,) = ledger.trials()
    assert failed.state.name == "FAIL" and failed.user_attrs["stale"] == "claimed, then nothing"
    ledger.enqueue_missing([("u", {"x": 1})])
    assert ledger.claim(["u"]) is not None, "the unit is claimable again"
