"""The search itself: the probe, then the race, as units of work recorded in an Optuna study.

`Search` holds what every process working on one search computes the same way (the plan, the
probe's decisions, which candidates reach which rung); `Search.work()` is one worker: it takes
the next unit of work from the study (`regimen.search.study.Ledger`), trains it through the
executor, and records what it measured, until the search is done. `--jobs N` runs N workers in
threads of one process; other processes (other machines) pointed at the same storage and
`--out` run theirs. Successive halving here is synchronous: a rung's survivors are chosen when
every candidate of the rung has finished, by (value, candidate order), so the choice is the same
whatever the number of workers and the order they finish in (Optuna's asynchronous
`SuccessiveHalvingPruner` promotes on the trials finished so far, so its choice would depend on
timing; here the pruning decision is ours, recorded in the trials' attributes).

Directory of a search (`--out`):

```
tune.db                     the Optuna study (default storage)
search.json                 what the search is: CONFIG, the space, the budget (its fingerprint names the study)
probe/lr-<family>/          regimen lr-find of each family (lr_find.json)
probe/noise/                a short run of CONFIG measuring the noise scale (a run directory)
trials/<candidate>/trunk/   the trunk (branch and prefix candidates): a run directory
trials/<candidate>/rung<r>/ a measurement run (branch, restart): a run directory
trials/<candidate>/*.toml   the strategy file of each of them
best.toml, report.html      the result
```
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regimen import rundir
from regimen.errors import UserError
from regimen.executors import Executor, Job, last_error
from regimen.search.plan import Candidate, Plan, make_plan, promote, tokens_per_sample
from regimen.search.probe import decide_batch
from regimen.search.space import Space
from regimen.search.study import MAX_ATTEMPTS, Ledger, open_storage
from regimen.strategy import BUDGET_UNITS, Strategy

SEARCH_FILE = "search.json"
POLL = 1.0


@dataclass(frozen=True)
class Budget:
    """The search's compute: `x` (multiples of one full run), `tokens`, `samples` or `minutes`.

    >>> Budget("x", 3.0).samples(full=1000, per_sample=64)
    3000
    """

    kind: str
    amount: float

    def samples(self, full: int, per_sample: int, rate: float | None = None) -> int:
        if self.kind == "x":
            return int(self.amount * full)
        if self.kind == "tokens":
            return int(self.amount // per_sample)
        if self.kind == "samples":
            return int(self.amount)
        assert rate is not None, "a budget in minutes is converted with the probe's throughput"
        return int(self.amount * 60 * rate)

    def describe(self) -> str:
        return {"x": f"{self.amount:g}x", "tokens": f"{self.amount:,.0f} tokens", "samples": f"{self.amount:,.0f} samples"}.get(
            self.kind, f"{self.amount:g} minutes"
        )


@dataclass
class Decisions:
    """What the probe decided: each probing family's suggested LR, the noise scale, the batch keys."""

    lrs: dict[str, float]
    lr_notes: dict[str, str]
    noise_scale: float | None
    rate: float | None  # samples per second of the noise probe (for --budget-minutes)
    batch_keys: dict[str, Any]
    batch_reason: str


