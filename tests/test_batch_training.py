"""Batch-size schedules through the real Trainer: LR, budgets, accumulation, adaptive batch, plots.

The unit tests of the schedules themselves live in test_batch_schedules.py; here every claim is
checked on what the trainer actually did (its history rows, i.e. what metrics.jsonl holds).

A row's `lr` is the LR of the step that row ends, so it was computed at the progress *before*
that step: `samples - batch_size` samples. Every LR comparison below is made at that point.

The task is least squares on a small noisy linear problem (fast, and its gradient noise is
real: labels carry noise of standard deviation SIGMA), run in float64 on one thread so that
equal arithmetic gives equal numbers.
"""

from __future__ import annotations

import copy
import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

from regimen.checkpoint import list_checkpoints
from regimen.data import TaskData, TensorSamples
from regimen.noise import NoiseScaleEstimator
from regimen.progress import Progress, Unit
from regimen.rundir import read_metrics
from regimen.schedules import AdaptiveBatch, build_lr_schedule, lr_batch_scale
from regimen.strategy import Strategy
from regimen.task import Task, mse
from regimen.trainer import RunResult, Trainer
from tests.conftest import TINY_GPT, run_cli

N_SAMPLES = 200
FEATURES = 8
SIGMA = 1.0


pytestmark = pytest.mark.usefixtures("float64_one_thread")


