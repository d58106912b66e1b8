"""A killed run ends where the uninterrupted run would have: real processes, real SIGKILLs.

Each test trains a tiny GPT with `python -m regimen train`, SIGKILLs the whole job (its process
group: the CLI, torchrun and every worker, as a lost machine would) at chosen points, resumes
with `--resume auto`, and compares the final `model.safetensors` bit for bit and the logged rows
step for step with an uninterrupted run of the same strategy.

Every resumed attempt must say which checkpoint it resumed from: a run that silently started
over would also end bit-identical (training is deterministic), so the message is what proves
the resume happened.

The subprocesses run with OMP_NUM_THREADS=1: a thread count is part of the floating-point
environment (it changes reduction order), and one thread is also the fastest on a busy 2-core
machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from regimen.rundir import read_metrics
from tests import freezing_model
from tests.conftest import ROOT, TINY_GPT

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS, EVERY = 30, 5
# Row keys that must match exactly; time, throughput and memory legitimately differ.
COMPARED = ("step", "samples", "tokens", "loss", "lr", "batch_size", "grad_norm", "val_loss", "world_size")


# ---- helpers: start, watch and kill a real job ------------------------------------------------


def strategy_args(corpus: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """The tiny GPT with dropout (so the RNG state must be restored), logging every step."""
    return [
        *TINY_GPT,
        "model.dropout=0.1",
        f"data.source=text:{corpus}",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=10",
        f"checkpoint.every={EVERY}",
        "observe.progress=lines",
        "observe.report=false",
        *extra,
    ]


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (no psutil on these machines)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: fields start after the last ')'.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _state(pid: int) -> str:
    """The state letter of a process ("T": stopped), or "" when it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children."""
    out, stack = [], [pid]
    while stack:
        for child in _children(stack.pop()):
            out.append(child)
            stack.append(child)
    return out


RUNNING: list[Job] = []


@pytest.fixture(autouse=True)
def _no_stray_jobs() -> Iterator[None]:
    """A failed assertion must not leave a job (or its orphaned workers) training on."""
    yield
    while RUNNING:
        job = RUNNING.pop()
        if job.proc.poll() is None:
            job.kill()


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Job:
    """`python -m regimen train ...` with its output in a log file."""

    def __init__(self, args: list[str], run_dir: Path, log: Path, freeze: str | None = None) -> None:
        self.log = log
        self.run_dir = run_dir
        self.known: list[int] = []  # the job's processes, refreshed while waiting: a kill must be quick
        RUNNING.append(self)
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "regimen", "train", *args, "--run-dir", str(run_dir)],
                cwd=ROOT,
                env={**ENV, freezing_model.ENV: freeze} if freeze else ENV,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Ctrl-C as a terminal delivers it: a suite started in the background of a
                # non-interactive shell has SIGINT ignored, and the job would inherit that.
                preexec_fn=_sigint_default,
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Poll every 2 ms (a save takes tens of ms) until `condition()`; fail if the job ends first."""
        deadline = time.monotonic() + timeout
        polls = 0
        while not condition():
            if polls % 50 == 0:
                self.known = descendants(self.proc.pid)
            polls += 1
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended (rc {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.text()[-3000:]}")
            time.sleep(0.002)

    def stopped(self) -> bool:
        """True once a process of the job stopped itself where `freeze` said (tests/freezing_model.py)."""
        return any(_state(pid) == "T" for pid in [self.proc.pid, *self.known])

    def kill(self) -> None:
        """SIGKILL the whole job: no handler runs, no file is closed cleanly.

        torchrun starts each worker in a session of its own, so a process-group kill would leave
        the workers training on: the whole tree is frozen (SIGSTOP: nothing reacts or respawns),
        then killed, as a machine that loses power would be.
        """
        frozen: set[int] = set()
        for pid in [self.proc.pid, *self.known]:  # at once, before the slower scan of /proc
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        while pending := [pid for pid in [self.proc.pid, *descendants(self.proc.pid)] if pid not in frozen]:
            for pid in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            frozen.update(pending)
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 300) -> str:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not finish:\n{self.text()[-3000:]}")
        assert rc == 0, self.text()[-3000:]
        return self.text()


def train(args: list[str], run_dir: Path, log: Path) -> str:
    return Job(args, run_dir, log).finish()


def rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def compared_rows(run_dir: Path) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in rows(run_dir)]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"parameters differ: {differ}"


def assert_resumed_from(log: str, step: int) -> None:
    assert "resuming from " in log and f"step-{step:08d} (step {step})" in log, log[-3000:]


def resumed_step(log: str) -> int:
    """The step of the last "resuming from" line of a log."""
    found = re.findall(r"resuming from \S+ \(step (\d+)\)", log)
    assert found, log[-3000:]
    return int(found[-1])