@dataclass
class Search:
    """One search: CONFIG, the space, the budget, where it writes, how it trains."""

    base: Strategy
    space: Space
    budget: Budget
    out: Path
    executor: Executor
    storage_url: str | None = None
    world: int = 1
    train_size: int | None = None
    log: Callable[[str], None] = lambda line: None
    plan: Plan | None = None
    _decisions: Decisions | None = field(default=None, repr=False)
    _errors: list[BaseException] = field(default_factory=list, repr=False)
    # What no process can change any more: a rung's survivors once the rung before is done, and the
    # rungs whose every unit is done (a COMPLETE unit is final). Kept so each scheduling decision
    # reads the study once per open rung, not once per rung and level of `survivors`.
    _survivors: dict[int, list[Candidate]] = field(default_factory=dict, repr=False)
    _finished_rungs: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.per_sample = tokens_per_sample(self.base)
        if self.budget.kind != "minutes":
            self.plan = self._make_plan(None)

    # ---- identity ---------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """What the search is, as data: the same spec, the same study."""
        return {
            "base": self.base.resolve().to_dict(),
            "space": self.space.to_json(),
            "budget": {"kind": self.budget.kind, "amount": self.budget.amount},
            "world": self.world,
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def study_name(self) -> str:
        return f"regimen-tune-{self.fingerprint()}"

    def _make_plan(self, rate: float | None) -> Plan:
        from regimen.search.plan import full_run_samples

        full = full_run_samples(self.base, self.train_size, self.world)
        return make_plan(self.base, self.space, self.budget.samples(full, self.per_sample, rate), self.train_size, self.world)

    # ---- opening ------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect to the storage (a given URL first: an unreachable one fails before anything is written), then `--out`."""
        url = self.storage_url
        if url is not None:
            storage, lock = open_storage(url)
        rundir.check_location(self.out, "--out")
        self.out.mkdir(parents=True, exist_ok=True)
        have = rundir.read_json(self.out / SEARCH_FILE)
        spec = {"fingerprint": self.fingerprint(), **self.spec()}
        if have is not None and have.get("fingerprint") != spec["fingerprint"]:
            raise UserError(
                f"--out {str(self.out)!r} holds another search (CONFIG, space or budget differ); use another --out, "
                "or delete that directory to start over"
            )
        if have is None:
            _publish_once(self.out / SEARCH_FILE, json.dumps(spec, indent=1, default=str) + "\n")
        if url is None:
            url = f"sqlite:///{(self.out / 'tune.db').resolve()}"
            storage, lock = open_storage(url)
        self.storage_url = url
        self.probe_ledger = Ledger(storage, lock, f"{self.study_name}:probe")
        self.race_ledger = Ledger(storage, lock, self.study_name)

    def close(self) -> None:
        for ledger in (getattr(self, "probe_ledger", None), getattr(self, "race_ledger", None)):
            if ledger is not None:
                ledger.close()

    # ---- the probe ------------------------------------------------------------------------------

    def probing(self) -> list[str]:
        """The families whose range test runs (the others share one: `plan.probe_groups`)."""
        from regimen.search.plan import probe_groups

        groups = probe_groups(self.base, self.space)
        return [name for name in groups if groups[name] == name]

    def probe_keys(self) -> list[str]:
        noise = ["probe-noise"] if self.space.batch == "probe" or self.budget.kind == "minutes" else []
        return [f"probe-lr:{name}" for name in self.probing()] + noise

    def family_strategy(self, name: str) -> Strategy:
        family = next(f for f in self.space.families if f.name == name)
        return self.base.replace(family.points()[0])

    def noise_budget(self) -> int:
        from regimen.search.plan import MIN_RUNG_STEPS, full_run_samples

        full = full_run_samples(self.base, self.train_size, self.world)
        return max(MIN_RUNG_STEPS * self.base.batch.size, full // 27)

    def decisions(self) -> Decisions | None:
        """The probe's decisions once every probe unit is done (the same in every process), else None."""
        if self._decisions is not None:
            return self._decisions
        done = self.probe_ledger.done(self.probe_keys())
        if len(done) < len(self.probe_keys()):
            return None
        from regimen.search.plan import probe_groups

        lrs, notes = {}, {}
        for name, runs_for in probe_groups(self.base, self.space).items():
            t = done[f"probe-lr:{runs_for}"]
            found = t.value is not None and math.isfinite(t.value) and t.value > 0
            lrs[name] = float(t.value) if found else float(self.family_strategy(name).optimizer.lr)
            if t.user_attrs.get("fallback") or not found:
                notes[name] = str(t.user_attrs.get("fallback") or "the range test failed; CONFIG's optimizer.lr used")
        noise_trial = done.get("probe-noise")
        value = noise_trial.value if noise_trial is not None else None
        noise = value if value and math.isfinite(value) and value > 0 else None
        rate = noise_trial.user_attrs.get("samples_per_s") if noise_trial is not None else None
        if self.plan is None:
            self.plan = self._make_plan(float(rate) if rate else None)
        keys: dict[str, Any]
        if self.space.batch == "keep":
            keys, reason = {}, "keep CONFIG's batch (search.batch = 'keep')"
        else:
            keys, reason = decide_batch(self.base.batch.schedule, self.base.batch.size, noise, self.plan.full)
        self._decisions = Decisions(lrs, notes, noise, float(rate) if rate else None, keys, reason)
        return self._decisions

    def run_probe(self, key: str, trial: Any) -> tuple[float | None, dict[str, Any]]:
        """Train one probe unit; (value, attributes) for the study, value None for a crash."""
        folder = self.out / "probe"
        if key == "probe-noise":
            s = self._trial_settings(self.base).replace(
                {"observe.noise_scale": True, "train.samples": self.noise_budget(), "train.steps": None, "train.tokens": None}
                | {"train.epochs": None}
            )
            file = self._write(folder / "noise.toml", s)
            run_dir = folder / "noise"
            before = self._samples(run_dir)
            code = self.executor.run(Job("train", file, run_dir, resume="auto"))
            if code != 0:
                return (math.inf, {"error": last_error(run_dir / "train.log") or f"exit {code}"}) if code == 2 else (None, {})
            rows = rundir.read_metrics(run_dir / rundir.METRICS_FILE)
            noise = next((r["noise_scale"] for r in reversed(rows) if r.get("noise_scale") is not None), None)
            summary = rundir.read_summary(run_dir) or {}
            rate = summary.get("samples", 0) / max(summary.get("wall_time") or 1e-9, 1e-9)
            value = float(noise) if noise is not None and math.isfinite(noise) and noise > 0 else 0.0
            return value, {"samples": self._samples(run_dir) - before, "samples_per_s": rate, "phase": "probe"}
        name = key.partition(":")[2]
        s = self._trial_settings(self.family_strategy(name))
        file = self._write(folder / f"lr-{name}.toml", s)
        out = folder / f"lr-{name}"
        from regimen.search.plan import PROBE_DIVISOR, PROBE_MAX_LR, PROBE_MIN_LR, PROBE_STEPS

        code = self.executor.run(Job("lr-find", file, out, steps=PROBE_STEPS, min_lr=PROBE_MIN_LR, max_lr=PROBE_MAX_LR))
        result = rundir.read_json(out / "lr_find.json")
        attrs: dict[str, Any] = {"phase": "probe", "samples": PROBE_STEPS * s.batch.size}
        if code == 0 and result is not None and result.get("minimum"):
            attrs["steepest"], attrs["minimum"] = result.get("steepest"), result["minimum"]
            return float(result["minimum"]) / PROBE_DIVISOR, attrs
        if code not in (0, 2) and result is None:
            return None, {}
        why = last_error(out / "train.log") or "the loss never decreased over the sweep"
        attrs["fallback"] = f"no suggestion ({why}); CONFIG's optimizer.lr used"
        return float(self.base.optimizer.lr), attrs

    # ---- the race -------------------------------------------------------------------------------

    def candidate_strategy(self, c: Candidate, budget: int | None) -> Strategy:
        """The candidate's strategy measured at `budget` samples (None: the full run, CONFIG's own budget keys)."""
        d = self.decisions()
        assert d is not None and self.plan is not None
        from regimen.search.space import CONFIG_FAMILY

        # The incumbent stays exactly CONFIG: the probe's batch decision applies to the other candidates.
        batch_keys = {} if c.family == CONFIG_FAMILY else d.batch_keys
        keys = {**dict(c.keys), **batch_keys}
        if c.lr_factor is not None:
            keys["optimizer.lr"] = float(f"{d.lrs[c.family] * c.lr_factor:.3g}")
        # Held for every candidate, as compare does: the LR scaling's reference is CONFIG's batch.
        keys["lr.reference_batch"] = self.base.resolve().lr.reference_batch
        s = self.base.replace(keys)
        if budget is not None or batch_keys:
            s = s.replace(_budget_keys("samples", budget if budget is not None else self.plan.full))
        return s

    def rung_key(self, r: int, c: Candidate) -> str:
        return f"rung{r}:{c.name}"

    def survivors(self, r: int) -> list[Candidate] | None:
        """The candidates that run rung r, or None while rung r-1 is still going."""
        assert self.plan is not None
        if r == 0:
            return list(self.plan.candidates)
        if r in self._survivors:
            return self._survivors[r]
        before = self.survivors(r - 1)
        if before is None:
            return None
        done = self.race_ledger.done([self.rung_key(r - 1, c) for c in before])
        if len(done) < len(before):
            return None
        order = {c.name: i for i, c in enumerate(self.plan.candidates)}
        ranked = sorted(before, key=lambda c: (done[self.rung_key(r - 1, c)].value, order[c.name]))
        self._survivors[r] = promote(self.plan, r, [c for c in ranked if math.isfinite(done[self.rung_key(r - 1, c)].value)])
        return self._survivors[r]

    def run_rung(self, c: Candidate, r: int) -> tuple[float | None, dict[str, Any]]:
        """Train candidate `c` to rung `r` and measure it; (value, attributes), value None for a crash."""
        assert self.plan is not None
        top = r == len(self.plan.rungs) - 1
        budget = None if top else self.plan.rungs[r]
        s = self.candidate_strategy(c, budget)
        folder = self.out / "trials" / c.name
        trunk = folder / "trunk"
        spent = 0
        if c.kind in ("branch", "prefix"):
            trunk_s = s if c.kind == "prefix" else trunk_strategy(s, self.per_sample, self.world, self.train_size)
            file = self._write(folder / f"trunk-rung{r}.toml", self._trial_settings(trunk_s))
            before = self._samples(trunk)
            code = self.executor.run(Job("train", file, trunk, resume="auto"))
            spent += self._samples(trunk) - before
            if code != 0:
                return self._failed(code, trunk, spent)
            if c.kind == "prefix":
                return self._measured(trunk, spent, trunk)
        run_dir = folder / f"rung{r}"
        if (rundir.read_summary(run_dir) or {}).get("status") == "finished":
            return self._measured(run_dir, spent, run_dir)
        file = self._write(folder / f"rung{r}.toml", self._trial_settings(s))
        if c.kind == "branch" and latest_checkpoint(run_dir) is None:
            start = latest_checkpoint(trunk)
            assert start is not None, f"the trunk of {c.name} has no checkpoint"
            job = Job("train", file, run_dir, resume=str(start), allow_change=True)
            before = _checkpoint_samples(start)
        else:
            job = Job("train", file, run_dir, resume="auto")
            before = self._samples(run_dir)
        code = self.executor.run(job)
        spent += max(0, self._samples(run_dir) - before)
        if code != 0:
            return self._failed(code, run_dir, spent)
        return self._measured(run_dir, spent, run_dir)

    def _measured(self, run_dir: Path, spent: int, measured: Path) -> tuple[float, dict[str, Any]]:
        summary = rundir.read_summary(run_dir) or {}
        value = summary.get("final_val_loss")
        if value is None:
            value = summary.get("final_loss")
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf
        return value, {"samples": spent, "run_dir": str(measured), "phase": "race"}

    def _failed(self, code: int, run_dir: Path, spent: int) -> tuple[float | None, dict[str, Any]]:
        if code == 2:  # a one-line error (diverged, out of memory): a result, not a crash
            return math.inf, {"samples": spent, "error": last_error(run_dir / "train.log") or "exit 2", "phase": "race"}
        return None, {"samples": spent}

    # ---- helpers --------------------------------------------------------------------------------

    def _trial_settings(self, s: Strategy) -> Strategy:
        keys: dict[str, Any] = {"observe.report": False}
        if s.checkpoint.every == 0 and s.checkpoint.every_minutes == 0:
            keys["checkpoint.every_minutes"] = 1.0  # a killed search loses at most a minute of a run
        return s.replace(keys)

    def _write(self, path: Path, s: Strategy) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = s.resolve().to_toml()
        if not path.is_file() or path.read_text() != text:
            rundir.write_atomic(path, text)
        return path

    @staticmethod
    def _samples(run_dir: Path) -> int:
        """Samples a run directory has trained (its newest checkpoint), 0 for none."""
        found = latest_checkpoint(run_dir)
        return _checkpoint_samples(found) if found is not None else 0

    # ---- the worker -------------------------------------------------------------------------------

    def next_unit(self) -> tuple[str, Any, Any] | None:
        """Claim the next unit: ("probe", key, trial) or ("rung", (candidate, r), trial); None to wait.

        Raises `Finished` when every rung is done.
        """
        keys = self.probe_keys()
        d = self.decisions()
        if d is None:
            ledger = self.probe_ledger
            with ledger.local:
                done = ledger.done(keys)
                todo = [k for k in keys if k not in done]
                ledger.fail_stale(todo)
                ledger.enqueue_missing([(k, {"probe": k}) for k in todo])
                trial = ledger.claim(todo)
            return ("probe", trial.user_attrs["unit"], trial) if trial is not None else None
        assert self.plan is not None
        ledger = self.race_ledger
        names = [c.name for c in self.plan.candidates]
        with ledger.local:
            for r in range(len(self.plan.rungs)):
                if r in self._finished_rungs:
                    continue
                running = self.survivors(r)
                if running is None:
                    return None
                wanted = {self.rung_key(r, c): c for c in running}
                done = ledger.done(list(wanted))
                todo = [k for k in wanted if k not in done]
                if not todo:
                    self._finished_rungs.add(r)
                    continue
                ledger.fail_stale(todo)
                ledger.enqueue_missing([(k, {"candidate": wanted[k].name, "rung": r}) for k in todo])
                trial = ledger.claim(todo)
                if trial is None:
                    return None
                c = wanted[trial.user_attrs["unit"]]
                trial.suggest_categorical("candidate", names)
                trial.suggest_int("rung", 0, len(self.plan.rungs) - 1)
                return "rung", (c, r), trial
        raise Finished

    def work(self) -> None:
        """One worker: claim, train, record, until the search is done."""
        while not self._errors:
            try:
                unit = self.next_unit()
            except Finished:
                return
            if unit is None:
                time.sleep(POLL * (0.5 + random.random()))
                continue
            kind, what, trial = unit
            ledger = self.probe_ledger if kind == "probe" else self.race_ledger
            key = trial.user_attrs["unit"]
            start = time.perf_counter()
            if ledger.attempts(key) >= MAX_ATTEMPTS:
                ledger.finish(trial, math.inf, {"error": f"crashed {MAX_ATTEMPTS} times; see its train.log", "samples": 0})
                continue
            label = key if kind == "probe" else f"rung {what[1]}: {what[0].name}"
            self.log(f"{label}: started")
            try:
                value, attrs = self.run_probe(key, trial) if kind == "probe" else self.run_rung(*what)
            except BaseException:
                ledger.finish(trial, None, {})
                raise
            attrs["seconds"] = time.perf_counter() - start
            ledger.finish(trial, value, attrs)
            if value is None:
                self.log(f"{label}: crashed; it will be retried")
            else:
                shown = f"{value:.4g}" if math.isfinite(value) else attrs.get("error", "failed")
                what = "suggested lr" if key.startswith("probe-lr") else "noise scale" if kind == "probe" else "val loss"
                self.log(f"{label}: {what} {shown}")

    def run(self, slots: int) -> None:
        """`slots` workers (threads of this process) until the search is done; an interrupt fails what this process ran."""
        try:
            if slots <= 1:
                self.work()
                return
            threads = [threading.Thread(target=self._thread, name=f"regimen-tune-{i}", daemon=True) for i in range(slots)]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
            if self._errors:
                raise self._errors[0]
        except BaseException:
            self.probe_ledger.fail_held()
            self.race_ledger.fail_held()
            stop_all = getattr(self.executor, "stop_all", None)
            if stop_all is not None:
                stop_all()
            raise

    def _thread(self) -> None:
        try:
            self.work()
        except BaseException as e:
            self._errors.append(e)


class Finished(Exception):
    """Every rung of the race is done."""


def _publish_once(path: Path, text: str) -> None:
    """Write a file whole, once: processes starting together race to link it into place, the first wins."""
    import contextlib
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _budget_keys(unit: str, amount: int) -> dict[str, Any]:
    keys: dict[str, Any] = {f"train.{u}": None for u in BUDGET_UNITS}
    keys[f"train.{unit}"] = int(amount)
    return keys


def trunk_strategy(s: Strategy, per_sample: int, world: int = 1, train_size: int | None = None) -> Strategy:
    """The trunk of a WSD strategy: the same at the peak LR (`constant`), trained to where `s`'s cooldown starts.

    The cooldown of a WSD run of total `T` (in `lr.unit`) starts at `D = (1 - decay_fraction) T`;
    the trunk's budget is `ceil(D)` in `lr.unit`, so its last step starts before `D` and every
    step it takes has the LR the WSD run would have had.

    >>> s = Strategy.from_dict({"model": {"name": "mlp"}, "data": {"source": "synthetic"}, "lr": {"schedule": "wsd"}})
    >>> s = s.replace({"train.steps": 100})
    >>> t = trunk_strategy(s, per_sample=1); t.lr.schedule, t.train.steps
    ('constant', 80)
    """
    from regimen.schedules.batch import build_batch_schedule, simulate_budget

    r = s.resolve()
    unit, amount = r.train.budget()
    if unit == "epochs":
        assert train_size is not None
        unit, amount = "samples", amount * train_size
    multiple = world * (r.batch.micro if isinstance(r.batch.micro, int) else 1)  # auto: chosen when the run starts
    schedule = build_batch_schedule(r.batch, seed=r.train.seed, multiple=multiple, dataset_size=train_size)
    total = simulate_budget(schedule, unit, amount, r.lr.unit, per_sample)  # type: ignore[arg-type]
    start = math.ceil((1 - r.lr.decay_fraction) * total - 1e-9)
    return s.replace({"lr.schedule": "constant", **_budget_keys(r.lr.unit, start)})


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (by step), without importing torch."""
    folder = run_dir / rundir.CHECKPOINTS_DIR
    found = sorted(p for p in folder.glob("step-*") if (p / "COMPLETE").is_file()) if folder.is_dir() else []
    return found[-1] if found else None


def _checkpoint_samples(path: Path) -> int:
    state = rundir.read_json(path / "train_state.json") or {}
    return int(((state.get("train") or {}).get("progress") or {}).get("samples", 0))