def _regression(n: int = N_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x w* + SIGMA * noise: per-example gradients have a known, non-vanishing spread."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.randn(FEATURES, 1, generator=g)
    return x, x @ w + SIGMA * torch.randn(n, 1, generator=g)


def _model() -> nn.Module:
    # Zero weights: the run starts far from the optimum (small noise scale) and approaches it
    # (growing noise scale), the trajectory an adaptive batch is meant to follow.
    model = nn.Linear(FEATURES, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def _task(model: nn.Module | None = None, tokens_per_sample: int = 1, n: int = N_SAMPLES) -> Task:
    x, y = _regression(n)
    return Task(model or _model(), TaskData(TensorSamples((x, y)), None, tokens_per_sample=tokens_per_sample), loss=mse)


def _strategy(**sections: dict[str, Any]) -> Strategy:
    """A strategy for the regression task; `sections` replace or extend the defaults per table."""
    tree: dict[str, dict[str, Any]] = {
        "optimizer": {"name": "sgd", "lr": 0.05},
        "lr": {"schedule": "constant"},
        "batch": {"size": 8},
        "train": {"steps": 10, "clip": 0.0, "log_every": 1, "eval_every": 10_000, "seed": 3, "device": "cpu"},
        "observe": {"progress": "none"},
    }
    for name, table in sections.items():
        tree[name] = {**tree.get(name, {}), **table}
    return Strategy.from_dict(tree)


def _fit(strategy: Strategy, task: Task | None = None, run_dir: Path | None = None) -> tuple[Trainer, RunResult]:
    trainer = Trainer(strategy, task or _task(), run_dir)
    return trainer, trainer.fit()


Rule = Literal["none", "linear", "sqrt"]


def _lr_by_samples(history: list[dict[str, Any]], divide_scale: tuple[Rule, int] | None = None) -> dict[int, float]:
    """{samples before the step: the step's LR}, optionally without the batch-size factor."""
    out = {}
    for row in history:
        lr = row["lr"]
        if divide_scale is not None:
            lr /= lr_batch_scale(divide_scale[0], row["batch_size"], divide_scale[1])
        out[row["samples"] - row["batch_size"]] = lr
    return out


# ---- the LR is a function of samples, whatever the batch schedule ----------------------------

BATCHES = {
    # micro = 8 makes every batch a multiple of 8, so every ramp / random step starts at a
    # sample count where the fixed run also starts a step: each of their LRs has a twin.
    "fixed": {"schedule": "fixed", "size": 8, "micro": 8},
    "ramp": {"schedule": "ramp", "start": 8, "size": 32, "span": 200, "unit": "samples", "micro": 8},
    "random": {"schedule": "random", "min": 8, "max": 32, "micro": 8},
}
PEAK, WARMUP, BUDGET = 0.05, 64, 400  # PEAK is _strategy's optimizer.lr


def _lr_run(batch: dict[str, Any], unit: str, scale: Rule, schedule: str = "cosine") -> list[dict[str, Any]]:
    lr = {"schedule": schedule, "unit": unit, "warmup": WARMUP if unit == "samples" else WARMUP // 8, "min_lr": 0.005}
    s = _strategy(batch=batch, lr={**lr, "scale_with_batch": scale, "reference_batch": 8}, train={"samples": BUDGET, "steps": None})
    return _fit(s)[1].history


@pytest.mark.parametrize("scale", ["none", "sqrt"])
def test_lr_at_a_sample_count_is_the_same_under_fixed_ramp_and_random(scale: Rule) -> None:
    runs = {name: _lr_run(batch, "samples", scale) for name, batch in BATCHES.items()}
    # The batch sizes really differ (else the test proves nothing).
    assert {r["batch_size"] for r in runs["fixed"]} == {8}
    assert len({r["batch_size"] for r in runs["ramp"]}) > 2
    assert len({r["batch_size"] for r in runs["random"]}) > 2
    curves = {name: _lr_by_samples(rows, (scale, 8)) for name, rows in runs.items()}
    # The schedule the runs should all follow, evaluated directly in samples.
    cfg = Strategy.from_dict({"lr": {"schedule": "cosine", "unit": "samples", "warmup": WARMUP, "min_lr": 0.005}}).lr
    expected = build_lr_schedule(cfg, PEAK, BUDGET)
    for name in ("ramp", "random"):
        for samples, lr in curves[name].items():
            assert samples in curves["fixed"], f"{name}: a step starts at {samples} samples, which the fixed run skips"
            assert lr == pytest.approx(curves["fixed"][samples], rel=1e-12), f"{name} at {samples} samples"
    for name, curve in curves.items():
        for samples, lr in curve.items():
            assert lr == pytest.approx(expected(samples), rel=1e-12), f"{name} at {samples} samples"
    # With a batch-size rule the raw logged LR is the schedule times sqrt(B / 8): it differs.
    if scale == "sqrt":
        big = [r for r in runs["ramp"] if r["batch_size"] == 32]
        assert big and all(r["lr"] == pytest.approx(2 * expected(r["samples"] - 32), rel=1e-12) for r in big)


def _peak_reached_at(curve: dict[int, float]) -> int:
    """Samples seen when the first step at the peak LR starts."""
    return min(samples for samples, lr in curve.items() if lr == pytest.approx(PEAK, rel=1e-12))


def _warmup_curve(unit: str, batch: dict[str, Any]) -> dict[int, float]:
    return _lr_by_samples(_lr_run(batch, unit, "none", schedule="constant"))


def test_warmup_in_samples_ends_at_the_same_sample_count_whatever_the_batch() -> None:
    for name, batch in BATCHES.items():
        curve = _warmup_curve("samples", batch)
        for samples, lr in curve.items():
            want = PEAK * min(samples / WARMUP, 1.0)
            assert lr == pytest.approx(want, rel=1e-12), f"{name}: LR {lr} at {samples} samples, want {want}"
        # The peak comes at the first step that starts at >= WARMUP samples, in every run.
        first = _peak_reached_at(curve)
        assert first == min(s for s in curve if s >= WARMUP), name
        assert WARMUP <= first < WARMUP + 32, name
    # Control: the same warmup counted in steps (8 steps = 64 samples at batch 8) ends later in
    # samples under the ramp and the random batch, whose steps are bigger.
    assert _peak_reached_at(_warmup_curve("steps", BATCHES["fixed"])) == WARMUP
    assert _peak_reached_at(_warmup_curve("steps", BATCHES["ramp"])) > WARMUP
    assert _peak_reached_at(_warmup_curve("steps", BATCHES["random"])) > WARMUP + 32


def test_lr_counted_in_steps_moves_with_the_batch() -> None:
    # The control: the same schedule counted in steps gives different LRs at the same sample count.
    fixed = _lr_by_samples(_lr_run(BATCHES["fixed"], "steps", "none"))
    ramp = _lr_by_samples(_lr_run(BATCHES["ramp"], "steps", "none"))
    differ = [s for s in ramp if s in fixed and not math.isclose(ramp[s], fixed[s], rel_tol=1e-6)]
    assert len(differ) > len(ramp) // 2


# ---- gradient accumulation is exact for every step of a random schedule ----------------------

CHOICES = [4, 8, 12, 20]  # multiples of 4: micro in {1, 2, 4} rounds none of them, so B_t agree
ACC_STEPS = 8


def _counted_fit(optimizer: str, micro: int | None, model: nn.Module) -> tuple[list[torch.Tensor], list[dict[str, Any]], int]:
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(count)
    lr = {"sgd": 0.05, "adam": 0.01}[optimizer]
    s = _strategy(
        optimizer={"name": optimizer, "lr": lr},
        batch={"schedule": "random", "choices": CHOICES, "micro": micro},
        # Adam scales its LR with sqrt(B_t / 8): the split must not change that either.
        lr={"schedule": "cosine", "unit": "samples", "reference_batch": 8},
        train={"steps": ACC_STEPS},
    )
    _, result = _fit(s, _task(model, n=50))  # 50 samples: the run crosses epoch boundaries
    return [p.detach().clone() for p in model.parameters()], result.history, calls[0]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_random_batch_accumulation_equivalence_at_every_step(optimizer: str) -> None:
    initial = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))
    runs = {micro: _counted_fit(optimizer, micro, copy.deepcopy(initial)) for micro in (None, 4, 2, 1)}
    ref_params, ref_rows, _ = runs[None]
    sizes = [r["batch_size"] for r in ref_rows]
    assert len(sizes) == ACC_STEPS and len(set(sizes)) > 2, sizes
    for micro, (params, rows, calls) in runs.items():
        assert [r["batch_size"] for r in rows] == sizes, f"micro={micro}: the drawn batch sizes differ"
        # The split really happened: one forward per micro-batch.
        assert calls == sum(math.ceil(b / (micro or b)) for b in sizes), f"micro={micro}"
        for step, (row, ref) in enumerate(zip(rows, ref_rows), start=1):
            assert row["lr"] == pytest.approx(ref["lr"], rel=1e-12), f"micro={micro}, step {step}"
            # The loss goes through float32 (the trainer's one host read): relative 1e-6.
            assert row["loss"] == pytest.approx(ref["loss"], rel=1e-6), f"micro={micro}, step {step}"
            assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6), f"micro={micro}, step {step}"
        for i, (a, b) in enumerate(zip(params, ref_params)):
            err = (a - b).abs().max().item()
            assert err < 1e-6, f"{optimizer}, micro={micro}: parameter {i} differs by {err:.3g}"
    moved = max((a - b).abs().max().item() for a, b in zip(ref_params, initial.parameters()))
    assert moved > 1e-3


