"""`regimen compare`: run several strategies on the same model, data and seed, then report.

A comparison is a base strategy (a TOML file and `section.key=value` overrides, or the
built-in default) and a list of runs, each a few dotted keys set over the base:

- `--vary section.key=v1,v2` (repeatable): the cartesian product of the value lists. Values are
  TOML (`3e-4`, `true`, `[0.9, 0.95]`) or bare strings, split on commas outside brackets.
- `[[strategies]]` in the TOML file: one table per run, with an optional `name` and the keys it
  sets, as dotted keys (`optimizer.name = "sgd"`) or nested tables. The rest of the file is the
  base. With `--vary` as well, every strategy is crossed with the grid.
- Neither, and no CONFIG: the classic comparison (`CLASSIC`, below), with any overrides applied to
  its base (`regimen compare train.epochs=5`).

Each run trains in `OUT/<name>/` (a run directory of `regimen train`), its strategy written
beside it as `OUT/strategies/<name>.toml` (so `regimen train OUT/strategies/<name>.toml`
reproduces it). A name is made from the values that differ between runs
(`optimizer.name=sgd, lr.schedule=cosine` -> `sgd-cosine`; numbers keep their key: `lr0.1`).

Decisions:
- Derived keys are derived once, from the base, and held in every run: `lr.scale_with_batch`
  (`auto` -> linear for SGD-like optimizers, sqrt for adaptive ones) and `lr.reference_batch`
  (the base's batch size). Otherwise varying `optimizer.name` would also change the scaling rule,
  and varying `batch.size` would move the reference batch with it, so a run would differ from the
  base in keys nobody varied; this way the per-run diff in the report is exactly the varied keys.
  A note is printed when a run's own `auto` would have chosen differently; set or vary the key to
  choose otherwise.
- Checkpoints: when the base sets no cadence, `checkpoint.every_minutes = 1`, so a killed run
  loses at most a minute and short runs are not slowed by saves.
- Re-running the same command skips finished runs (`summary.json` says finished and
  `strategy.toml` matches the plan), resumes the others from their newest checkpoint
  (`--resume auto`), and skips runs that failed (a diverged run fails the same way again; delete
  its directory to retry). A run directory holding a different strategy is an error: nothing is
  overwritten. Without `--out`, the newest `compare/*` made by the same plan is continued, else a
  new `compare/<time>` is made.
- Every run is its own `python -m regimen train OUT/strategies/<name>.toml --run-dir OUT/<name>
  --resume auto` process, so a run's peak memory, its crash or its out-of-memory kill stay its
  own, and a run is exactly what `regimen train` does. Its output goes to `OUT/<name>/train.log`
  (and to the terminal when runs go one at a time, the default).
- `--jobs N`: N runs at once, with OMP_NUM_THREADS = max(1, cores // N) in each, so the runs
  share the cores instead of fighting over them. Where and how a run trains is the executor's
  (`regimen.executors`, shared with `regimen tune`): local processes, torchrun (`--nproc N`),
  this process (`--executor inline`), or Slurm jobs through submitit (`--executor slurm`).

Example:
    >>> plan = make_plan(None, ["model.name=mlp", "data.source=synthetic"], ["optimizer.name=sgd,adam", "lr.schedule=constant,cosine"])
    >>> [run.name for run in plan.runs]
    ['sgd-constant', 'sgd-cosine', 'adam-constant', 'adam-cosine']
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from regimen.errors import UserError
from regimen.executors import LOG_FILE, Executor, Job, child_env, make_executor, run_jobs, usable_cores
from regimen.rundir import METRICS_FILE, SUMMARY_FILE, write_summary
from regimen.strategy import DEFAULT_TASK, Strategy, apply_overrides, flatten, parse_value, read_toml

# The classic comparison (`regimen compare` with no arguments). The task is the built-in MLP on
# the synthetic 10-class Gaussian mixture (10,800 training samples): small enough for full-batch
# gradient descent to take real steps on a CPU (one GD step on the stdlib corpus would be 31M
# bytes), and hard enough (two clusters per class) that the optimizers separate. Every run sees
# the same 20 epochs of samples (equal compute per sample); GD therefore takes 20 steps and the
# batch-32 runs 6,750. LRs: each optimizer's usual value, checked with `regimen lr-find` on this
# task (about a tenth of the LR at the loss minimum). No clipping and no LR scaling with the
# batch: the textbook algorithms, each at the LR written here. Cost: about 150 CPU-seconds in
# all, 1.5 minutes on 2 idle cores with the default one run per core.
CLASSIC = """
[model]
name = "mlp"
hidden = [128]

