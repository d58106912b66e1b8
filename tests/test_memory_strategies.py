"""Activation checkpointing, CPU offload and `batch.micro = "auto"` change memory, never training.

Exactness. Checkpointing recomputes each checkpointed block's forward in the backward pass: the
same kernels on the same inputs (the RNG state is replayed, so dropout draws the same mask), so
the recomputed activations, and from them the gradients, are the very same floats as the ones
a plain run keeps; selective checkpointing keeps some of them instead, which changes nothing
either. CPU offload moves FSDP2's shards between memories without touching their values. So the
losses and gradient norms must agree to a few float32 ulps: 1e-6 relative (measured: equal
bit for bit on CPU). A dropped RNG replay (a different dropout mask in the recomputation) or a
recomputation from the wrong input moves them by 1e-3 or more from the first step on.

A parity test that passes because nothing was recomputed would prove nothing, so the 1-process
tests also count the blocks' training forwards (two per micro-batch when checkpointed) and
measure that the activations kept at the peak shrink.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import regimen as rg
from regimen import parallel
from regimen.errors import UserError
from regimen.models import GPT, GPTConfig
from regimen.rundir import read_metrics
from regimen.strategy import Strategy
from regimen.task import build_task
from regimen.trace import Recorder, fake_copy
from regimen.trainer import Trainer
from tests.conftest import TINY_GPT, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-6
STEPS = 6
# Two blocks (so a block's recomputation feeds another's backward) and dropout (so the replayed RNG matters).
BASE = [*TINY_GPT, "model.n_layer=2", "model.dropout=0.1", "optimizer.name=adamw", "optimizer.lr=3e-3", "lr.schedule=constant"]
BASE += [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=1000", "train.device=cpu", "observe.progress=none"]


def _train(corpus: Path, *extra: str) -> tuple[list[dict], int, Trainer]:
    """Train in this process; (logged rows, blocks' training forwards, the trainer)."""
    s = Strategy.load(None, [*BASE, f"data.source=text:{corpus}", *extra])
    task = build_task(s.resolve())
    calls = [0]
    for block in task.model.blocks:  # type: ignore[union-attr]
        block.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + m.training))
    trainer = Trainer(s, task)
    result = trainer.fit()
    return result.history, calls[0], trainer


def _assert_same(rows: list[dict], ref: list[dict], rtol: float = RTOL) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for r, w in zip(rows, ref):
        for key in ("loss", "grad_norm"):
            assert r[key] == pytest.approx(w[key], rel=rtol), f"step {r['step']}: {key} {r[key]} vs {w[key]}"


@pytest.fixture(scope="module")
def plain(corpus: Path) -> tuple[list[dict], int, Trainer]:
    return _train(corpus)


@pytest.mark.parametrize("policy", ["block", "selective"])
def test_checkpointing_trains_exactly_like_the_plain_run(policy: str, corpus: Path, plain: tuple[list[dict], int, Trainer]) -> None:
    rows, calls, trainer = _train(corpus, f"parallel.activation_checkpointing={policy}")
    ref_rows, ref_calls, _ = plain
    _assert_same(rows, ref_rows)
    assert ref_calls == STEPS * 2  # 2 blocks, one forward each per step
    assert calls == 2 * ref_calls, "every checkpointed block runs its forward again in the backward pass"
    wrapped = [type(b).__name__ for b in trainer.model.blocks]  # type: ignore[union-attr]
    assert wrapped == ["CheckpointWrapper", "CheckpointWrapper"]


