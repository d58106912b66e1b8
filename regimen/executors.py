"""Where the runs of `regimen compare` and `regimen tune` train: local processes, torchrun, Slurm.

A `Job` is one `regimen train` (or `regimen lr-find`) on a strategy file into a directory; an
executor runs it and returns its exit code, its output kept in the directory's `train.log`.
Every executor's `run` blocks until the job ends, so callers run several at once from threads.

- `LocalExecutor(jobs, nproc)`: a `python -m regimen ...` subprocess on this machine. With
  `jobs` runs at once, each gets `OMP_NUM_THREADS = max(1, cores // jobs)` so the runs share
  the cores instead of fighting over them. `nproc > 1` passes `--nproc N`: `regimen train`
  starts torchrun itself (one process per device). On Linux each child is killed with its
  parent (`PR_SET_PDEATHSIG`), so a search killed with -9 leaves no run holding a lock.
- `InProcessExecutor(build)` (`--executor inline`): the same `regimen train` semantics in this
  process (run directory, lock, resume), one run at a time, with a task builder of the caller's
  (`rg.tune`'s model function). No process per run: for small models, where starting Python and
  torch for each run would cost more than the run.
- `SlurmExecutor(folder, parameters)`: each job is a Slurm job through submitit (its
  `AutoExecutor`; `local=True` uses submitit's `LocalExecutor`, what the tests run). The job
  runs the same subprocess on the node, so the run directory must be on a filesystem the nodes
  share.

Example:
    >>> job = Job("train", Path("s.toml"), Path("runs/a"), resume="auto")
    >>> job.argv(nproc=2)[:6]
    ['train', 's.toml', '--run-dir', 'runs/a', '--resume', 'auto']
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from regimen.errors import UserError

LOG_FILE = "train.log"
EXECUTORS = ("local", "inline", "slurm")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def child_env(jobs: int) -> dict[str, str]:
    """The environment of one of `jobs` parallel runs: an equal share of the cores for its threads.

    A thread count the caller set (`OMP_NUM_THREADS`) is an upper bound: a search started with one
    thread per process runs its runs with one thread too.
    """
    share = max(1, usable_cores() // jobs)
    given = os.environ.get("OMP_NUM_THREADS", "")
    threads = str(min(share, int(given)) if given.isdigit() and int(given) > 0 else share)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Job:
    """One `regimen train` (resumable, into its run directory) or `regimen lr-find` (into `out`)."""

    command: Literal["train", "lr-find"]
    strategy_file: Path
    out: Path
    resume: str | None = None
    allow_change: bool = False
    steps: int | None = None  # lr-find's sweep: its steps and range
    min_lr: float | None = None
    max_lr: float | None = None

    def argv(self, nproc: int = 1) -> list[str]:
        """The `regimen` arguments of this job."""
        if self.command == "lr-find":
            argv = ["lr-find", str(self.strategy_file), "--out", str(self.out)]
            for flag, value in (("--steps", self.steps), ("--min", self.min_lr), ("--max", self.max_lr)):
                argv += [flag, str(value)] if value is not None else []
            return argv
        argv = ["train", str(self.strategy_file), "--run-dir", str(self.out)]
        argv += ["--resume", self.resume] if self.resume else []
        argv += ["--allow-change"] if self.allow_change else []
        argv += ["--nproc", str(nproc)] if nproc > 1 else []
        return argv

    @property
    def log(self) -> Path:
        return self.out / LOG_FILE


class Executor(Protocol):
    """Runs a job to its end; returns its exit code (0 done, 2 a one-line error in the log, else a crash)."""

    slots: int

    def run(self, job: Job) -> int: ...


def _die_with_parent() -> None:
    """In the child: be killed when the parent dies (Linux), so no orphan keeps training."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class LocalExecutor:
    """Jobs as `python -m regimen ...` subprocesses here, `slots` at once with the cores split; `tee` echoes one job's output."""

    slots: int = 1
    nproc: int = 1
    tee: bool = False
    env: Mapping[str, str] | None = None
    procs: set[subprocess.Popen[bytes]] = field(default_factory=set, repr=False)

    def command(self, job: Job) -> list[str]:
        return [sys.executable, "-m", "regimen", *job.argv(self.nproc)]

    def run(self, job: Job) -> int:
        job.out.mkdir(parents=True, exist_ok=True)
        env = {**child_env(self.slots), **(self.env or {})}
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        with job.log.open("ab") as log:
            if not self.tee:
                proc = subprocess.Popen(
                    self.command(job), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec
                )
                self.procs.add(proc)
                try:
                    return _wait([proc])
                finally:
                    self.procs.discard(proc)
            proc = subprocess.Popen(
                self.command(job), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec
            )
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    sys.stderr.write(line.decode(errors="replace"))
                    sys.stderr.flush()
            finally:
                code = _wait([proc])
            return code

    def stop_all(self) -> None:
        """Stop every job still running (an interrupted command): terminate, then kill."""
        stop(list(self.procs))


