"""`rg.fit` on any nn.Module: tensors, Datasets, iterables of batches, HF-style mappings."""

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import regimen as rg
from regimen.data import synthetic_classification
from regimen.errors import UserError


@pytest.fixture(scope="module")
def blobs():
    x, y = synthetic_classification(1200, 20, 4, seed=3)
    return (x[:1000], y[:1000]), (x[1000:], y[1000:])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def test_fit_tensors_learns_and_returns_keras_history(blobs):
    train, val = blobs
    h = rg.fit(
        _mlp(),
        train,
        loss="cross_entropy",
        optimizer="adam",
        lr=1e-2,
        epochs=3,
        batch_size=50,
        validation_data=val,
        metrics=["accuracy"],
        verbose=False,
    )
    assert len(h.history["loss"]) == 3 and len(h.history["val_accuracy"]) == 3
    assert h.history["val_accuracy"][-1] > 0.8
    assert h.history["loss"][-1] < h.history["loss"][0]
    assert h.rows[-1]["samples"] == 3000  # 3 epochs x 1000 samples, 20 steps of 50 per epoch


def test_fit_dataset_same_as_tensors(blobs):
    train, val = blobs
    a = rg.fit(_mlp(), train, loss="cross_entropy", epochs=1, batch_size=100, validation_data=val, verbose=False)
    b = rg.fit(
        _mlp(), TensorDataset(*train), loss="cross_entropy", epochs=1, batch_size=100, validation_data=TensorDataset(*val), verbose=False
    )
    assert a.history["loss"] == pytest.approx(b.history["loss"], rel=1e-6)
    assert a.history["val_loss"] == pytest.approx(b.history["val_loss"], rel=1e-6)