# ---- budgets end where they should --------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "amount"),
    [("steps", 9), ("samples", 150), ("tokens", 600), ("epochs", 1.5)],
)
@pytest.mark.parametrize("schedule", ["fixed", "ramp", "random"])
def test_budget_ends_at_the_first_step_boundary_past_it(unit: str, amount: float, schedule: str) -> None:
    batch = {**BATCHES[schedule], "micro": None}
    s = _strategy(batch=batch, train={"steps": None, unit: amount})
    _, result = _fit(s, _task(tokens_per_sample=4))  # 4 "tokens" per sample
    p = result.progress
    last = result.history[-1]["batch_size"]
    before = Progress(p.step - 1, p.samples - last, p.tokens - 4 * last)
    target_unit: Unit = "samples" if unit == "epochs" else unit  # type: ignore[assignment]
    target = amount * N_SAMPLES if unit == "epochs" else amount
    assert p.value(target_unit) >= target, f"stopped short: {p}"
    assert before.value(target_unit) < target, f"one step too many: {p}"
    assert p.tokens == 4 * p.samples
    # The last row is the last step (the final step always logs and evaluates).
    assert (result.history[-1]["step"], result.history[-1]["samples"]) == (p.step, p.samples)


@pytest.mark.parametrize("schedule", ["ramp", "random"])
def test_lr_in_samples_with_a_budget_in_steps_decays_exactly_to_the_end(schedule: str) -> None:
    # The trainer converts a budget of 12 steps into samples by running the batch schedule;
    # a linear decay to 0 must then reach 0 exactly where the run stops, not before or after.
    lr = {"schedule": "linear", "unit": "samples", "scale_with_batch": "none"}
    s = _strategy(batch={**BATCHES[schedule], "micro": None}, lr=lr, train={"steps": 12})
    trainer, result = _fit(s)
    assert result.progress.step == 12
    assert trainer.lr_schedule(float(result.progress.samples)) == 0.0
    assert all(r["lr"] > 0 for r in result.history)
    # The last step starts B_last samples before the end: PEAK * B_last / total.
    assert result.history[-1]["lr"] == pytest.approx(PEAK * result.history[-1]["batch_size"] / result.progress.samples, rel=1e-9)


# ---- the adaptive batch through the trainer ------------------------------------------------

ADAPTIVE = {"schedule": "adaptive", "size": 8, "min": 8, "max": 32, "every": 5, "max_growth": 2.0}


def _adaptive(micro: int | None, steps: int = 60, **train: Any) -> Strategy:
    return _strategy(
        optimizer={"name": "sgd", "lr": 0.1},
        lr={"schedule": "constant", "scale_with_batch": "none"},
        batch={**ADAPTIVE, "micro": micro},
        train={"steps": steps, **train},
        observe={"noise_ema": 0.9},
    )


