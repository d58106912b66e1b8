"""`rg.fit` on any nn.Module: tensors, Datasets, iterables of batches, HF-style mappings."""

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