def latest_step(run_dir: Path) -> int:
    from regimen.checkpoint import latest_checkpoint

    found = latest_checkpoint(run_dir)
    assert found is not None, "no complete checkpoint before the kill"
    return int(found.name.split("-")[1])


# ---- bit-exact resume after three SIGKILLs ---------------------------------------------------

KINDS = {
    "fixed": [],
    "random": ["batch.schedule=random", "batch.min=4", "batch.max=16"],
    # Saved in the background (CUDA's default; CPU saves synchronously by default): the ranks'
    # background writes and their per-step agreement are under the kills too.
    "ddp": ["parallel.mode=ddp", "checkpoint.async_save=true", "--nproc", "2"],
}


@pytest.fixture(scope="module")
def uninterrupted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The uninterrupted run of each kind, trained once per module (the elastic test reuses ddp)."""
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            run = tmp_path_factory.mktemp(f"uninterrupted-{kind}") / "run"
            train(strategy_args(corpus, *KINDS[kind]), run, run.parent / "log.txt")
            done[kind] = run
        return done[kind]

    return get


# The killed runs train the tiny GPT of `strategy_args`, weight for weight, with a model whose
# process stops itself where the test kills it: at a step, or inside a save (SIGKILLs timed on
# the log raced a fast machine, which could finish a save, or the run, before the kill landed).
FREEZING = ["model.name=tests.freezing_model:factory", "model.kwargs={dropout = 0.1}"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkilled_three_times_resumes_bit_exact(kind: str, corpus: Path, tmp_path: Path, uninterrupted: Callable[[str], Path]) -> None:
    """Killed between saves, during a save, and again later: same weights, same rows, no duplicates."""
    reference = uninterrupted(kind)
    args = strategy_args(corpus, *FREEZING, *KINDS[kind])
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    # 1. A fresh run, killed between saves: in step 7, after the checkpoint of step 5 (published:
    #    saved in the background, as under ddp here and on CUDA, it may still be in flight at step 7).
    job = Job(args, run, tmp_path / "log1.txt", freeze=f"forward:7:{checkpoints / 'step-00000005'}")
    job.wait_until(job.stopped, "the stop in step 7")
    job.kill()
    assert latest_step(run) == 5

    # 2. Resumed, then killed in the save of step 15: begun, not published.
    job = Job([*args, "--resume", "auto"], run, tmp_path / "log2.txt", freeze=f"save:{checkpoints / '.tmp-step-00000015'}")
    job.wait_until(job.stopped, "the stop in the save of step 15")
    job.kill()
    assert_resumed_from(job.text(), 5)
    assert (checkpoints / ".tmp-step-00000015").is_dir() and not (checkpoints / "step-00000015").exists()
    assert latest_step(run) == 10

    # 3. Resumed past the interrupted save (it must be skipped with a warning), killed again in
    #    step 22 (the 12th step of this process).
    job = Job([*args, "--resume", "auto"], run, tmp_path / "log3.txt", freeze=f"forward:12:{checkpoints / 'step-00000020'}")
    job.wait_until(job.stopped, "the stop in step 22")
    job.kill()
    log = job.text()
    assert_resumed_from(log, 10)
    assert "skipping incomplete checkpoint" in log and ".tmp-step-00000015" in log
    resume_at = latest_step(run)
    assert resume_at == 20

    # 4. Resumed to the end.
    log = train([*args, "--resume", "auto"], run, tmp_path / "log4.txt")
    assert_resumed_from(log, resume_at)

    assert_same_weights(run, reference)
    got, want = compared_rows(run), compared_rows(reference)
    steps = [r["step"] for r in got]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    assert got == want
    assert len(want) == STEPS and sum("val_loss" in r for r in rows(run)) == 3


# ---- resharding: a 2-process FSDP2 checkpoint continues on 1 process --------------------------


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_process(corpus: Path, tmp_path: Path) -> None:
    """DCP reshards the 2 ranks' shards onto 1 process; the losses follow the 2-process run."""
    # No dropout: with 2 ranks, half of each batch used rank 1's RNG, which 1 process lacks. Muon's
    # iteration in float32: the 1e-5 below is float32's arithmetic, not bf16's (which `auto`
    # picks on CPUs with bf16 instructions, and whose sums FSDP2's sharding reorders).
    args = [*strategy_args(corpus, steps=20), "model.dropout=0.0", "optimizer.ns_dtype=float32"]
    args += ["checkpoint.every=10", "checkpoint.keep=5", "parallel.mode=fsdp"]
    two = tmp_path / "two"
    train([*args, "--nproc", "2"], two, tmp_path / "two.txt")
    shards = sorted(p.name for p in (two / "checkpoints" / "step-00000010").glob("*.distcp"))
    assert len(shards) == 2, f"expected one shard file per rank: {shards}"

    one = tmp_path / "one"
    log = train([*args, "--resume", str(two / "checkpoints" / "step-00000010")], one, tmp_path / "one.txt")
    assert_resumed_from(log, 10)
    continued = {r["step"]: r for r in rows(one)}
    reference = {r["step"]: r for r in rows(two)}
    assert sorted(continued) == list(range(11, 21))
    assert {r["world_size"] for r in continued.values()} == {1}
    for step in range(11, 21):
        assert continued[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
        assert continued[step]["samples"] == reference[step]["samples"]


# ---- elastic: a worker dies, torchrun restarts the group, the run ends where it would have ----

# Rank 1 SIGKILLs itself in the forward of step 13 of torchrun's first attempt: after the
# checkpoint of step 10, before that of step 15, on any speed of machine (a kill from outside,
# timed on the log, could land after the run had ended on a fast one). The model is the tiny
# GPT of `strategy_args`, weight for weight, so the run must end as the uninterrupted one.
KILL_STEP = 13


def killed_rank_1(run: Path) -> list[str]:
    """Rank 1 kills itself at step 13, once the checkpoint of step 10 is published (it may be in flight: saved in the background)."""
    published = run / "checkpoints" / "step-00000010"
    kwargs = f"{{mode = 'kill', rank = 1, step = {KILL_STEP}, dropout = 0.1, after = '{published}'}}"
    return ["model.name=tests.failing_model:factory", f"model.kwargs={kwargs}"]


@pytest.mark.slow
def test_elastic_restart_after_a_worker_is_killed(corpus: Path, tmp_path: Path, uninterrupted: Callable[[str], Path]) -> None:
    """`--nproc 2 --max-restarts 2`: rank 1 is SIGKILLed at step 13; the restarted group resumes by itself."""
    reference = uninterrupted("ddp")
    run = tmp_path / "run"
    log = train([*strategy_args(corpus, *killed_rank_1(run), *KINDS["ddp"]), "--max-restarts", "2"], run, tmp_path / "log.txt")
    assert "exitcode: -9" in log  # torchrun saw the worker die and restarted the group
    # The restarted workers were given --resume auto and took the existing run directory.
    assert resumed_step(log) == 10 == (KILL_STEP // EVERY) * EVERY
    assert "exists; pass --resume" not in log
    assert_same_weights(run, reference)
    assert compared_rows(run) == compared_rows(reference)


# ---- in-process: stateful strategies resume exactly (no kill, many strategies, cheap) --------


@pytest.mark.parametrize(
    "extra",
    [
        ["optimizer.name=schedulefree_adamw", "lr.schedule=constant"],
        ["optimizer.name=muon", "optimizer.lr=0.02"],
        ["batch.schedule=adaptive", "batch.size=8", "batch.every=2", "batch.min=4", "batch.max=32", "batch.micro=4"],
        ["observe.noise_scale=true", "lr.schedule=wsd", "lr.unit=samples"],
    ],
    ids=["schedulefree", "muon", "adaptive-batch", "noise-scale-wsd"],
)
def test_resume_is_exact_for_stateful_strategies(extra: list[str], corpus: Path, tmp_path: Path) -> None:
    """Optimizer modes, estimator averages and the adaptive batch all travel in the checkpoint."""
    from regimen.strategy import Strategy
    from regimen.task import build_task
    from regimen.trainer import Trainer

    overrides = [*strategy_args(corpus, steps=12), "observe.progress=none", "checkpoint.every=4", *extra]

    class Crash(Exception):
        pass

    def crash_at(step: int) -> Callable[[dict], None]:
        def callback(row: dict) -> None:
            if row["step"] == step:
                raise Crash  # the process "dies" mid-run: the checkpoint of step 8 is the last one

        return callback

    def trainer(run_dir: Path, crash: int | None = None) -> Trainer:
        s = Strategy.load(None, overrides)
        return Trainer(s, build_task(s.resolve()), run_dir, callbacks=[crash_at(crash)] if crash else [])

    trainer(tmp_path / "a").fit()
    with pytest.raises(Crash):
        trainer(tmp_path / "b", crash=10).fit()
    resumed = trainer(tmp_path / "b")
    assert resumed.checkpointer.resume("auto") == tmp_path / "b" / "checkpoints" / "step-00000008"
    resumed.fit()
    assert resumed.progress.step == 12
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    strip = lambda rs: [{k: r.get(k) for k in (*COMPARED, "noise_scale")} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "b")) == strip(rows(tmp_path / "a"))