def test_fit_iterable_of_batches(blobs):
    train, _ = blobs
    loader = DataLoader(TensorDataset(*train), batch_size=100, shuffle=False)
    h = rg.fit(_mlp(), loader, loss="cross_entropy", lr=1e-2, epochs=2, verbose=False)
    assert h.rows[-1]["step"] == 20  # 10 batches per epoch, one step each
    assert h.history["loss"][-1] < h.history["loss"][0]


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class HFStyle(nn.Module):
    """Takes keyword arguments and returns an object with .loss, like transformers models."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.net(input_ids)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return Output(loss, logits)


def test_fit_mapping_batches_and_model_loss(blobs):
    (x, y), (xv, yv) = blobs
    h = rg.fit(
        HFStyle(),
        {"input_ids": x, "labels": y},
        epochs=2,
        batch_size=50,
        lr=1e-2,
        validation_data={"input_ids": xv, "labels": yv},
        metrics=["accuracy"],
        verbose=False,
    )
    assert h.history["val_accuracy"][-1] > 0.8


class DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def test_fit_dataset_of_mappings(blobs):
    (x, y), _ = blobs
    h = rg.fit(HFStyle(), DictDataset(x, y), epochs=1, batch_size=100, lr=1e-2, verbose=False)
    assert h.rows[-1]["step"] == 10


def test_fit_accepts_strategy_tables_and_overrides(blobs):
    train, val = blobs
    h = rg.fit(
        _mlp(),
        train,
        loss="cross_entropy",
        optimizer={"name": "sgd", "momentum": 0.9},
        lr={"schedule": "cosine", "warmup": 5},
        batch_size={"size": 40, "micro": 20},
        epochs=2,
        validation_data=val,
        overrides={"optimizer.lr": 0.05, "train.clip": 1.0},
        verbose=False,
    )
    assert h.rows[-1]["samples"] == 2000
    assert h.history["lr"][-1] < 0.05  # cosine decayed


def test_fit_errors_are_user_errors(blobs):
    train, _ = blobs
    with pytest.raises(UserError, match="loss = 'hinge'"):
        rg.fit(_mlp(), train, loss="hinge", verbose=False)
    with pytest.raises(UserError, match="different lengths"):
        rg.fit(_mlp(), (train[0], train[1][:10]), loss="cross_entropy", verbose=False)
    with pytest.raises(UserError, match=r"no \.loss"):
        rg.fit(_mlp(), train, verbose=False)


# ---- tokens, overrides, callbacks, early stop -------------------------------------------------


class TinyLM(nn.Module):
    """Token ids (n, T) -> logits (n, T, V); with `labels`, an object with `.loss` (HF style)."""

    def __init__(self, vocab: int = 16, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output | torch.Tensor:
        logits = self.head(self.embed(input_ids))
        if labels is None:
            return logits
        return Output(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)), logits)


def _token_data(n: int = 64, T: int = 12, vocab: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    return {"input_ids": ids, "labels": ids.roll(-1, dims=1)}


def test_fit_counts_the_tokens_of_input_ids_and_integer_x():
    data = _token_data(n=64, T=12)
    h = rg.fit(TinyLM(), data, epochs=2, batch_size=16, overrides={"train.log_every": 1}, verbose=False)
    assert [r["tokens"] for r in h.rows] == [r["samples"] * 12 for r in h.rows]
    assert h.rows[-1]["tokens"] == 2 * 64 * 12 and h.summary["tokens"] == 2 * 64 * 12
    # (x, y) with integer x of shape (n, T): the same count, through a loss function.
    h2 = rg.fit(TinyLM(), (data["input_ids"], data["labels"]), loss="cross_entropy", epochs=1, batch_size=16, verbose=False)
    assert h2.rows[-1]["tokens"] == 64 * 12
    # Float features are not tokens; tokens_per_sample= says what a sample holds.
    x, y = torch.randn(40, 5), torch.randn(40)
    assert rg.fit(nn.Linear(5, 1), (x, y), loss="mse", batch_size=10, verbose=False).rows[-1]["tokens"] == 40
    h3 = rg.fit(nn.Linear(5, 1), (x, y), loss="mse", batch_size=10, tokens_per_sample=7, verbose=False)
    assert h3.rows[-1]["tokens"] == 40 * 7


def test_token_budget_and_lr_in_tokens_follow_the_real_count():
    """A token budget stops after budget / (B x T) steps; an LR decaying over tokens reaches its end there."""
    data = _token_data(n=64, T=12)
    h = rg.fit(
        TinyLM(),
        data,
        lr={"schedule": "linear", "unit": "tokens", "min_lr": 0.0},
        batch_size=8,
        overrides={"train.tokens": 8 * 12 * 10, "train.log_every": 1, "optimizer.lr": 0.1},
        verbose=False,
    )
    assert len(h.rows) == 10 and h.rows[-1]["tokens"] == 960
    # Linear decay over the 960-token budget: step k (k = 1..10) trained with lr 0.1 x (1 - 96 (k - 1) / 960).
    assert h.history["lr"] == pytest.approx([0.1 * (1 - (k - 1) / 10) for k in range(1, 11)])


def test_an_explicit_override_wins_over_the_epoch_rhythm(blobs):
    train, val = blobs
    h = rg.fit(
        _mlp(), train, loss="cross_entropy", epochs=1, batch_size=100, validation_data=val, overrides={"train.log_every": 1}, verbose=False
    )
    assert [r["step"] for r in h.rows] == list(range(1, 11))  # every step logged
    assert [r["step"] for r in h.rows if "val_loss" in r] == [10]  # evaluation still once per epoch
    h = rg.fit(
        _mlp(), train, loss="cross_entropy", epochs=1, batch_size=100, validation_data=val, overrides={"train.eval_every": 5}, verbose=False
    )
    assert [r["step"] for r in h.rows if "val_loss" in r] == [5, 10]
    assert [r["step"] for r in h.rows] == [5, 10]  # logged once per epoch and at each evaluation


def test_callbacks_get_every_row_written_to_metrics_jsonl(blobs, tmp_path):
    from regimen.rundir import read_metrics

    train, val = blobs
    seen: list[dict] = []
    h = rg.fit(
        _mlp(),
        train,
        loss="cross_entropy",
        epochs=2,
        batch_size=100,
        validation_data=val,
        callbacks=[seen.append],
        overrides={"train.log_every": 3},
        run_dir=tmp_path / "run",
        verbose=False,
    )
    assert seen == h.rows == read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in seen] == [3, 6, 9, 10, 12, 15, 18, 20]


def _early_stop_oracle(values: list[float], patience: int, min_delta: float) -> tuple[int, int]:
    """(index of the evaluation at which Keras's EarlyStopping in mode min stops, or -1; index of its best)."""
    best, best_at, wait = float("inf"), -1, 0
    for i, v in enumerate(values):
        if v < best - min_delta:
            best, best_at, wait = v, i, 0
        else:
            wait += 1
            if wait >= max(patience, 1):
                return i, best_at
    return -1, best_at


def _values(rows: list[dict]) -> list[dict]:
    """The rows without their clock readings (time, throughput, memory)."""
    clock = {"time", "eval_time", "tokens_per_s", "peak_memory_mb"}
    return [{k: v for k, v in r.items() if k not in clock} for r in rows]


def _run_blobs(blobs, callbacks=(), run_dir=None, epochs=12):
    train, val = blobs
    return rg.fit(
        _mlp(),
        train,
        loss="cross_entropy",
        optimizer="adam",
        lr=1e-2,
        epochs=epochs,
        batch_size=100,
        validation_data=val,
        metrics=["accuracy"],
        callbacks=list(callbacks),
        run_dir=run_dir,
        verbose=False,
    )


def test_early_stopping_ends_the_run_at_the_evaluation_keras_would(blobs, tmp_path):
    full = _run_blobs(blobs)
    vals = full.history["val_loss"]
    patience, min_delta = 2, 0.02  # improvements smaller than 0.02 count as none: the plateau stops it
    stop_at, _ = _early_stop_oracle(vals, patience, min_delta)
    assert 0 < stop_at < len(vals) - 1, vals  # the oracle stops inside the run: the test can fail
    stopper = rg.EarlyStopping(monitor="val_loss", patience=patience, min_delta=min_delta, mode="min")
    run = tmp_path / "run"
    h = _run_blobs(blobs, [stopper], run_dir=run)
    step = full.rows[stop_at]["step"]
    assert h.rows[-1]["step"] == step == stopper.stopped_step
    assert _values(h.rows) == _values(full.rows[: stop_at + 1])  # the same run up to there, bit for bit
    # The run ended like a finished one: summary, final checkpoint, export.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"]["step"] == step and summary["steps"] == step
    assert "val_loss did not improve" in summary["stopped_early"]["reason"]
    assert (run / "model.safetensors").is_file() and any((run / "checkpoints").iterdir())


def test_early_stopping_max_mode_and_restore_best_weights(blobs):
    full = _run_blobs(blobs)
    accs = full.history["val_accuracy"]
    stop_at, best_at = _early_stop_oracle([-a for a in accs], 1, 0.01)  # max mode is min mode of the negation
    assert 0 < stop_at < len(accs) - 1 and best_at < stop_at, accs
    stopper = rg.EarlyStopping(monitor="val_accuracy", patience=1, min_delta=0.01, mode="max", restore_best_weights=True)
    h = _run_blobs(blobs, [stopper])
    assert len(h.history["val_accuracy"]) == stop_at + 1
    assert stopper.best == accs[best_at]
    # The best evaluation's weights are back in the model: its validation loss is that evaluation's.
    _, (xv, yv) = blobs
    with torch.no_grad():
        restored = nn.functional.cross_entropy(h.model(xv), yv).item()
    assert restored == pytest.approx(full.history["val_loss"][best_at], rel=1e-5)
    assert restored != pytest.approx(full.history["val_loss"][stop_at], rel=1e-5)
