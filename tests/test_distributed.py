"""Real 2-process jobs on loopback (gloo): DDP and FSDP2 train exactly like one process.

DESIGN.md, principle 2: the gradient is the mean over the global batch however it is split,
over ranks or micro-batches. So the built-in GPT trained for 20 steps on a global batch of 16
as 1 process, as 2 DDP processes and as 2 FSDP2 processes logs the same loss at every step and
ends with the same parameters (float32, 1e-5 relative). Every job is the real command:
`regimen train --nproc 2` (which starts torchrun) or two torchrun agents joined by a c10d
rendezvous on 127.0.0.1 ("two nodes").

Splits checked against one process:
- `fixed`: each rank runs its half of the batch in one go;
- `micro`: each rank runs its half in micro-batches of 2 (no gradient sync but on the last),
  against the same one-process run without micro-batches;
- `random`: B_t drawn per step in [4, 24]. Sizes are rounded to micro-batch x world size, so
  the one-process reference runs micro-batches of 2 to draw the very same B_t as 2 ranks.
The DDP `random` and `micro` jobs also estimate the gradient noise scale (the two code paths:
each rank's share, and the first micro-batch, as the small batch): measuring must not change
training, and it saves two jobs.

Jobs are shared between tests (module scope) and run once each; every one has a wall-clock
limit and runs in its own process group, so a hung job is killed whole and fails the test.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from regimen.rundir import read_metrics
from tests.conftest import ROOT
from tests.failing_model import MESSAGE

pytestmark = pytest.mark.slow

STEPS = 20
RTOL = 1e-5
ADAMW_LR = 1e-3
JOB_TIMEOUT = 240.0  # seconds; a 20-step job takes ~10 s on an idle 2-core machine

# The built-in GPT, small: 2 blocks so that FSDP2 shards more than one unit.
SMALL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.context=16",
    "batch.size=16",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=1000",  # evaluated once, at the end
    "train.eval_samples=32",
    "observe.progress=none",
    "observe.report=false",
    # AdamW, as the tolerances below are reasoned for Adam; Muon (the default task's) has its own case.
    "optimizer.name=adamw",
    f"optimizer.lr={ADAMW_LR}",
    "lr.schedule=cosine",
]
# Muon's Newton-Schulz iteration pinned to float32: `auto` would pick bfloat16 on CPUs with bf16
# instructions, where the momentum's float32 summation-order differences (FSDP2 reduces in
# another order) would be rounded to bf16's precision (2^-8), far outside the float32
# tolerance RTOL this parity is reasoned for.
# Clipping pinned on: RTOL is float32 summation-order noise (FSDP2 reduces in another order) over
# the run; the default recipe's unclipped first steps amplify it past that (1.8e-5 measured).
MUON_LR = 8e-3
MUON = ["optimizer.name=muon", f"optimizer.lr={MUON_LR}", "lr.schedule=wsd", "optimizer.ns_dtype=float32", "train.clip=1.0"]
RANDOM = ["batch.schedule=random", "batch.min=4", "batch.max=24"]
NOISE = ["observe.noise_scale=true"]

# 2-process jobs: (extra overrides, the 1-process reference they must match).
PARITY = {
    "fixed": ([], "ref-fixed"),
    "micro": (["batch.micro=2"], "ref-fixed"),
    "random": (RANDOM, "ref-random"),
}
REFERENCES = {"ref-fixed": [], "ref-random": [*RANDOM, "batch.micro=2"]}


@dataclass
class Job:
    """A finished command: exit code, combined output, wall time and its run directory."""

    returncode: int
    output: str
    seconds: float
    run_dir: Path

    def ok(self) -> Job:
        assert self.returncode == 0, f"exit {self.returncode} after {self.seconds:.0f} s:\n{self.output[-6000:]}"
        return self

    def rows(self) -> list[dict]:
        return read_metrics(self.run_dir / "metrics.jsonl")

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.run_dir / "model.safetensors"))


def _env(**extra: str) -> dict[str, str]:
    # One thread per process: 1- and 2-process jobs compute alike and 2 ranks do not fight
    # over 2 cores. A short collective timeout: nothing here may wait 5 minutes for a lost rank.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "REGIMEN_DIST_TIMEOUT": "60", **extra}


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    # A session of its own, so a timeout can kill torchrun and every worker it started.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"job still running after {timeout:.0f} s (a hung rank?):\n{out[-6000:]}")
    return proc.returncode, out


def run_job(args: list[str], run_dir: Path, timeout: float = JOB_TIMEOUT, **env: str) -> Job:
    """`python -m regimen train ARGS --run-dir RUN_DIR`, bounded by `timeout`."""
    t0 = time.perf_counter()
    proc = _start([sys.executable, "-m", "regimen", "train", *args, "--run-dir", str(run_dir)], _env(**env))
    code, out = _finish(proc, timeout)
    return Job(code, out, time.perf_counter() - t0, run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Jobs:
    """Each named job runs once, on first use, and is shared by every test that needs it."""

    def __init__(self, root: Path, base: list[str]) -> None:
        self.root, self.base, self.done = root, base, {}

    def get(self, name: str) -> Job:
        if name not in self.done:  # a failed job is kept too: every test that needs it fails at once
            self.done[name] = self._run(name)
        return self.done[name].ok()

    def _run(self, name: str) -> Job:
        if name in REFERENCES:
            return run_job([*self.base, *REFERENCES[name]], self.root / name)
        split, mode = name.split("-")  # e.g. "micro-ddp"
        extra = PARITY[split][0] + (NOISE if mode == "ddp" and split != "fixed" else [])
        return run_job([*self.base, *extra, f"parallel.mode={mode}", "--nproc", "2"], self.root / name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 kB of real text (the standard library's first modules): loads at once, unlike the whole stdlib."""
    src = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(src.glob("*.py"))[:60])[:300_000]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def base(corpus: Path) -> list[str]:
    return [*SMALL, f"data.source=text:{corpus}"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, base: list[str]) -> Jobs:
    return Jobs(tmp_path_factory.mktemp("runs"), base)