[data]
source = "synthetic"

[lr]
scale_with_batch = "none"
min_lr = 0.0
power = 2.0                  # polynomial: lr_0 (1 - t/T)^2

[batch]
size = 32

[train]
epochs = 20
eval_every = 250
eval_samples = 0             # the whole validation set (1,200 samples)
log_every = 25
clip = 0.0

[observe]
report = false               # the comparison's report has every run

# Each optimizer with its best-known schedule ...
[[strategies]]
name = "gd"
optimizer = { name = "gd", lr = 2.0 }
lr.schedule = "constant"
batch.schedule = "full"      # full-batch gradient descent: the whole training set per step
train = { eval_every = 2, log_every = 1 }   # it takes only 20 steps

[[strategies]]
name = "momentum-cosine"
optimizer = { name = "momentum", lr = 0.03 }
lr.schedule = "cosine"

[[strategies]]
name = "adagrad-constant"    # AdaGrad decays its own steps: sqrt of the summed squared gradients
optimizer = { name = "adagrad", lr = 0.03 }
lr.schedule = "constant"

[[strategies]]
name = "rmsprop-constant"
optimizer = { name = "rmsprop", lr = 1e-3 }
lr.schedule = "constant"

[[strategies]]
name = "adam-cosine"
optimizer = { name = "adam", lr = 3e-3 }
lr.schedule = "cosine"

# ... and the schedules and the batch size on plain SGD, where they matter most.
[[strategies]]
name = "sgd-constant"
optimizer = { name = "sgd", lr = 0.1 }
lr.schedule = "constant"

[[strategies]]
name = "sgd-polynomial"
optimizer = { name = "sgd", lr = 0.1 }
lr.schedule = "polynomial"

[[strategies]]
name = "sgd-cosine"
optimizer = { name = "sgd", lr = 0.1 }
lr.schedule = "cosine"

