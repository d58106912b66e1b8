"""`rg.fit` with the Hugging Face libraries: a `datasets.Dataset` as data, a transformers GPT-2 as model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import regimen as rg
from regimen.data import HFDatasetSamples, as_samples
from regimen.errors import UserError
from tests.conftest import need
from tests.test_fit import TinyLM, _token_data


def _as_dataset(data: dict[str, torch.Tensor], **extra_columns: list) -> object:
    datasets = need("datasets")
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in data.items()} | extra_columns)


def test_a_datasets_Dataset_trains_like_the_same_tensors():
    data, val = _token_data(n=64), _token_data(n=24)
    ds = _as_dataset(data, text=["not a tensor"] * 64)  # a text column is left out, not passed to the model
    samples = as_samples(ds)
    assert isinstance(samples, HFDatasetSamples) and samples.columns == ["input_ids", "labels"]
    batch = samples.gather(np.array([5, 2, 9]))
    assert torch.equal(batch["input_ids"], data["input_ids"][[5, 2, 9]])  # one take of three rows, as tensors
    kwargs = {"epochs": 2, "batch_size": 16, "lr": 1e-2, "verbose": False}
    a = rg.fit(TinyLM(), data, validation_data=val, **kwargs)
    b = rg.fit(TinyLM(), ds, validation_data=_as_dataset(val), **kwargs)
    assert b.history["loss"] == a.history["loss"] and b.history["val_loss"] == a.history["val_loss"]
    assert b.rows[-1]["tokens"] == a.rows[-1]["tokens"] == 2 * 64 * 12


def test_a_datasets_Dataset_with_rows_of_different_lengths_is_refused():
    ds = _as_dataset({"input_ids": torch.zeros(4, 3, dtype=torch.long)})
    ragged = ds.map(lambda row, i: {"input_ids": row["input_ids"][: 1 + i % 3]}, with_indices=True)
    with pytest.raises(UserError, match=r"input_ids.*different lengths"):
        as_samples(ragged).gather(np.arange(4))
    with pytest.raises(UserError, match="no numeric columns"):
        as_samples(_as_dataset({}, text=["a", "b"]))


def test_gpt2_trained_by_fit_saves_and_loads_with_save_pretrained(tmp_path):
    transformers = need("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    # Counting sequences from random starts: the next token is the last plus one.
    starts = torch.randint(0, 64, (64, 1), generator=torch.Generator().manual_seed(0))
    ids = (starts + torch.arange(16)) % 64
    h = rg.fit(model, {"input_ids": ids, "labels": ids}, lr=1e-2, epochs=6, batch_size=16, run_dir=tmp_path / "run", verbose=False)
    assert h.history["loss"][-1] < 0.5 * h.history["loss"][0]
    assert h.summary["tokens"] == 6 * 64 * 16
    model.save_pretrained(tmp_path / "gpt2")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids[:4]).logits, model(ids[:4]).logits)
    # regimen's own export holds the same weights (the tied head is stored once).
    from safetensors.torch import load_file

    fresh = transformers.GPT2LMHeadModel(config).eval()
    fresh.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"), strict=False)
    with torch.no_grad():
        assert torch.equal(fresh(ids[:4]).logits, model(ids[:4]).logits)