def assert_same_training(got: Job, want: Job, rtol: float = RTOL) -> None:
    """Same batch sizes; loss and gradient norm at every step, final val loss and parameters within `rtol`.

    The gradient norm is what pins the mean-gradient rule: Adam and clipping are blind to a
    gradient scaled by a constant (a wrong `b_i / B * world_size`), the logged norm is not.
    Parameters are compared relative to the model's weight scale, not entry by entry: the
    attention's key bias gets an exactly zero gradient (softmax ignores a shift shared by all
    keys), so Adam moves it by rounding noise and it has no relative precision of its own.
    """
    rows, ref = got.rows(), want.rows()
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert [r["batch_size"] for r in rows] == [r["batch_size"] for r in ref]
    for r, w in zip(rows, ref):
        for key in ("loss", "grad_norm"):
            assert r[key] == pytest.approx(w[key], rel=rtol), f"step {r['step']}: {key} {r[key]} vs {w[key]}"
    assert rows[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=rtol)
    weights, ref_weights = got.weights(), want.weights()
    scale = max(w.abs().max().item() for w in ref_weights.values())
    errors = {name: (weights[name] - w).abs().max().item() / scale for name, w in ref_weights.items()}
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= rtol, f"{worst}: max |diff| = {errors[worst]:.2e} x the largest weight"
    # The exported file itself must not depend on the layout (a tied weight is written once).
    assert sorted(weights) == sorted(ref_weights)


# ---- parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("split", list(PARITY))
def test_two_processes_train_like_one(jobs: Jobs, split: str, mode: str) -> None:
    job = jobs.get(f"{split}-{mode}")
    assert_same_training(job, jobs.get(PARITY[split][1]))


def test_muon_under_fsdp_trains_like_one_process(base: list[str], tmp_path: Path) -> None:
    """Muon (the default task's optimizer) orthogonalises whole matrices: under FSDP2 its
    Newton-Schulz iterations run on sharded DTensors and must give the single-process result."""
    ref = run_job([*base, *MUON], tmp_path / "ref")
    got = run_job([*base, *MUON, "batch.micro=4", "parallel.mode=fsdp", "--nproc", "2"], tmp_path / "fsdp")
    # The tolerance scales with the LR (8x the AdamW cases'): the worst weight is the attention's
    # key bias, whose true gradient is exactly zero (softmax ignores a shift shared by every key),
    # so AdamW steps it by its rounding noise over eps, at a size proportional to the LR. One
    # process with batch.micro=4 instead of 1 differs from itself by 6e-6 there.
    assert_same_training(got.ok(), ref.ok(), rtol=RTOL * MUON_LR / ADAMW_LR)


def test_random_schedule_varies_the_batch(jobs: Jobs) -> None:
    """The random parity test means something only if B_t actually changes (and stays even)."""
    sizes = [r["batch_size"] for r in jobs.get("random-ddp").rows()]
    assert len(set(sizes)) > 3 and all(4 <= b <= 24 and b % 2 == 0 for b in sizes), sizes


def test_two_nodes_on_loopback(jobs: Jobs, base: list[str], tmp_path: Path) -> None:
    """Two torchrun agents (one process each) meet at a c10d rendezvous and train like `--nproc 2`."""
    run_dir, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    agents: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "loopback", "--node-rank", str(node)]
            cmd += ["-m", "regimen", "train", *base, "parallel.mode=ddp", "--run-dir", str(run_dir)]
            agents.append(_start(cmd, _env()))
        results = [_finish(a, JOB_TIMEOUT) for a in agents]
    finally:
        for agent in agents:  # one agent failing must not leave the other waiting for it
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.communicate()
    output = "\n".join(out for _, out in results)
    job = Job(max(code for code, _ in results), output, time.perf_counter() - t0, run_dir).ok()
    assert_same_training(job, jobs.get("fixed-ddp"))
    assert job.summary()["world_size"] == 2