[[strategies]]
name = "sgd-cosine-random-batch"
optimizer = { name = "sgd", lr = 0.1 }
lr.schedule = "cosine"
batch = { schedule = "random", min = 8, max = 56 }   # uniform in [8, 56] per step: 32 on average
"""

STRATEGIES_DIR = "strategies"
MANIFEST = "compare.json"
DEFAULT_ROOT = Path("compare")

Status = Literal["new", "resume", "finished", "failed"]


@dataclass
class PlannedRun:
    """One run of a comparison: its name, the keys it sets over the base, its full strategy."""

    name: str
    overrides: dict[str, Any]
    strategy: Strategy

    @property
    def resolved(self) -> Strategy:
        return self.strategy.resolve()


@dataclass
class Plan:
    """The base strategy and the runs of a comparison."""

    base: Strategy
    runs: list[PlannedRun]
    notes: list[str] = field(default_factory=list)
    classic: bool = False

    def fingerprint(self) -> str:
        """A hash of every run's name and resolved strategy: the same plan, the same hash."""
        text = json.dumps([[r.name, r.resolved.to_dict()] for r in self.runs], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def report_base(self) -> dict[str, Any]:
        """The flat base the report diffs runs against.

        The resolved base, except on keys where every run has the same value (a derived key no
        run varies, such as `train.steps` when every run sets another budget): those are not a
        difference between strategies, so the diff shows exactly the keys the runs set.
        """
        from regimen.ranking import MISSING, same_value

        base = self.base.resolve().flat()
        flats = [r.resolved.flat() for r in self.runs]
        varied = {k for r in self.runs for k in r.overrides}
        for key in dict.fromkeys([*base, *(k for f in flats for k in f)]):
            if key in varied:
                continue
            values = [f.get(key, MISSING) for f in flats]
            if all(same_value(v, values[0]) for v in values):
                if values[0] is MISSING:
                    base.pop(key, None)
                else:
                    base[key] = values[0]
        return base


# --------------------------------------------------------------------------------------------
# Planning: base, --vary, [[strategies]], names
# --------------------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """Split a --vary value list on commas outside brackets, braces and quotes.

    >>> split_values("sgd,adam"), split_values("[0.9, 0.95],[0.8,0.9]"), split_values('"a,b",c')
    (['sgd', 'adam'], ['[0.9, 0.95]', '[0.8,0.9]'], ['"a,b"', 'c'])
    """
    parts: list[str] = []
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_vary(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """`["optimizer.name=sgd,adam"]` -> `[("optimizer.name", ["sgd", "adam"])]`; checks the syntax only.

    >>> parse_vary(["optimizer.lr=1e-3,3e-3", "optimizer.nesterov=true,false"])
    [('optimizer.lr', [0.001, 0.003]), ('optimizer.nesterov', [True, False])]
    """
    out: list[tuple[str, list[Any]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not text.strip():
            raise UserError(f"--vary {item!r}: expected section.key=v1,v2,... (e.g. optimizer.name=sgd,adam)")
        if len(key.split(".")) != 2 or not all(key.split(".")):
            raise UserError(f"--vary {item!r}: the key must be section.key, e.g. optimizer.lr")
        if any(key == k for k, _ in out):
            raise UserError(f"--vary {key}: given twice; put all its values in one --vary {key}=v1,v2")
        texts = split_values(text)
        if any(not t for t in texts):
            raise UserError(f"--vary {item!r}: an empty value (two commas in a row, or one at the end)")
        values = [parse_value(t) for t in texts]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise UserError(f"--vary {item!r}: a value is repeated")
        out.append((key, values))
    return out


def read_entries(raw: Any, where: str) -> list[tuple[str | None, dict[str, Any]]]:
    """The `[[strategies]]` of a file as (name or None, dotted keys)."""
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise UserError(f"{where}: `strategies` must be an array of tables ([[strategies]])")
    entries: list[tuple[str | None, dict[str, Any]]] = []
    names: set[str] = set()
    for i, table in enumerate(raw):
        table = dict(table)
        name = table.pop("name", None)
        if name is not None and (not isinstance(name, str) or not sanitize(name)):
            raise UserError(f"{where}: strategies[{i}].name = {name!r}: expected a non-empty string")
        if name is not None:
            name = sanitize(name)
            if name in names:
                raise UserError(f"{where}: two [[strategies]] are named {name!r}; names must be unique")
            names.add(name)
        keys = flatten(table)
        for key in keys:
            if len(key.split(".")) != 2:
                raise UserError(f"{where}: strategies[{i}] key {key!r}: expected section.key (or a [section] table)")
        entries.append((name, keys))
    return entries


def make_plan(config: str | Path | None, overrides: Sequence[str], vary: Sequence[str]) -> Plan:
    """Build and validate every run of a comparison (nothing trains; a mistake is a `UserError`).

    Example:
        >>> plan = make_plan(None, ["model.name=mlp", "data.source=synthetic"], ["optimizer.lr=0.1,0.01"])
        >>> [(r.name, r.overrides) for r in plan.runs]
        [('lr0.1', {'optimizer.lr': 0.1}), ('lr0.01', {'optimizer.lr': 0.01})]
    """
    grid = parse_vary(vary)
    classic = config is None and not grid
    where = "the classic comparison" if classic else (str(config) if config is not None else "the default task")
    tree: dict[str, Any] = tomllib.loads(CLASSIC) if classic else read_toml(config if config is not None else DEFAULT_TASK)
    entries = read_entries(tree.pop("strategies"), where) if "strategies" in tree else []
    if not entries and not grid:
        raise UserError(f"compare: nothing to compare in {where}: give --vary section.key=v1,v2 or [[strategies]] tables in the file")
    apply_overrides(tree, overrides)
    base = Strategy.from_dict(tree)
    held = _hold_derived(tree, base)
    if base.checkpoint.every == 0 and base.checkpoint.every_minutes == 0:
        tree.setdefault("checkpoint", {})["every_minutes"] = 1.0  # something to resume from
    base = Strategy.from_dict(tree)

    points = list(itertools.product(*[[(key, v) for v in values] for key, values in grid])) or [()]
    combos: list[tuple[str | None, dict[str, Any], list[str]]] = []
    for name, keys in entries or [(None, {})]:
        for point in points:
            for key, _ in point:
                if key in keys:
                    raise UserError(f"compare: {key} is set by [[strategies]] {name or ''} and by --vary; set it in one place")
            combos.append((name, {**keys, **dict(point)}, [k for k, _ in point]))
    names = run_names(combos)
    runs = []
    for name, (_, keys, _) in zip(names, combos):
        try:
            strategy = base.replace(keys)
        except UserError as e:
            raise UserError(f"compare: run {name!r} ({_describe(keys)}): {e}") from None
        runs.append(PlannedRun(name, keys, strategy))
    return Plan(base, runs, _derived_notes(tree, runs, held), classic)


def _hold_derived(tree: dict[str, Any], base: Strategy) -> list[str]:
    """Write the base's derived values into the base tree, so every run holds the same ones."""
    resolved = base.resolve()
    lr = tree.setdefault("lr", {})
    held = []
    if base.lr.scale_with_batch == "auto":
        lr["scale_with_batch"] = resolved.lr.scale_with_batch
        held.append("lr.scale_with_batch")
    if base.lr.reference_batch is None:
        lr["reference_batch"] = resolved.lr.reference_batch
        held.append("lr.reference_batch")
    return held


def _derived_notes(tree: dict[str, Any], runs: list[PlannedRun], held: list[str]) -> list[str]:
    """A note for each held derived key that a run's own `auto` would have set differently."""
    notes = []
    for key in held:
        section, name = key.split(".")
        value = tree.get(section, {}).get(name)
        differ = []
        for run in runs:
            if key in run.overrides:
                continue
            own = run.strategy.replace({key: "auto" if name == "scale_with_batch" else None}).resolve()
            if getattr(getattr(own, section), name) != value:
                differ.append(run.name)
        if differ:
            shown = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
            notes.append(
                f"{key} = {value!r}, derived from the base, is held in every run ({shown} alone would derive another value; "
                f"it matters only when the batch size differs from lr.reference_batch); set it or --vary it to choose"
            )
    return notes


def _describe(keys: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in keys.items()) or "the base"


def _text(value: Any) -> str:
    from regimen.strategy import _toml_value

    return value if isinstance(value, str) else _toml_value(value)


def sanitize(text: str) -> str:
    """A safe directory name: letters, digits and `._+-`; anything else becomes `_`.

    >>> sanitize("sgd/cosine lr=0.1"), sanitize("..hidden")
    ('sgd_cosine_lr_0.1', 'hidden')
    """
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text)
    return text.strip("._-")[:80]