def _wait(procs: Sequence[subprocess.Popen[bytes]]) -> int:
    """Wait for a child; on any interruption terminate it (then kill it) so nothing is left running."""
    try:
        return procs[0].wait()
    finally:
        stop(procs)


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Terminate the children still running (they were started here), then make sure they exit."""
    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        proc.terminate()
    for proc in alive:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class InProcessExecutor:
    """Jobs in this process, one at a time: `regimen train` semantics with the caller's task builder."""

    build: Callable[[Any], Any] | None = None  # Strategy -> Task; None: the strategy's built-in task
    slots: int = 1
    quiet: bool = True
    errors: dict[Path, str] = field(default_factory=dict)

    def run(self, job: Job) -> int:
        from regimen.strategy import Strategy

        job.out.mkdir(parents=True, exist_ok=True)
        try:
            strategy = Strategy.load(job.strategy_file)
            if self.quiet:
                strategy = strategy.replace({"observe.progress": "none"})  # no progress bars interleaved with the caller's output
            if job.command == "lr-find":
                _lr_find_here(strategy, job, self.build)
                return 0
            from regimen.runner import prepare_run_dir, run_training

            prepare_run_dir(job.out, job.resume, overwrite=False)
            return run_training(strategy, job.out, resume=job.resume, quiet=self.quiet, allow_change=job.allow_change, build=self.build)
        except UserError as e:
            self.errors[job.out] = str(e)
            with job.log.open("a") as log:
                log.write(f"regimen: error: {e}\n")
            return 2
        except Exception:  # a crash of the run, as a subprocess's would be: logged, exit 1
            import traceback

            with job.log.open("a") as log:
                log.write(traceback.format_exc())
            return 1