# ---- only rank 0 writes; the job's totals --------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rank0_writes_once_and_reports_world_size(jobs: Jobs, mode: str) -> None:
    job, ref = jobs.get(f"fixed-{mode}"), jobs.get("ref-fixed")
    lines = (job.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == STEPS
    assert all(r["world_size"] == 2 for r in job.rows())
    summary, summary_ref = job.summary(), ref.summary()
    assert summary["world_size"] == 2 and summary_ref["world_size"] == 1
    # Samples, tokens and tokens/s count the whole job, not one rank's share.
    assert (summary["samples"], summary["tokens"]) == (summary_ref["samples"], summary_ref["tokens"]) == (16 * STEPS, 16 * 16 * STEPS)
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["wall_time"], rel=1e-6)
    assert job.output.count("regimen: finished") == 1, job.output  # one summary, from rank 0
    assert "on 2 processes" in job.output


# ---- the noise-scale estimator under DDP ---------------------------------------------------


@pytest.mark.parametrize("split", ["random", "micro"])
def test_noise_scale_under_ddp(jobs: Jobs, split: str) -> None:
    """Each rank's share (random: one micro-batch) or first micro-batch (micro=2) is the small batch."""
    rows = jobs.get(f"{split}-ddp").rows()
    values = [r["noise_scale"] for r in rows if "noise_scale" in r]
    assert values, "no noise_scale logged"
    assert all(math.isfinite(v) for v in values)
    assert rows[-1].get("noise_scale", 0) > 0, values


# ---- faults: a failing or stuck rank ends the job, non-zero, in bounded time ----------------


def _failing(base: list[str], mode: str) -> list[str]:
    model = ["model.name=tests.failing_model:factory", f'model.kwargs={{mode = "{mode}", rank = 1, step = 3, context = 16}}']
    return [*base, *model, "parallel.mode=ddp", "--nproc", "2"]


def test_failing_rank_fails_the_job_with_its_error(base: list[str], tmp_path: Path) -> None:
    job = run_job(_failing(base, "raise"), tmp_path / "run", timeout=120, REGIMEN_DIST_TIMEOUT="20")
    assert job.returncode != 0, job.output
    assert f"{MESSAGE} on rank 1 at step 3" in job.output, job.output[-6000:]
    assert not (job.run_dir / "model.safetensors").exists()


def test_stuck_rank_times_out_instead_of_hanging(base: list[str], tmp_path: Path) -> None:
    """Rank 1 blocks forever at step 3: rank 0's collective gives up after REGIMEN_DIST_TIMEOUT."""
    job = run_job(_failing(base, "hang"), tmp_path / "run", timeout=120, REGIMEN_DIST_TIMEOUT="10")
    assert job.returncode != 0, job.output
    # gloo names the timeout it was given: 10 s from the environment, not the 300 s default.
    assert re.search(r"[Tt]imed out waiting 10000 ?ms", job.output), job.output[-6000:]


def test_each_torchrun_attempt_reads_only_its_own_store_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's agent keeps one store across restarts: a restarted group must not read the dead
    attempt's keys (rank 0's old address, spent barrier counters), or it fails or hangs."""
    from torch import distributed as dist

    from regimen.parallel import attempt_store, dist_timeout

    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = attempt_store(2, dist_timeout())
    assert first is not None
    first.set("default_pg/rank_0", "127.0.0.1:4242")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = attempt_store(2, dist_timeout())
    assert second is not None
    assert not second.check(["default_pg/rank_0"])  # the restart starts from a clean namespace
    second.set("default_pg/rank_0", "127.0.0.1:5353")
    assert first.get("default_pg/rank_0") == b"127.0.0.1:4242"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # rank 0 hosts a fresh store itself
    assert attempt_store(2, dist_timeout()) is None


class _FlagDist:
    """Two ranks whose all-reduces record the device of each flag and answer `answer`."""

    enabled, is_main, world_size = True, True, 2

    def __init__(self, answer: float) -> None:
        self.answer, self.devices = answer, []

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.devices.append(t.device)
        return torch.full(t.shape, self.answer, dtype=t.dtype)

    all_reduce_min = all_reduce_sum


def test_the_agreement_flags_are_reduced_on_the_steps_device(tmp_path: Path) -> None:
    # NCCL reduces only device tensors: a flag made on the CPU fails every multi-GPU run that
    # reaches it (batch.micro = "auto", checkpoint.every_minutes). A meta device stands in for a GPU.
    from types import SimpleNamespace

    from regimen.micro import choose_micro
    from regimen.strategy import Strategy
    from regimen.trainer import Trainer

    meta = torch.device("meta")
    (tmp_path / "strategy.toml").write_text("[batch]\nmicro = 4\n")  # a run that chose 4 at its start
    d = _FlagDist(answer=4)
    s = Strategy.load(None, ["batch.size=8", "batch.micro=auto"])
    assert choose_micro(s, None, "ddp", d, meta, tmp_path).batch.micro == 4
    assert d.devices == [meta]
    d = _FlagDist(answer=1)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(checkpoint=SimpleNamespace(every=0, every_minutes=1.0)),
        progress=SimpleNamespace(step=3),
        is_main=True,
        dist=d,
        device=meta,
    )
    assert Trainer._checkpoint_due(trainer, last_save=0.0)  # type: ignore[arg-type]
    assert d.devices == [meta]