def component(key: str, value: Any) -> str:
    """The piece of a run name for one varied value.

    >>> component("optimizer.name", "sgd"), component("optimizer.lr", 0.1), component("optimizer.nesterov", False)
    ('sgd', 'lr0.1', 'no-nesterov')
    """
    leaf = key.split(".")[-1]
    if isinstance(value, bool):
        return leaf if value else f"no-{leaf}"
    if isinstance(value, str):
        return sanitize(value)
    if isinstance(value, float):
        return f"{leaf}{value:g}"
    if isinstance(value, (list, tuple)):
        return sanitize(f"{leaf}{'_'.join(_text(v) for v in value)}")
    return sanitize(f"{leaf}{_text(value)}")


def run_names(combos: Sequence[tuple[str | None, Mapping[str, Any], Sequence[str]]]) -> list[str]:
    """Readable, unique names, from (strategy name or None, the keys a run sets, its --vary keys).

    A named strategy keeps its name and adds its --vary values; an unnamed run is named by its
    values that differ between runs. Repeats get `-2`, `-3`, ...

    >>> run_names([(None, {"optimizer.name": "sgd", "train.seed": 1}, []), (None, {"optimizer.name": "adam", "train.seed": 1}, [])])
    ['sgd', 'adam']
    >>> fast = {"optimizer.lr": 0.1}
    >>> run_names([("fast", {**fast, "train.seed": 1}, ["train.seed"]), ("fast", {**fast, "train.seed": 2}, ["train.seed"])])
    ['fast-seed1', 'fast-seed2']
    """
    keys: list[str] = []
    for _, values, _ in combos:
        keys += [k for k in values if k not in keys]

    def differs(key: str) -> bool:
        return len({json.dumps(v.get(key, "<unset>"), default=str, sort_keys=True) for _, v, _ in combos}) > 1

    varied = [k for k in keys if differs(k)]
    names = []
    for name, values, grid_keys in combos:
        own = [k for k in varied if k in values and (not name or k in grid_keys)]
        if len(combos) == 1 and not name:
            own = list(values)
        parts = ([name] if name else []) + [component(k, values[k]) for k in own]
        names.append("-".join(p for p in parts if p) or "base")
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        n = n if n != STRATEGIES_DIR else f"{n}-run"  # the folder of the strategy files
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return unique


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_status(run: PlannedRun, run_dir: Path) -> Status:
    """What to do with a run directory: train it (`new`), `resume` it, or skip it (`finished`, `failed`).

    A directory that holds another strategy is a `UserError`: nothing is overwritten.
    """
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    saved = run_dir / "strategy.toml"
    if saved.is_file():
        have, want = read_toml(saved), tomllib.loads(run.resolved.to_toml())
        if have != want:
            from regimen.strategy import same_value

            a, b = flatten(have), flatten(want)
            key = next((k for k in {**b, **a} if not same_value(a.get(k), b.get(k))), "?")
            raise UserError(
                f"compare: {str(run_dir)!r} holds a different strategy ({key} = {a.get(key)!r}, the plan has {b.get(key)!r}); "
                "use another --out, or delete that directory to train it again"
            )
    summary = _read_json(run_dir / "summary.json")
    status = summary.get("status") if summary else None
    if status == "finished":
        return "finished"
    if status == "failed" and saved.is_file():  # failed before it started: the cause may be fixed, retry
        return "failed"
    return "resume"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mark_failed(run_dir: Path, error: str) -> None:
    """Record a run that stopped with an error (diverged, say) so the report and re-runs know."""
    write_summary(run_dir, {"status": "failed", "error": error})


