"""`rg.fit` refuses wrong arguments with one `rg.UserError` naming the argument, before training or writing anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import regimen as rg


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)


def _refused(tmp_path: Path, data: Any, match: str, model: nn.Module | None = None, **kwargs: Any) -> str:
    """fit raises rg.UserError (a ValueError) matching `match`; the model and the disk are untouched."""
    model = model if model is not None else _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_dir = tmp_path / "run"
    kwargs = {"loss": "cross_entropy", "batch_size": 8, "verbose": False} | kwargs
    with pytest.raises(rg.UserError, match=match) as info:
        rg.fit(model, data, run_dir=run_dir, **kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained
    assert not run_dir.exists()  # nothing written
    return message


def test_x_and_y_of_different_lengths(tmp_path):
    x, y = _data()
    _refused(tmp_path, (x, y[:30]), r"^data: x and y have different lengths \(40 and 30\)")
    _refused(tmp_path, (x, y), r"^validation_data: x and y have different lengths \(10 and 9\)", validation_data=(x[:10], y[:9]))
    _refused(tmp_path, {"input_ids": x, "labels": y[:3]}, r"^data: input_ids and labels have different lengths", loss=None)


def test_an_empty_dataset(tmp_path):
    x, y = _data()
    _refused(tmp_path, (x[:0], y[:0]), r"^data is empty \(0 samples\)")
    _refused(tmp_path, (x, y), r"^validation_data is empty", validation_data=(x[:0], y[:0]))
    _refused(tmp_path, [], r"^data: the iterable of batches is empty")


def test_an_lr_that_is_not_a_number(tmp_path):
    _refused(tmp_path, _data(), r"^lr = 'fast': expected a positive number", lr="fast")
    _refused(tmp_path, _data(), r"^lr = -0.1: expected a positive number", lr=-0.1)
    _refused(tmp_path, _data(), r"^batch_size = '32': expected a positive integer", batch_size="32")
    _refused(tmp_path, _data(), r"^epochs = 0: expected a positive number", epochs=0)


def test_labels_outside_the_models_outputs(tmp_path):
    x, y = _data()
    y[17] = 4  # the model has 4 outputs: labels 0..3
    _refused(tmp_path, (x, y), r"^data: y holds label 4, outside the model's 4 outputs \(allowed: 0..3, or -100 to ignore\)")
    y[17] = -1
    _refused(tmp_path, (x, y), r"^data: y holds label -1, outside")
    xv, yv = _data(12)
    yv[3] = 9
    _refused(tmp_path, _data(), r"^validation_data: y holds label 9", validation_data=(xv, yv))


def test_labels_outside_the_vocabulary_of_a_model_with_its_own_loss(tmp_path):
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            logits = self.head(self.embed(input_ids))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits.reshape(-1, 16), labels.reshape(-1))
            return out

    ids = torch.randint(0, 16, (20, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, -1] = -100  # ignored positions are fine...
    labels[4, 2] = 16  # ...a token id past the vocabulary is not
    _refused(
        tmp_path,
        {"input_ids": ids, "labels": labels},
        r"^data: labels holds label 16, outside the model's 16 outputs",
        model=LM(),
        loss=None,
    )


def test_an_mse_target_of_the_wrong_shape(tmp_path):
    x, _ = _data()
    model = nn.Linear(5, 1)
    _refused(
        tmp_path,
        (x, torch.randn(40, 3)),
        r"^data: y has shape \(3,\) per sample but the model outputs \(1,\); loss='mse' compares them value for value",
        model=model,
        loss="mse",
    )
    # The shapes mse accepts: (n,) or (n, 1) against an output of (n, 1).
    for y in (torch.randn(40), torch.randn(40, 1)):
        rg.fit(nn.Linear(5, 1), (x, y), loss="mse", batch_size=8, verbose=False)


def test_a_list_instead_of_tensors(tmp_path):
    x, y = _data()
    _refused(tmp_path, (x.tolist(), y.tolist()), r"^data: x is a Python list; pass tensors")
    _refused(tmp_path, (x, y.tolist()), r"^data: y is a Python list; pass tensors")
    _refused(tmp_path, y.tolist(), r"^data is a Python list of numbers; pass tensors")
    _refused(tmp_path, {"input_ids": x, "labels": y.tolist()}, r"^data: 'labels' is a Python list; pass tensors", loss=None)
    _refused(tmp_path, (x, y), r"^validation_data: x is a Python list", validation_data=(x[:5].tolist(), y[:5]))


def test_a_batch_size_larger_than_the_dataset(tmp_path):
    _refused(tmp_path, _data(40), r"^batch_size = 64: larger than the 40 samples of data; use at most 40", batch_size=64)
    _refused(tmp_path, _data(40), r"^batch.size = 41: larger than the 40 samples", overrides={"batch.size": 41})
    h = rg.fit(_model(), _data(40), loss="cross_entropy", batch_size=40, epochs=2, verbose=False)  # the whole set is fine
    assert [r["step"] for r in h.rows] == [1, 2]
