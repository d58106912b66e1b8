"""The classic recipe, exactly: Dense 100 -> 128 ReLU -> 10, Adam at 1e-3, 10 epochs, batch 32.

Data: regimen's built-in `synthetic` set, a seeded 10-class Gaussian mixture in 100 dimensions
(two clusters per class; see `regimen.data.synthetic_classification`), 12,000 samples of
which 20% are held out for validation.

Run: python examples/classic_mlp.py
"""

import torch
from torch import nn

import regimen as rg
from regimen.data import synthetic_classification

x, y = synthetic_classification(num_samples=12_000, num_features=100, num_classes=10)
n_train = 9_600
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(100, 128), nn.ReLU(), nn.Linear(128, 10))

history = rg.fit(
    model,
    (x[:n_train], y[:n_train]),
    loss="cross_entropy",
    optimizer="adam",
    lr=1e-3,
    epochs=10,
    batch_size=32,
    validation_data=(x[n_train:], y[n_train:]),
    metrics=["accuracy"],
)
print(f"validation accuracy: {history.history['val_accuracy'][-1]:.4f}")