@dataclass
class Outcome:
    """How a run ended in this invocation."""

    name: str
    state: str  # finished | failed | skipped | crashed
    seconds: float = 0.0
    detail: str = ""


def train_runs(todo: Sequence[tuple[Path, Path, Status]], executor: Executor, announce: Callable[[str, str], None]) -> list[Outcome]:
    """Train (or resume) runs through `executor`, `executor.slots` at once; each run's output goes to its `train.log`."""
    outcomes: list[Outcome] = []
    resume = {run_dir: status == "resume" for _, run_dir, status in todo}
    parallel = executor.slots > 1 and len(todo) > 1

    def started(job: Job) -> None:
        if parallel:
            threads = child_env(executor.slots)["OMP_NUM_THREADS"]
            announce(job.out.name, f"started ({threads} thread(s); log {job.log})")
        else:
            announce(job.out.name, "resuming" if resume[job.out] else "training")

    def ended(job: Job, code: int, seconds: float) -> None:
        outcome = _child_outcome(job.out, code, seconds)
        outcomes.append(outcome)
        announce(job.out.name, _outcome_text(outcome, job.out))

    jobs = [Job("train", plan_file, run_dir, resume="auto") for plan_file, run_dir, _ in todo]
    run_jobs(executor, jobs, started, ended)
    return outcomes


