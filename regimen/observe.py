"""What a run shows as it trains: the progress display, and the loggers that receive its rows.

Only rank 0 observes. The rows themselves are written to the run directory's `metrics.jsonl`
by `regimen.rundir.MetricsWriter`.

The loggers (TensorBoard, MLflow, Weights & Biases) are `Sink`s: each gets every row that
`metrics.jsonl` gets, at the same step, and an end-of-run call with the files worth keeping
(the report, the exported weights). `open_sinks` builds the ones a strategy's `[observe]` asks
for; each library is imported only there, and a missing one is a `UserError` naming its extra
(`check_loggers`, run before training starts).

Example:
    >>> import io
    >>> d = ProgressDisplay(10, "steps", mode="lines", stream=io.StringIO())
    >>> d.update(5, {"step": 5, "loss": 2.0, "lr": 1e-3, "batch_size": 8}); d.close()
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO

from regimen.errors import UserError

if TYPE_CHECKING:
    from regimen.strategy import ObserveConfig, Strategy


def _fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"


class ProgressDisplay:
    """A tqdm bar on a terminal, plain log lines otherwise (CI logs, pipes, files).

    `total` is the budget in its own unit (steps, samples or tokens); `update(done, info)`
    moves the bar to `done` and shows step, loss, lr, batch size and tokens/s.
    """

    def __init__(self, total: float, unit: str, mode: str = "auto", stream: TextIO | None = None, initial: float = 0.0) -> None:
        self.stream = stream or sys.stderr
        self.unit = unit
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.total = total
        self.start = time.perf_counter()
        self.initial = initial
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit=unit[:-1] if unit.endswith("s") else unit,
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, done: float, info: dict[str, Any]) -> None:
        done = min(done, self.total)  # the last step may pass a samples or tokens budget: show 100%
        text = f"loss {info['loss']:.4f}  lr {info['lr']:.2e}  bs {info['batch_size']}  {_fmt_rate(info.get('tokens_per_s', 0.0))} tok/s"
        if self.bar is not None:
            self.bar.set_description(f"step {info['step']}", refresh=False)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(done - self.bar.n)
        elif self.mode == "lines":
            elapsed = time.perf_counter() - self.start
            frac = (done - self.initial) / max(self.total - self.initial, 1e-9)
            eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
            print(f"step {info['step']:>6}  {text}  {100 * done / self.total:5.1f}%  eta {eta:5.0f}s", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.mode != "none":
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- loggers ---------------------------------------------------------------------------------

Status = Literal["finished", "failed", "killed"]


class Sink(Protocol):
    """A logger: every logged row in, then one end-of-run call.

    `write(row)` gets the rows `metrics.jsonl` gets (a dict with at least `step`); `close`
    is called once, with the files to keep (the exported weights, the report) when the run
    finished, or with none and `status` "failed" / "killed" when it raised or was interrupted.
    """

    def write(self, row: dict[str, Any]) -> None: ...

    def close(self, artifacts: Sequence[Path] = (), status: Status = "finished") -> None: ...


# `[observe]` key -> (the module it imports, the extra that installs it).
LOGGERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def loggers_on(observe: ObserveConfig) -> list[str]:
    """The `[observe]` logger keys that are true, e.g. `["mlflow"]`."""
    return [key for key in LOGGERS if getattr(observe, key)]


def check_loggers(observe: ObserveConfig) -> None:
    """A `UserError` for a logger that is on but not installed (found without importing it).

    Example:
        >>> from regimen.strategy import ObserveConfig
        >>> check_loggers(ObserveConfig())  # nothing on, nothing needed
    """
    for key in loggers_on(observe):
        module, extra = LOGGERS[key]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"observe.{key} = true needs the {module} package: pip install 'regimen[{extra}]'")


def open_sinks(strategy: Strategy, run_dir: Path) -> list[Sink]:
    """The loggers `strategy.observe` turns on, writing beside (or into) `run_dir`.

    A resumed run (a run directory whose `loggers.json` names its MLflow / W&B runs) logs into
    the same MLflow and W&B runs again.

    Example:
        >>> import tempfile
        >>> from regimen.strategy import Strategy
        >>> open_sinks(Strategy(), Path(tempfile.mkdtemp()))  # no logger on
        []
    """
    o = strategy.observe
    check_loggers(o)
    sinks: list[Sink] = []
    try:
        if o.tensorboard:
            sinks.append(TensorBoardLogger(run_dir / "tensorboard"))
        if o.mlflow:
            sinks.append(MLflowLogger(strategy, run_dir))
        if o.wandb:
            sinks.append(WandbLogger(strategy, run_dir))
    except BaseException:
        for sink in sinks:
            sink.close(status="failed")
        raise
    return sinks


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers (booleans and None left out), as floats, without `step`."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


LOGGER_IDS = "loggers.json"


def _logger_ids(run_dir: Path) -> dict[str, str]:
    """The MLflow / W&B run ids a run directory logged to (empty for a new run)."""
    path = run_dir / LOGGER_IDS
    try:
        ids = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _save_logger_id(run_dir: Path, key: str, run_id: str) -> None:
    """Record a logger's run id in `loggers.json` (a new file renamed into place)."""
    ids = _logger_ids(run_dir) | {key: run_id}
    tmp = run_dir / (LOGGER_IDS + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2) + "\n")
    os.replace(tmp, run_dir / LOGGER_IDS)


