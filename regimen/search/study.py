"""The Optuna study that records a search's work: who trains what, what it measured.

Every piece of work is an Optuna trial: a probe (`probe-lr:<family>`, `probe-noise`) in the
study `<name>:probe`, and a candidate's measurement at a rung (`rung<r>:<candidate>`) in the
study `<name>`, with the candidate and the rung as the trial's parameters and the measured
validation loss as its value. Trials are *enqueued* (`Study.enqueue_trial`) for the work the
race needs next and *claimed* by the processes that work on the search: Optuna moves a trial
from WAITING to RUNNING only when it is WAITING (`BaseStorage.set_trial_state_values` returns
False otherwise), which is how several `regimen tune` processes on one storage share the work.

What Optuna leaves to us, and how it is closed here:

- SQLite ignores the row lock (`SELECT ... FOR UPDATE`) Optuna's claim relies on, so two
  processes can both move one WAITING trial to RUNNING. Claims and enqueues on an SQLite
  storage are serialised with an `flock` on `<database>.regimen-lock` (SQLite is a local file;
  on a shared filesystem use a journal file, `journal:PATH`, whose claims are ordered by its
  log).
- Two processes may enqueue the same work at once. The work of a trial is its `unit` key; of the
  trials with one key that did not fail, the one with the lowest number is the real one, and a
  process that claims another one marks it FAIL (`duplicate`) without training.
- A process that dies leaves its trials RUNNING. A RUNNING trial is stale when its process (same
  host, `pid` in its attributes) no longer exists, or its heartbeat (a user attribute each
  process refreshes every `HEARTBEAT` seconds) is older than `STALE_AFTER`, or its claimer died
  before writing those attributes (none, `CLAIM_GRACE` after the claim); stale trials are
  marked FAIL, and the work is enqueued again (and resumes from its run directories).

Example:
    >>> parse_storage("journal:/tmp/x.log")
    ('journal', '/tmp/x.log')
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from regimen.errors import UserError

HEARTBEAT = 20.0
STALE_AFTER = 300.0
CLAIM_GRACE = HEARTBEAT  # a RUNNING trial without its claimer's attributes this long after the claim is stale
# A unit that crashed this many times is recorded as failed instead of retried forever.
MAX_ATTEMPTS = 3
HOST = socket.gethostname()


def optuna_module() -> Any:
    """`import optuna`, or the one line that says how to install it."""
    try:
        import optuna
    except ImportError:
        raise UserError("regimen tune needs Optuna: pip install 'regimen[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def parse_storage(url: str) -> tuple[str, str]:
    """(`rdb` | `journal` | `redis`, location) of a `--storage` URL."""
    if url.startswith("journal:"):
        return "journal", url.partition(":")[2]
    if url.startswith(("redis://", "rediss://")):
        return "redis", url
    return "rdb", url


def open_storage(url: str) -> tuple[Any, Path | None]:
    """The Optuna storage of a URL and, for SQLite, the lock file that serialises claims; one line if it cannot be opened."""
    optuna = optuna_module()
    kind, where = parse_storage(url)
    try:
        if kind == "journal":
            if not where:
                raise UserError("--storage journal:PATH: give the journal file's path")
            path = Path(where).expanduser()
            if not path.parent.is_dir():
                raise UserError(f"--storage {url!r}: the directory {str(path.parent)!r} does not exist")
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(str(path))), None
        if kind == "redis":
            from optuna.storages.journal import JournalRedisBackend

            return optuna.storages.JournalStorage(JournalRedisBackend(where)), None
        sqlite = where.startswith("sqlite:")
        kwargs = {"connect_args": {"timeout": 120}} if sqlite else {}
        lock = None
        if sqlite:
            db = where.split(":///", 1)[1] if ":///" in where else ""
            lock = Path(db + ".regimen-lock") if db and db != ":memory:" and Path(db).parent.is_dir() else None
        return _rdb(optuna, where, kwargs, lock), lock
    except UserError:
        raise
    except Exception as e:  # a bad URL, a missing driver, a server that does not answer: all one line
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"--storage {url!r}: cannot open it ({type(e).__name__}: {reason})") from None


def _rdb(optuna: Any, url: str, kwargs: dict[str, Any], lock: Path | None) -> Any:
    """`RDBStorage(url)`: processes starting together race to create its tables (optuna#4621); the
    loser's IntegrityError is retried once the winner is done, and SQLite's are serialised outright."""
    for attempt in range(5):
        try:
            with file_lock(lock):
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as e:
            if "IntegrityError" not in type(e).__name__ or attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive flock on `path` (nothing when None)."""
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger:
    """One Optuna study used as a work queue: enqueue units, claim one, record its result."""

    def __init__(self, storage: Any, lock: Path | None, name: str) -> None:
        optuna = optuna_module()
        self.optuna = optuna
        self.storage, self.lock, self.name = storage, lock, name
        self.local = threading.Lock()  # one scheduling decision at a time in this process
        with file_lock(self.lock):
            self.study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
        self.held: set[int] = set()  # trial ids this process is running
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- reading -----------------------------------------------------------------------

    def trials(self) -> list[Any]:
        return self.study.get_trials(deepcopy=False)

    def by_unit(self) -> dict[str, list[Any]]:
        """Every trial, grouped by its unit key, in trial-number order."""
        out: dict[str, list[Any]] = {}
        for t in self.trials():
            key = t.user_attrs.get("unit")
            if key is not None:
                out.setdefault(key, []).append(t)
        return out

    def done(self, keys: Sequence[str]) -> dict[str, Any]:
        """The finished trial of each key that has one (its real trial, COMPLETE)."""
        state = self.optuna.trial.TrialState
        out = {}
        for key, trials in self.by_unit().items():
            if key in keys:
                real = [t for t in trials if t.state == state.COMPLETE and not t.user_attrs.get("duplicate")]
                if real:
                    out[key] = real[0]
        return out

    # ---- enqueue, claim, finish ---------------------------------------------------------

    def enqueue_missing(self, units: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Enqueue each unit (key, params) that has no trial waiting, running or finished."""
        state = self.optuna.trial.TrialState
        live = (state.WAITING, state.RUNNING, state.COMPLETE, state.PRUNED)
        with file_lock(self.lock):
            groups = self.by_unit()
            for key, params in units:
                if not any(t.state in live for t in groups.get(key, [])):
                    self.study.enqueue_trial(params, user_attrs={"unit": key})

    def claim(self, keys: Sequence[str]) -> Any | None:
        """Move one WAITING trial of `keys` to RUNNING for this process; its `optuna.Trial`, or None."""
        state = self.optuna.trial.TrialState
        wanted = set(keys)
        with file_lock(self.lock):
            trials = self.trials()
            for t in trials:
                key = t.user_attrs.get("unit")
                if t.state != state.WAITING or key not in wanted:
                    continue
                try:
                    if not self.storage.set_trial_state_values(t._trial_id, state=state.RUNNING):
                        continue
                except self.optuna.exceptions.UpdateFinishedTrialError:
                    continue
                first = next(o for o in trials if o.user_attrs.get("unit") == key and (o.state != state.FAIL or o.number == t.number))
                if first.number != t.number:
                    # Enqueued twice by two processes: the lower number is the real one.
                    self.storage.set_trial_user_attr(t._trial_id, "duplicate", first.number)
                    self.storage.set_trial_state_values(t._trial_id, state=state.FAIL)
                    continue
                for attr, value in (("host", HOST), ("pid", os.getpid()), ("heartbeat", time.time())):
                    self.storage.set_trial_user_attr(t._trial_id, attr, value)
                self.held.add(t._trial_id)
                self._start_heartbeat()
                return self.optuna.trial.Trial(self.study, t._trial_id)
        return None

    def attempts(self, key: str) -> int:
        """Trials of a unit that failed (crashed or went stale), duplicates not counted."""
        state = self.optuna.trial.TrialState
        return sum(1 for t in self.by_unit().get(key, []) if t.state == state.FAIL and not t.user_attrs.get("duplicate"))

    def finish(self, trial: Any, value: float | None, attrs: dict[str, Any]) -> None:
        """Record a unit: its value (COMPLETE), or None for a crash (FAIL: the work is enqueued again)."""
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        state = self.optuna.trial.TrialState
        if value is None:
            self.study.tell(trial, state=state.FAIL)
        else:
            self.study.tell(trial, value if math.isfinite(value) else math.inf)
        self.held.discard(trial._trial_id)

    def fail_held(self) -> None:
        """Mark this process's running trials FAIL (an interrupted search): a re-run takes them up at once."""
        state = self.optuna.trial.TrialState
        for trial_id in list(self.held):
            with contextlib.suppress(Exception):
                self.storage.set_trial_state_values(trial_id, state=state.FAIL)
            self.held.discard(trial_id)

    def fail_stale(self, keys: Sequence[str]) -> int:
        """Mark FAIL the RUNNING trials of `keys` whose process is gone; returns how many."""
        state = self.optuna.trial.TrialState
        wanted, now, failed = set(keys), time.time(), 0
        for t in self.trials():
            if t.state != state.RUNNING or t.user_attrs.get("unit") not in wanted or t._trial_id in self.held:
                continue
            attrs = t.user_attrs
            gone = attrs.get("host") == HOST and isinstance(attrs.get("pid"), int) and not _alive(attrs["pid"])
            if "heartbeat" in attrs:
                silent, why = now - float(attrs["heartbeat"]) > STALE_AFTER, "no heartbeat"
            else:
                # Claimed (RUNNING) but the claimer's host, pid and heartbeat never written: it died
                # between the two writes of `claim`. Nothing else would ever free the unit (the
                # search waited forever); the attributes follow the claim at once, so a grace of
                # one heartbeat from the claim (optuna's datetime_start) tells a dead claimer.
                started = t.datetime_start.timestamp() if t.datetime_start is not None else now
                silent, why = now - started > CLAIM_GRACE, "claimed, then nothing"
            if gone or silent:
                with contextlib.suppress(self.optuna.exceptions.UpdateFinishedTrialError):
                    self.storage.set_trial_user_attr(t._trial_id, "stale", "process gone" if gone else why)
                    if self.storage.set_trial_state_values(t._trial_id, state=state.FAIL):
                        failed += 1
        return failed

    # ---- heartbeat -----------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="regimen-tune-heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            for trial_id in list(self.held):
                with contextlib.suppress(Exception):
                    self.storage.set_trial_user_attr(trial_id, "heartbeat", time.time())

    def close(self) -> None:
        self._stop.set()