def _child_outcome(run_dir: Path, code: int, seconds: float) -> Outcome:
    if code == 0:
        return Outcome(run_dir.name, "finished", seconds)
    if code == 2:  # a UserError: one line, "regimen: error: ..."
        lines = (run_dir / LOG_FILE).read_text(errors="replace").splitlines()
        error = next((ln.split("error: ", 1)[1] for ln in reversed(lines) if ln.startswith("regimen: error: ")), "exit code 2")
        mark_failed(run_dir, error)
        return Outcome(run_dir.name, "failed", seconds, error)
    return Outcome(run_dir.name, "crashed", seconds, f"exit code {code}; see {run_dir / LOG_FILE}; re-run to resume it")


def _outcome_text(outcome: Outcome, run_dir: Path) -> str:
    if outcome.state == "finished":
        summary = _read_json(run_dir / "summary.json") or {}
        best = summary.get("best_val_loss")
        loss = f", best val loss {best:.4f}" if isinstance(best, (int, float)) else ""
        return f"finished in {outcome.seconds:.1f} s{loss}"
    return f"{outcome.state} after {outcome.seconds:.1f} s: {outcome.detail}"


def default_out(plan: Plan) -> Path:
    """The newest `compare/*` made by the same plan (to continue it), else `compare/<time>`."""
    fingerprint = plan.fingerprint()
    if DEFAULT_ROOT.is_dir():
        made = sorted((p for p in DEFAULT_ROOT.glob(f"*/{MANIFEST}")), key=lambda p: p.stat().st_mtime, reverse=True)
        for manifest in made:
            data = _read_json(manifest)
            if data and data.get("fingerprint") == fingerprint:
                return manifest.parent
    out = DEFAULT_ROOT / time.strftime("%Y%m%d-%H%M%S")
    while out.exists():
        out = out.with_name(out.name + "-1")
    return out


