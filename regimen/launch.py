"""torchrun for `regimen train --nproc N`: starting the workers, and how each of them ends.

Two promises, both about the end of a job:

1. **A finished worker exits 0.** gloo's worker threads release the tensors of a finished
   collective a moment after the caller's `wait()` returns, and releasing a tensor that Python
   already dropped takes the GIL. If the interpreter is finalizing by then, taking the GIL ends
   the thread by unwinding it through a noexcept destructor: `terminate called without an
   active exception`, SIGABRT, and torchrun reports a run whose every file is complete as failed
   (pytorch/pytorch#190489; before this module, 2 of 20 two-process FSDP runs and 3 of 12
   four-process ones here). `destroy_process_group()` does not stop those threads: FSDP2's
   meshes and DTensor's sharding cache keep the group alive until finalization. So a worker
   ends as multiprocessing's children do (`end_worker`): the non-daemon threads joined and the
   atexit handlers run, the standard streams flushed, then `os._exit`, with no finalization
   for the threads to race. Everything a run writes is closed before that point.
2. **A refused input is one line and exit 2**, as with one process. A worker that raises a
   `UserError` writes its line into a directory the launcher made (`report_user_error`) and
   exits 2; the launcher prints the line of the lowest rank that wrote one and exits 2.
   torchrun's own report of the failure (its log lines and the 40-line ChildFailedError) says
   nothing more, so the torchrun process drops what it writes to stderr once a worker has
   reported a user error (`_torchrun_main`); the workers' output, which goes to the terminal
   directly, is untouched. Any other failure keeps torchrun's full report and exit code.

Example:
    >>> def refused() -> int:
    ...     raise UserError("data.source = 'text:x': 'x' does not exist")
    >>> exit_code_of(lambda: 0), exit_code_of(refused)  # the line goes to stderr outside a --nproc job
    (0, 2)
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, NoReturn

from regimen.errors import UserError

# Where the workers of a `--nproc` job write the line of a UserError (set by `torchrun`).
ERROR_DIR_ENV = "REGIMEN_ERROR_DIR"
USER_ERROR_EXIT = 2  # the CLI's exit code for a refused input


def in_worker() -> bool:
    """Whether this process is one of several workers of a torchrun job.

    >>> in_worker()  # not under torchrun
    False
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun(args: list[str], output: IO[str] | None = None) -> int:
    """Run `torchrun ARGS` (torch.distributed.run) in a child process and wait for it; returns its exit code.

    `output`: a file for everything the job writes (stdout and stderr); default the terminal.

    Raises the `UserError` a worker reported (the lowest rank's line) when the job failed on
    one, so that the CLI prints one line and exits 2 (see the module).

    >>> torchrun(["--standalone", "--nproc-per-node=2", "-m", "regimen", "train"])  # doctest: +SKIP
    0
    """
    with tempfile.TemporaryDirectory(prefix="regimen-errors-") as errors:
        env = {**os.environ, ERROR_DIR_ENV: errors}
        # torchrun's own default for several workers per node, set here so it does not print its banner.
        env.setdefault("OMP_NUM_THREADS", "1")
        command = [sys.executable, "-c", "from regimen.launch import _torchrun_main; _torchrun_main()", *args]
        code = subprocess.call(command, env=env, stdout=output, stderr=None if output is None else subprocess.STDOUT)
        line = first_user_error(Path(errors))
    if code != 0 and line is not None:
        raise UserError(line)
    return code


def first_user_error(errors: Path) -> str | None:
    """The line of the lowest rank that reported a UserError into `errors`, or None.

    >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "rank-00001").write_text("no such file\\n")
    13
    >>> first_user_error(d)
    'no such file'
    """
    reports = sorted(p for p in errors.glob("rank-*") if p.suffix != ".tmp")
    return reports[0].read_text().strip() if reports else None


def report_user_error(error: UserError, rank: int) -> None:
    """Hand a worker's UserError to the launcher, or, under a torchrun started by hand, print it.

    >>> report_user_error(UserError("data.source = 'text:x': 'x' does not exist"), rank=0)  # stderr, outside a --nproc job
    """
    errors = os.environ.get(ERROR_DIR_ENV)
    if not errors:
        print(f"regimen: error: {error}", file=sys.stderr)
        return
    report = Path(errors) / f"rank-{rank:05d}"
    tmp = report.with_suffix(".tmp")
    tmp.write_text(f"{error}\n")
    os.replace(tmp, report)  # the launcher reads a whole line or none


def exit_code_of(work: Callable[[], int], rank: int | None = None) -> int:
    """`work()`'s exit code in a worker: a UserError is reported (`report_user_error`) and becomes 2."""
    try:
        return work()
    except UserError as e:
        report_user_error(e, int(os.environ.get("RANK", "0")) if rank is None else rank)
        return USER_ERROR_EXIT


# What a worker must never destroy before `end_worker` (see `keep_until_exit`).
_KEPT: list[object] = []


def keep_until_exit(obj: object) -> None:
    """In a torchrun worker, keep `obj` (the trainer: its DDP reducer, its process group) alive until `os._exit`.

    Destroying gloo's process group joins its worker threads while this thread holds the GIL;
    a worker thread that is still releasing the last collective's tensors waits for the GIL:
    a deadlock (seen here: the main thread in `~ProcessGroupGloo` -> `thread::join`, the gloo
    thread in `gil_scoped_acquire` from `~AsyncWork`, when `run_training`'s frame freed the
    trainer). A worker ends with `os._exit` anyway, so nothing needs destroying.
    Outside a worker, nothing is kept.

    >>> keep_until_exit(object()); len(_KEPT)
    0
    """
    if in_worker():
        _KEPT.append(obj)


def end_worker(code: int) -> NoReturn:
    """End this worker with `code`: threads joined, atexit handlers run, streams flushed, no finalization (see the module).

    >>> end_worker(0)  # doctest: +SKIP
    """
    shutdown_threads = getattr(threading, "_shutdown", None)  # what finalization runs first (CPython)
    if shutdown_threads is not None:
        shutdown_threads()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is not None:
        run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream has nothing left to lose
            stream.flush()
    os._exit(code)


class _QuietAfterUserError(io.TextIOBase):
    """The torchrun process's stderr: written through until a worker reports a UserError, dropped after."""

    def __init__(self, stream: io.TextIOBase, errors: Path) -> None:
        self.stream, self.reports = stream, errors

    def write(self, text: str) -> int:
        if first_user_error(self.reports) is None:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:  # the workers inherit the real descriptor, not this filter
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _torchrun_main() -> None:
    """The torchrun process of `torchrun()`: torch.distributed.run's main, its stderr quiet after a user error."""
    import logging

    from torch.distributed import run

    quiet = _QuietAfterUserError(sys.stderr, Path(os.environ[ERROR_DIR_ENV]))  # type: ignore[arg-type]
    sys.stderr = quiet  # the traceback of torchrun's ChildFailedError is printed here
    # torch's log handlers were made at import, on the real stderr: point them at the filter too.
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is quiet.stream:
                handler.setStream(quiet)
    run.main()