def test_adaptive_batch_follows_the_logged_noise_scale(tmp_path: Path) -> None:
    trainer, result = _fit(_adaptive(micro=4), _task(n=512), tmp_path)
    rows = result.history
    assert rows == read_metrics(tmp_path / "metrics.jsonl")  # what was returned is what was written
    assert len(rows) == 60
    for key in ("batch_size", "lr", "samples", "tokens", "noise_scale"):
        assert key in rows[-1], key
    noisy = [r for r in rows if "noise_scale" in r]
    assert len(noisy) > len(rows) // 2, "the noise scale is logged whenever it is defined"
    # Replay the documented rule from the logged noise scales: the trainer must have used exactly
    # those batch sizes (observe is fed the noise scale after each step, which the row records).
    replay = AdaptiveBatch(8, min=8, max=32, every=5, max_growth=2.0, multiple=4)
    for row in rows:
        assert row["batch_size"] == replay(Progress(step=row["step"] - 1)), f"step {row['step']}"
        replay.observe(Progress(step=row["step"]), row.get("noise_scale"))
    sizes = [r["batch_size"] for r in rows]
    assert all(8 <= b <= 32 and b % 4 == 0 for b in sizes), sizes
    changes = [i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]]
    assert changes, "the batch never moved"
    last_change_step = 0
    for i in changes:
        # rows[i] is step i + 1; its batch was set by observe at step i (rows[i - 1]).
        assert i - last_change_step >= 5, f"changed at step {i} only {i - last_change_step} steps after the last change"
        assert 0.5 <= sizes[i] / sizes[i - 1] <= 2.0, f"step {i + 1}: {sizes[i - 1]} -> {sizes[i]}"
        noise = rows[i - 1]["noise_scale"]
        # It moves towards the noise scale: up when it exceeds the batch, down when below.
        assert (sizes[i] > sizes[i - 1]) == (noise > sizes[i - 1]), f"step {i + 1}: B {sizes[i - 1]} -> {sizes[i]}, B_noise {noise:.1f}"
        last_change_step = i
    assert max(sizes) == 32, "the noise scale of this problem exceeds 32 near the optimum: the batch should reach max"
    assert trainer.batch_schedule.state_dict()["size"] == replay.size
    # The plot of the run shows batch size and noise scale.
    from regimen.figures import plot_style, single_figures
    from regimen.rundir import load_run

    with plot_style():
        files = [f.file for f in single_figures(load_run(tmp_path), tmp_path, include_progress=False)]
    assert "batch.png" in files and (tmp_path / "batch.png").stat().st_size > 0


def test_adaptive_state_round_trips_through_training_state() -> None:
    trainer, _ = _fit(_adaptive(micro=4, steps=30), _task(n=512))
    state = json.loads(json.dumps(trainer.training_state()))  # plain JSON, as the checkpoint writes it
    fresh = Trainer(_adaptive(micro=4, steps=30), _task(n=512))
    assert fresh.batch_schedule.state_dict() != state["batch_schedule"], "the run should have moved the batch"
    fresh.load_training_state(state)
    assert fresh.progress == trainer.progress
    assert fresh.batch_schedule.state_dict() == trainer.batch_schedule.state_dict()
    assert fresh.batch_schedule(fresh.progress) == trainer.batch_schedule(trainer.progress)
    assert fresh.noise is not None and trainer.noise is not None
    assert fresh.noise.state_dict() == trainer.noise.state_dict()
    assert fresh.noise.noise_scale == trainer.noise.noise_scale


@pytest.mark.parametrize("micro", [4, None], ids=["first-micro-batch", "consecutive-steps"])
def test_adaptive_run_resumed_from_a_checkpoint_continues_identically(tmp_path: Path, micro: int | None) -> None:
    # micro = None on one process pairs consecutive steps: the kept gradient is state too.
    whole, result = _fit(_adaptive(micro, steps=40), _task(n=512))
    first = _adaptive(micro, steps=40).replace({"checkpoint.every": 20})
    _fit(first, _task(n=512), tmp_path / "part")
    step20 = [c for c in list_checkpoints(tmp_path / "part") if c.name.endswith("00000020")]
    assert step20, list_checkpoints(tmp_path / "part")
    resumed = Trainer(first, _task(n=512))
    resumed.checkpointer.load(step20[0])
    assert resumed.progress.step == 20
    rest = resumed.fit().history
    tail = [r for r in result.history if r["step"] > 20]
    assert [r["batch_size"] for r in rest] == [r["batch_size"] for r in tail]
    assert len({r["batch_size"] for r in result.history}) > 1, "the batch should move in this run"
    for row, want in zip(rest, tail):
        assert row.get("noise_scale") == pytest.approx(want.get("noise_scale"), rel=1e-9), f"step {row['step']}"
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)