def write_plan(plan: Plan, out: Path) -> dict[str, Path]:
    """Write each run's strategy to `OUT/strategies/<name>.toml` and the manifest; return the files."""
    folder = out / STRATEGIES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for run in plan.runs:
        path = folder / f"{run.name}.toml"
        text = run.resolved.to_toml()
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        files[run.name] = path
    manifest = {
        "fingerprint": plan.fingerprint(),
        "classic": plan.classic,
        "base": plan.base.to_dict(),
        "runs": [{"name": r.name, "overrides": r.overrides} for r in plan.runs],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return files


def run_compare(
    plan: Plan, out: Path, jobs: int = 1, target_loss: float | None = None, executor: Executor | None = None
) -> tuple[Path, list[Outcome]]:
    """Train every run of `plan` that is not done yet, then write the report; returns its path.

    Example:
        >>> plan = make_plan(None, ["model.name=mlp", "data.source=synthetic", "train.steps=4"], ["optimizer.name=sgd,adam"])
        >>> report, _ = run_compare(plan, Path("compare/demo"))            # doctest: +SKIP
    """
    from regimen import report

    statuses = {run.name: run_status(run, out / run.name) for run in plan.runs}  # refuses before anything trains
    files = write_plan(plan, out)
    n = len(plan.runs)
    index = {run.name: i for i, run in enumerate(plan.runs, 1)}

    def announce(name: str, text: str) -> None:
        print(f"regimen compare: [{index[name]}/{n}] {name}: {text}", file=sys.stderr, flush=True)

    outcomes: list[Outcome] = []
    todo = []
    for run in plan.runs:
        status = statuses[run.name]
        if status in ("finished", "failed"):
            note = "finished before: skipped" if status == "finished" else "failed before: skipped (delete its directory to retry)"
            announce(run.name, note)
            outcomes.append(Outcome(run.name, "skipped", detail=status))
        else:
            todo.append((files[run.name], out / run.name, status))
    if executor is None:
        executor = make_executor("local", slots=max(1, min(jobs, len(todo))), tee=True)
    outcomes += train_runs(todo, executor, announce)

    run_dirs = [out / run.name for run in plan.runs if _has_run(out / run.name)]
    if not run_dirs:
        raise UserError(f"compare: no run produced metrics (see the logs under {str(out)!r})")
    path = report.write_report(run_dirs, out, base=plan.report_base(), target_loss=target_loss)
    return path, outcomes


def _has_run(run_dir: Path) -> bool:
    """Whether a run left anything to report: metrics, or the summary of a run that failed before its first step."""
    return (run_dir / METRICS_FILE).is_file() or (run_dir / SUMMARY_FILE).is_file()


def format_ranking(run_dirs: Sequence[Path]) -> str:
    """A few lines: the runs best first, with best validation (or final training) loss and time."""
    from regimen.ranking import rank_runs, ranked_on
    from regimen.rundir import load_run

    runs = [load_run(d) for d in run_dirs]
    width = max(len(r.name) for r in runs)
    lines = []
    for i, run in enumerate(rank_runs(runs), 1):
        on = ranked_on(run)
        what = f"{'best val' if on[0] == 'val' else 'final train'} loss {on[1]:.4f}" if on else "no loss"
        seconds = f"{run.wall_time:7.1f} s" if run.wall_time is not None else ""
        status = run.status if run.status != "finished" else ""
        if run.status == "failed":
            status += f": {(run.summary or {}).get('error', '')}"
        lines.append(f"  {i:>2}. {run.name:<{width}}  {what}  {seconds}  {status}".rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`regimen compare`: plan, check, train what is left, report; prints where the report is."""
    config, overrides = args.config, args.overrides
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs = {args.jobs}: must be >= 1")
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc = {args.nproc}: must be >= 1")
    if args.target_loss is not None and not math.isfinite(args.target_loss):
        raise UserError(f"--target-loss = {args.target_loss}: must be a finite number")
    plan = make_plan(config, overrides, args.vary)
    # The classic runs are tiny MLPs that one core saturates: one run per core by default.
    jobs = args.jobs if args.jobs is not None else (min(usable_cores(), len(plan.runs)) if plan.classic else 1)
    out = Path(args.out) if args.out else default_out(plan)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a directory")
    if not args.dry_run:
        for run in plan.runs:
            run_status(run, out / run.name)  # a directory of another plan fails here, before any output
    for note in plan.notes:
        print(f"regimen compare: note: {note}", file=sys.stderr)
    if args.dry_run:
        width = max(len(r.name) for r in plan.runs)
        print(f"regimen compare: {len(plan.runs)} runs into {out}/ ({'classic comparison, ' if plan.classic else ''}jobs {jobs})")
        for run in plan.runs:
            print(f"  {run.name:<{width}}  {_describe(run.overrides)}")
        return 0
    what = "the classic comparison" if plan.classic else "a comparison"
    print(f"regimen compare: {what}, {len(plan.runs)} runs into {out}/ (jobs {jobs})", file=sys.stderr)
    start = time.perf_counter()
    slots = max(1, min(jobs, len(plan.runs)))
    executor = make_executor(args.executor, slots=slots, nproc=args.nproc or 1, folder=out / "slurm", slurm=args.slurm, tee=True)
    path, outcomes = run_compare(plan, out, jobs, args.target_loss, executor)
    dirs = [out / r.name for r in plan.runs if _has_run(out / r.name)]
    trained = sum(o.state != "skipped" for o in outcomes)
    print(f"regimen compare: {len(plan.runs)} runs ({trained} trained now) in {time.perf_counter() - start:.0f} s, best first:")
    print(format_ranking(dirs))
    print(f"report: {path}")
    crashed = [o for o in outcomes if o.state == "crashed"]
    failed = [o for o in outcomes if o.state == "failed" or (o.state == "skipped" and o.detail == "failed")]
    for outcome in failed:
        error = (_read_json(out / outcome.name / SUMMARY_FILE) or {}).get("error", outcome.detail)
        print(f"regimen compare: run {outcome.name} failed: {error}", file=sys.stderr)
    if crashed:
        print(
            f"regimen compare: {len(crashed)} run(s) stopped early ({', '.join(o.name for o in crashed)}); re-run to resume them",
            file=sys.stderr,
        )
    return 1 if crashed or failed else 0