def _lr_find_here(strategy: Any, job: Job, build: Callable[[Any], Any] | None) -> None:
    import json

    from regimen.lr_find import RESULT_FILE, Sweep, range_test
    from regimen.task import build_task

    task = build(strategy.resolve()) if build is not None else build_task(strategy.resolve())
    sweep = Sweep(steps=job.steps or 100, min_lr=job.min_lr or Sweep.min_lr, max_lr=job.max_lr or Sweep.max_lr)
    result = range_test(task, strategy, sweep)
    (job.out / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n")


def _run_on_node(command: list[str], log: str, env: dict[str, str]) -> int:
    """What a Slurm job runs on its node: the job's subprocess, its output appended to the run's log."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **env})


@dataclass
class SlurmExecutor:
    """Each job as a Slurm job through submitit (`local=True`: submitit's LocalExecutor, on this machine)."""

    folder: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)
    slots: int = 1
    nproc: int = 1
    local: bool = False

    def __post_init__(self) -> None:
        try:
            import submitit
        except ImportError:
            raise UserError("--executor slurm needs submitit: pip install 'regimen[slurm]'") from None
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.local:
            self.executor: Any = submitit.LocalExecutor(folder=str(self.folder))
        else:
            self.executor = submitit.AutoExecutor(folder=str(self.folder))
        params = dict(self.parameters)
        if self.nproc > 1 and not self.local:
            params.setdefault("slurm_gpus_per_node", self.nproc)
        try:
            if params:
                self.executor.update_parameters(**params)
        except (TypeError, ValueError) as e:
            raise UserError(f"--slurm: {e}") from None

    def run(self, job: Job) -> int:
        command = [sys.executable, "-m", "regimen", *job.argv(self.nproc)]
        env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        submitted = self.executor.submit(_run_on_node, command, str(job.log), env)
        try:
            return int(submitted.result())
        except Exception as e:  # the Slurm job failed (node lost, time limit): a crash, retried by a re-run
            with job.log.open("a") as log:
                log.write(f"regimen: the Slurm job {getattr(submitted, 'job_id', '?')} failed: {e}\n")
            return 1
        finally:
            if submitted.state not in ("COMPLETED", "FAILED", "CANCELLED", "FINISHED"):
                with contextlib.suppress(Exception):
                    submitted.cancel()


def parse_slurm_parameters(items: Sequence[str]) -> dict[str, Any]:
    """`["slurm_partition=gpu", "timeout_min=60"]` -> submitit parameters (values as TOML, else strings).

    >>> parse_slurm_parameters(["slurm_partition=gpu", "timeout_min=60"])
    {'slurm_partition': 'gpu', 'timeout_min': 60}
    """
    from regimen.strategy import parse_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm {item!r}: expected key=value, e.g. slurm_partition=gpu or timeout_min=60")
        out[key.strip()] = parse_value(value.strip())
    return out


def make_executor(
    kind: str, *, slots: int = 1, nproc: int = 1, folder: Path | None = None, slurm: Sequence[str] = (), tee: bool = False
) -> Executor:
    """The executor a command's `--executor`, `--jobs`, `--nproc` and `--slurm` name."""
    if kind not in EXECUTORS:
        raise UserError(f"--executor {kind!r}: allowed: {', '.join(EXECUTORS)}")
    if slots < 1:
        raise UserError(f"--jobs = {slots}: must be >= 1")
    if nproc < 1:
        raise UserError(f"--nproc = {nproc}: must be >= 1")
    if kind == "slurm":
        assert folder is not None
        params = parse_slurm_parameters(slurm)
        local = bool(params.pop("local", False))  # submitit's LocalExecutor: a cluster-free check of the path
        return SlurmExecutor(folder, params, slots=slots, nproc=nproc, local=local)
    if slurm:
        raise UserError("--slurm is for --executor slurm")
    if kind == "inline":
        if slots > 1:
            raise UserError("--executor inline trains one run at a time in this process; for --jobs N use --executor local")
        if nproc > 1:
            raise UserError("--executor inline trains in this process: it cannot start --nproc processes; use --executor local")
        return InProcessExecutor()
    return LocalExecutor(slots=slots, nproc=nproc, tee=tee and slots == 1)


def run_jobs(executor: Executor, jobs: Sequence[Job], on_start: Callable[[Job], None], on_end: Callable[[Job, int, float], None]) -> None:
    """Run `jobs`, `executor.slots` at a time (threads), calling `on_start` and `on_end(job, code, seconds)` around each.

    An interrupt stops the jobs still running (their run directories resume on a re-run).
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    def one(job: Job) -> None:
        on_start(job)
        start = time.perf_counter()
        code = executor.run(job)
        on_end(job, code, time.perf_counter() - start)

    if executor.slots <= 1 or len(jobs) <= 1:
        for job in jobs:
            one(job)
        return
    pool = ThreadPoolExecutor(max_workers=executor.slots)
    try:
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()
    except BaseException:
        stop_all = getattr(executor, "stop_all", None)
        if stop_all is not None:
            stop_all()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def last_error(log: Path) -> str | None:
    """The one-line reason of a run that exited 2 (`regimen: error: ...` in its log), or None."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((ln.split("error: ", 1)[1] for ln in reversed(lines) if ln.startswith("regimen: error: ")), None)


__all__ = [
    "EXECUTORS",
    "Executor",
    "InProcessExecutor",
    "Job",
    "LocalExecutor",
    "SlurmExecutor",
    "child_env",
    "last_error",
    "make_executor",
    "run_jobs",
    "usable_cores",
]