def test_consecutive_pair_spans_two_consecutive_steps_only() -> None:
    # B_t in {4, 8} with micro = 4: steps of 8 measure with their first micro-batch, steps of 4
    # pair with the previous step's gradient. A pair must never reach back past a step of 8.
    s = _strategy(batch={"schedule": "random", "choices": [4, 8], "micro": 4}, observe={"noise_scale": True}, train={"steps": 16})
    trainer = Trainer(s, _task())
    assert trainer.consecutive is not None
    calls: list[tuple[int, bool]] = []  # (step whose gradient was kept, whether a pair came back)
    inner = trainer.consecutive.pair

    def pair(params: Any, batch: float, **kwargs: Any) -> Any:
        result = inner(params, batch, **kwargs)
        calls.append((trainer.progress.step, result is not None))
        return result

    trainer.consecutive.pair = pair  # type: ignore[method-assign]
    sizes = [r["batch_size"] for r in trainer.fit().history]
    assert {4, 8} <= set(sizes) and any(a == 8 and b == 4 for a, b in pairwise(sizes)), sizes
    for (before, _), (step, paired) in pairwise(calls):
        assert not paired or step == before + 1, f"the gradient of step {step + 1} was paired with that of step {before + 1}"


def test_noise_scale_with_clipping_equals_that_of_copied_unclipped_gradients() -> None:
    # One process, one micro-batch: the trainer keeps the last gradient by reference, takes |g|^2
    # from the guard's norm and clips the kept gradient in place afterwards. The estimate must be
    # the one an oracle computes in float64 from copies of the unclipped gradients.
    s = _strategy(observe={"noise_scale": True, "noise_ema": 0.8}, train={"steps": 12, "clip": 0.05})
    trainer = Trainer(s, _task())
    assert trainer.consecutive is not None
    seen: list[tuple[float, list[torch.Tensor]]] = []
    inner = trainer.consecutive.pair

    def pair(params: Any, batch: float, **kwargs: Any) -> Any:
        params = list(params)
        seen.append((float(batch), [p.grad.detach().double().clone() for p in params if p.grad is not None]))
        return inner(params, batch, **kwargs)

    trainer.consecutive.pair = pair  # type: ignore[method-assign]
    history = trainer.fit().history
    assert sum(r["grad_norm"] > 0.05 for r in history) >= len(history) // 2, "most steps should clip"

    def sq(gs: list[torch.Tensor]) -> float:
        return sum(g.square().sum().item() for g in gs)

    oracle, want = NoiseScaleEstimator(ema=0.8), []
    for (b0, g0), (b1, g1) in pairwise(seen):
        mean = [(b0 * x + b1 * y) / (b0 + b1) for x, y in zip(g0, g1)]
        oracle.update((sq(g0) + sq(g1)) / 2, 2 / (1 / b0 + 1 / b1), sq(mean), b0 + b1)
        want.append(oracle.noise_scale)
    got = [r.get("noise_scale") for r in history[1:]]
    # float32 norms of ~100 numbers (relative error ~1e-6) against float64; the difference small -
    # big that tr(S) is made of can cancel up to ~100x here, hence 1e-3.
    assert got == pytest.approx(want, rel=1e-3)


# ---- end to end: the built-in GPT, a ramp in tokens, the noise scale, the plot --------------


@pytest.mark.slow
def test_cli_gpt_ramp_in_tokens_logs_and_plots_batch_and_noise(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train",
        *TINY_GPT,
        "batch.schedule=ramp",
        "batch.unit=tokens",
        "batch.stages=[{until = 512, size = 4}]",  # 4 x 16 = 64 tokens a step until 512 tokens, then 8
        "lr.unit=tokens",
        "lr.warmup=256",
        "train.tokens=1500",
        "train.log_every=1",
        "observe.noise_scale=true",
        "observe.progress=none",
        "--run-dir",
        str(run_dir),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    last = rows[-1]
    # 8 steps of 4 x 16 tokens reach 512; then steps of 8 x 16 = 128 until >= 1500: 8 more.
    assert (last["step"], last["samples"], last["tokens"]) == (16, 96, 1536)
    for key in ("batch_size", "lr", "samples", "tokens", "noise_scale", "loss", "time"):
        assert key in last, key
    assert {r["batch_size"] for r in rows} == {4, 8}
    assert "val_loss" in last
    assert (run_dir / "batch.png").stat().st_size > 0
    assert 'scale_with_batch = "sqrt"' in (run_dir / "strategy.toml").read_text()