class TensorBoardLogger:
    """TensorBoard scalars under `RUN_DIR/tensorboard` (needs the `tensorboard` package)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, step)

    def close(self, artifacts: Sequence[Path] = (), status: Status = "finished") -> None:
        self.writer.close()


class MLflowLogger:
    """An MLflow run: the strategy's keys as parameters, the rows as metrics, the files as artifacts.

    `observe.mlflow_uri = ""` (the default) keeps a file store in `RUN_DIR/mlruns` (MLflow 3
    keeps that backend behind `MLFLOW_ALLOW_FILE_STORE`, which is set here unless the
    environment already says otherwise); any other value is a tracking URI (a server,
    `sqlite:///...`, `databricks`). Talks to MLflow through `MlflowClient` only, so a run the
    user has open with `mlflow.start_run()` is left alone. With the file store, artifacts are
    hard links into the store where the filesystem allows (no second copy of the weights).
    """

    def __init__(self, strategy: Strategy, run_dir: Path) -> None:
        o = strategy.observe
        self.local = not o.mlflow_uri
        if self.local:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=o.mlflow_uri or (run_dir / "mlruns").resolve().as_uri())
        known = _logger_ids(run_dir).get("mlflow")
        if known:
            self.run_id = known
            self.client.update_run(known, status="RUNNING")
            return
        experiment = self._experiment(o.mlflow_experiment)
        run = self.client.create_run(experiment, run_name=run_dir.name, tags={"regimen.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in strategy.flat().items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        _save_logger_id(run_dir, "mlflow", self.run_id)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:  # another run sharing the tracking server created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def write(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ms, step = int(time.time() * 1000), int(row["step"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in _scalars(row).items()])

    def close(self, artifacts: Sequence[Path] = (), status: Status = "finished") -> None:
        for path in artifacts:
            self._artifact(Path(path))
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[status])

    def _artifact(self, path: Path) -> None:
        uri = self.client.get_run(self.run_id).info.artifact_uri
        if self.local and uri.startswith("file:"):
            from urllib.parse import unquote, urlparse

            target = Path(unquote(urlparse(uri).path)) / path.name
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                tmp.unlink(missing_ok=True)
                os.link(path, tmp)
                os.replace(tmp, target)  # a resumed run's newer file replaces the older link
                return
            except OSError:
                pass  # another filesystem, or links not allowed: let MLflow copy it
        self.client.log_artifact(self.run_id, str(path))


class WandbLogger:
    """A Weights & Biases run, files under `RUN_DIR/wandb`.

    `observe.wandb_mode = "offline"` (the default) writes the run locally, to upload later
    with `wandb sync RUN_DIR/wandb/offline-run-*`; `"online"` streams it to the account
    `wandb login` set up. The strategy is the run's config; every row is logged with its
    `step` as the x-axis (`define_metric`), so the rows a resume redoes are kept, not
    dropped as W&B drops a step that goes back; the end-of-run files are one artifact of type
    `model`.
    """

    def __init__(self, strategy: Strategy, run_dir: Path) -> None:
        import wandb

        o = strategy.observe
        known = _logger_ids(run_dir).get("wandb")
        self.run_dir = run_dir
        self.run = wandb.init(
            project=o.wandb_project,
            name=run_dir.name,
            dir=str(run_dir),
            mode=o.wandb_mode,
            config=strategy.to_dict(),
            id=known,
            resume="allow" if known else None,
            reinit="create_new",  # a run of the user's own, open in this process, stays open
        )
        if not known:
            _save_logger_id(run_dir, "wandb", self.run.id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, row: dict[str, Any]) -> None:
        self.run.log({"step": int(row["step"]), **_scalars(row)})

    def close(self, artifacts: Sequence[Path] = (), status: Status = "finished") -> None:
        import wandb

        if artifacts:
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
            for path in artifacts:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status == "finished" else 1)