def _activation_peak(policy: str) -> int:
    """Bytes of activations (and backward temporaries) at the peak of one real step of a GPT."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context=32, n_layer=3, n_head=2, d_model=32))
    parallel.checkpoint_activations(model, policy)
    x = torch.randint(0, 64, (8, 32))
    recorder = Recorder()
    recorder.hold(model.parameters(), "params")
    with recorder:
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    return recorder.peak["activations"] + recorder.peak["grads"]


def test_checkpointing_keeps_fewer_activations() -> None:
    none, block, selective = (_activation_peak(p) for p in ("none", "block", "selective"))
    assert block < selective < none


def test_user_modules_by_class_name_or_predicate(corpus: Path) -> None:
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.ReLU()), nn.Linear(16, 3))

    args = {"loss": "cross_entropy", "optimizer": "adam", "epochs": 3, "batch_size": 16, "verbose": False}
    ref = rg.fit(model(), (x, y), **args).history["loss"]
    named = rg.fit(
        model(), (x, y), **args, overrides={"parallel.activation_checkpointing": "block", "parallel.checkpoint_modules": ["Sequential"]}
    )
    assert named.history["loss"] == pytest.approx(ref, rel=RTOL)
    # Only the outer Sequential matches at the top level; modules inside a checkpointed one are left alone.
    assert type(named.model[0]).__name__ == "CheckpointWrapper"  # type: ignore[index]
    assert parallel.checkpoint_activations(model(), "selective", lambda m: isinstance(m, nn.Linear)) == ["0.0", "1"]


def test_checkpointing_a_model_without_blocks_names_the_key() -> None:
    with pytest.raises(UserError, match=r"no `blocks`; name the modules .* parallel.checkpoint_modules"):
        parallel.checkpoint_activations(nn.Sequential(nn.Linear(2, 2)), "block")
    with pytest.raises(UserError, match=r"no module of the model matches the classes \['Block'\]"):
        parallel.checkpoint_activations(nn.Sequential(nn.Linear(2, 2)), "block", ["Block"])


def test_offload_on_one_process_warns_and_trains(corpus: Path, plain: tuple[list[dict], int, Trainer]) -> None:
    with pytest.warns(UserWarning, match="cpu_offload is ignored: one process"):
        rows, _, _ = _train(corpus, "parallel.mode=fsdp", "parallel.cpu_offload=true")
    _assert_same(rows, plain[0])


# ---- batch.micro = "auto" ------------------------------------------------------------------------


def test_auto_micro_resumes_with_the_value_chosen_at_the_start(corpus: Path, tmp_path: Path) -> None:
    """A resume keeps the saved micro-batch even when the memory now would not allow it.

    The resumed attempt says 0.01 GiB: planning again would fail (the fresh run below proves
    it), so a resume that exits 0 with the same micro-batch and the same weights read it back.
    """
    args = [*BASE, f"data.source=text:{corpus}", "checkpoint.every=3", "observe.report=false", "batch.size=16", "batch.micro=auto"]
    run = tmp_path / "run"
    first = run_cli("train", *args, "parallel.memory_gib=64", "--run-dir", str(run))
    assert first.returncode == 0, first.stderr
    assert "batch.micro = auto: 16 of a rank's 16 samples per step" in first.stderr
    weights = load_file(str(run / "model.safetensors"))
    rows = read_metrics(run / "metrics.jsonl")
    assert "micro = 16" in (run / "strategy.toml").read_text()
    # Back to step 3, as if the run had been killed after its first checkpoint.
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    resumed = run_cli("train", *args, "parallel.memory_gib=0.01", "--run-dir", str(run), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "batch.micro = auto: 16, as chosen when this run started" in resumed.stderr
    assert "micro = 16" in (run / "strategy.toml").read_text()
    resumed_weights = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(resumed_weights[k], w) for k, w in weights.items()), "the resumed run ends where the first did"
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl")] == [r["loss"] for r in rows]
    fresh = run_cli("train", *args, "parallel.memory_gib=0.01", "--run-dir", str(tmp_path / "fresh"))
    assert fresh.returncode == 2
    assert fresh.stderr.strip().count("\n") == 0, fresh.stderr
    assert "batch.micro = 'auto': even a micro-batch of 1 needs about" in fresh.stderr


def test_auto_micro_is_the_largest_that_fits(corpus: Path) -> None:
    """With memory for exactly the footprint of micro 4, auto picks 4 (divisors of 16: ..., 4, 8, 16)."""
    from regimen import estimate
    from regimen.micro import plan_micro

    s = Strategy.load(None, [*BASE, f"data.source=text:{corpus}", "batch.size=16", "batch.micro=auto"]).resolve()
    task = build_task(s)
    runtime = estimate.Runtime(0.0, 0.0, "")
    trace = estimate.trace_policy(lambda m: fake_copy(task.model, m), task, s, "none", [8, 16])
    sizes = {m: estimate.footprint(trace, estimate.Layout("none", 1, "none", False, m), 16, runtime, True).peak for m in (4, 8)}
    assert sizes[4] < sizes[8]
    memory = sizes[4] / (1 - estimate.AUTO_HEADROOM)
    choice, share = plan_micro(s, task, "none", 1, memory * 1.0001, runtime, torch.device("cpu"))
    assert (choice.micro, share) == (4, 16)
    with pytest.raises(UserError, match=r"batch.micro = 'big': expected an integer, 'auto', or none"):
        Strategy.load(None, ["batch.micro=big"])


# ---- 2 processes, FSDP2 ----------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_checkpointing_offload_and_auto_micro_train_exactly(tmp_path: Path, corpus: Path) -> None:
    """2 FSDP2 ranks: plain; block checkpointing + CPU offload; selective + micro auto: the same run."""
    from tests.test_distributed import SMALL, assert_same_training, run_job

    base = [*SMALL, f"data.source=text:{corpus}", "parallel.mode=fsdp", "model.dropout=0.1", "--nproc", "2"]
    plain = run_job(base, tmp_path / "plain").ok()
    offload = run_job([*base, "parallel.activation_checkpointing=block", "parallel.cpu_offload=true"], tmp_path / "offload").ok()
    auto = run_job(
        [*base, "parallel.activation_checkpointing=selective", "batch.micro=auto", "parallel.memory_gib=64"], tmp_path / "auto"
    ).ok()
    assert "batch.micro = auto: 8 of a rank's 8 samples per step" in auto.output
    assert_same_training(offload, plain, rtol=RTOL)
    assert_same_training(auto, plain, rtol=RTOL)
