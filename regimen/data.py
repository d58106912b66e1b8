"""Data: the built-in sources, user data, and the deterministic, resumable sample order.

Sources (the `[data] source` key):
- `stdlib`: the running interpreter's standard-library `.py` files as bytes (vocabulary 256).
  Files are sorted by relative path; a file goes to validation when a stable hash of its path
  falls below `val_fraction`, so the split is by file and the same on every machine with the
  same Python.
- `text:PATH`: a file's bytes; the last `val_fraction` of it is the validation set.
- `tokens:PATH`: tokens in nanoGPT's `.bin` layout, memory-mapped: either one file of uint16
  (split by position) or a directory holding `train.bin` and `val.bin`. A directory written by
  `regimen prepare` has a `meta.json` that gives the dtype (uint16 or uint32), the vocabulary and
  the bytes of text per token, so the summary reports the loss per byte too; without one
  (nanoGPT's own `prepare.py`) the tokens are uint16 and the vocabulary is the largest id + 1.
  A directory without `val.bin` trains without validation, with a warning.
- `synthetic`: the seeded 10-class classification set of `synthetic_classification`.
- from Python: tensors, a tuple of tensors, a mapping of tensors, or any map-style Dataset.

A language-model sample is a window of `context + 1` tokens; windows do not overlap, so an
epoch reads each token once. The order of samples is a pure function of (seed, samples seen):
epoch e is a permutation of the samples drawn from `numpy.random.default_rng([seed, e])`. The
global batch of a step is the next B positions of that order; rank r reads its contiguous share
of them and splits it into micro-batches, so every split of B reads the same samples.

Example:
    >>> order = SampleOrder(10, seed=0)
    >>> bool((order.take(0, 10) == order.take(0, 10)).all()), sorted(order.take(0, 10).tolist()) == list(range(10))
    (True, True)
"""

from __future__ import annotations

import math
import sysconfig
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from regimen.errors import UserError
from regimen.registry import DATA_SOURCES
from regimen.strategy import DataConfig
from regimen.tokens import TextCodec, bytes_per_token, check_files, codec_of, read_meta

# The synthetic set is the same whatever the training seed, so runs with different seeds
# compare on the same data.
SYNTHETIC_SEED = 1234


class Samples(Protocol):
    """What the trainer reads: a length and a vectorised gather of samples by index.

    A source whose `gather` is a pure read also sets `prefetch_safe = True`: the trainer then
    gathers the next step's batch on a background thread (regimen.prefetch).
    """

    def __len__(self) -> int: ...

    def gather(self, idx: np.ndarray) -> Any: ...


class TokenWindows:
    """Non-overlapping windows of `context + 1` tokens: sample i is (x, y) shifted by one.

    Example:
        >>> w = TokenWindows(np.arange(10, dtype=np.uint16), context=3)
        >>> len(w), w.gather(np.array([1]))[0].tolist(), w.gather(np.array([1]))[1].tolist()
        (3, [[3, 4, 5]], [[4, 5, 6]])
    """

    prefetch_safe = True  # gather is a pure read (regimen.prefetch)

    def __init__(self, tokens: np.ndarray, context: int) -> None:
        self.tokens = tokens
        self.context = context
        self.offsets = np.arange(context + 1, dtype=np.int64)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # One fancy-index read for the whole micro-batch: (n, context + 1) positions.
        rows = self.tokens[(np.asarray(idx, dtype=np.int64) * self.context)[:, None] + self.offsets]
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def tensor_names(tensors: Sequence[Any] | Mapping[str, Any]) -> list[str]:
    """What a user calls each tensor of their data: the mapping's keys, else x and y (x0, x1, y).

    >>> tensor_names((1, 2)), tensor_names((1, 2, 3)), tensor_names({"input_ids": 1})
    (['x', 'y'], ['x0', 'x1', 'y'], ['input_ids'])
    """
    if isinstance(tensors, Mapping):
        return [str(k) for k in tensors]
    n = len(tensors)
    if n == 1:
        return ["x"]
    return (["x"] if n == 2 else [f"x{i}" for i in range(n - 1)]) + ["y"]


class TensorSamples:
    """Samples held as tensors: a tuple (x, y, ...) or a mapping {"input_ids": ..., ...}.

    `what` names the data in errors (`data`, `validation_data`).
    """

    prefetch_safe = True

    def __init__(self, tensors: Sequence[Any] | Mapping[str, Any], what: str = "data") -> None:
        if isinstance(tensors, Mapping):
            tensors = {k: torch.as_tensor(v) for k, v in tensors.items()}
        else:
            tensors = tuple(torch.as_tensor(v) for v in tensors)
        values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        if not values:
            raise UserError(f"{what}: no tensors given")
        names = tensor_names(tensors)
        n = len(values[0])
        for name, v in zip(names, values):
            if len(v) != n:
                raise UserError(
                    f"{what}: {names[0]} and {name} have different lengths ({n} and {len(v)}); they must match sample for sample"
                )
        self.tensors = tensors
        self.n = n

    def __len__(self) -> int:
        return self.n

    def gather(self, idx: np.ndarray) -> Any:
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        if isinstance(self.tensors, Mapping):
            return {k: v[index] for k, v in self.tensors.items()}
        return tuple(v[index] for v in self.tensors)


class DatasetSamples:
    """Any map-style `torch.utils.data.Dataset`, collated with torch's `default_collate`."""

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__len__"):
            raise UserError("data: a Dataset needs __len__ (map-style); pass an iterable of batches instead")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def gather(self, idx: np.ndarray) -> Any:
        return default_collate([self.dataset[int(i)] for i in idx])


def is_hf_dataset(data: Any) -> bool:
    """A Hugging Face `datasets.Dataset` (recognised without importing `datasets`)."""
    return type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "with_format") and hasattr(data, "features")


def _numeric_arrow(tp: Any) -> bool:
    """Numbers, booleans, or (nested) lists of them: what becomes a tensor."""
    import pyarrow as pa

    if pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_boolean(tp):
        return True
    if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        return _numeric_arrow(tp.value_type)
    return False


class HFDatasetSamples:
    """A Hugging Face `datasets.Dataset`: its numeric columns, a batch of rows at a time.

    A batch is one Arrow `take` of the rows, converted by `datasets`' own torch formatter into
    one tensor per column (no Python loop over rows). Columns that are not numbers or lists of
    numbers (the raw `text`, say) are left out: they cannot be a model's tensor arguments. The
    rows of a batch must have equal lengths (pad them when tokenizing, or pass a DataLoader with
    a padding collator as an iterable of batches).
    """

    prefetch_safe = True

    def __init__(self, dataset: Any, what: str = "data") -> None:
        schema = dataset.features.arrow_schema
        self.columns = [f.name for f in schema if _numeric_arrow(f.type)]
        if not self.columns:
            raise UserError(
                f"{what}: the datasets.Dataset has no numeric columns (it has {', '.join(dataset.column_names)}); tokenize it first"
            )
        self.dataset = dataset.with_format("torch", columns=self.columns)
        self.what = what

    def __len__(self) -> int:
        return len(self.dataset)

    def gather(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.dataset[np.asarray(idx, dtype=np.int64)]
        for name, value in batch.items():
            if not isinstance(value, torch.Tensor):
                raise UserError(
                    f"{self.what}: the rows of column {name!r} have different lengths; pad them to one length "
                    "(or pass a DataLoader with a padding collator)"
                )
        return batch


def as_samples(data: Any, what: str = "data") -> Samples:
    """Wrap what a user passed to `fit` (tensors, tuple, mapping, Dataset) as `Samples`; `what` names it in errors."""
    if hasattr(data, "gather") and hasattr(data, "__len__"):
        return data
    if isinstance(data, torch.Tensor):
        return TensorSamples((data,), what)
    if isinstance(data, Mapping):
        return TensorSamples(data, what)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in data):
        return TensorSamples(data, what)
    if is_hf_dataset(data):
        return HFDatasetSamples(data, what)
    if isinstance(data, Dataset):
        return DatasetSamples(data)
    raise UserError(f"{what}: cannot train on a {type(data).__name__}; pass tensors (x, y), a mapping of tensors, or a Dataset")


class SampleOrder:
    """The order samples are read in: a pure function of (seed, position in the stream).

    Position p is sample `perm_e[p % n]` of epoch `e = p // n`, with `perm_e` a permutation
    seeded by (seed, e). Nothing is consumed, so resuming at any position is exact.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        assert n > 0
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:  # a batch spans at most two epochs
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, epoch])
            self._cache[epoch] = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._cache[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        """The sample indices at positions start, ..., start + count - 1."""
        out = np.empty(count, dtype=np.int64)
        pos, filled = start, 0
        while filled < count:
            epoch, offset = divmod(pos, self.n)
            k = min(count - filled, self.n - offset)
            out[filled : filled + k] = self._perm(epoch)[offset : offset + k]
            pos, filled = pos + k, filled + k
        return out


@dataclass
class TaskData:
    """The data of a task: training and validation samples, and what the model must match."""

    train: Samples
    val: Samples | None
    tokens_per_sample: int = 1
    vocab_size: int = 256
    num_features: int = 0
    num_classes: int = 0
    # Entropy of the training bytes' unigram distribution, in nats: the loss of a model
    # that ignores context (language-model sources only).
    unigram_entropy: float | None = None
    description: str = ""
    # Text sources: how ids map back to text (None: unknown, e.g. a tokens file without meta.json).
    codec: TextCodec | None = None
    # A `regimen prepare` directory: where it is, its meta.json, and bytes of text per token by split.
    tokens_dir: Path | None = None
    tokens_meta: dict[str, Any] | None = None
    bytes_per_token: dict[str, float] | None = None

    def loss_per_byte(self, final_loss: float | None, val_losses: Sequence[float]) -> dict[str, Any]:
        """The summary's losses in nats per byte of text (nats/token / bytes per token), where known.

        >>> d = TaskData(None, None, bytes_per_token={"train": 4.0, "val": 2.0})  # type: ignore[arg-type]
        >>> {k: v for k, v in d.loss_per_byte(2.0, [3.0, 1.0]).items() if k != "bytes_per_token"}
        {'final_loss_per_byte': 0.5, 'final_val_loss_per_byte': 0.5, 'best_val_loss_per_byte': 0.5}
        """
        per = self.bytes_per_token
        if not per:
            return {}
        out: dict[str, Any] = {"bytes_per_token": per}
        if final_loss is not None and "train" in per:
            out["final_loss_per_byte"] = final_loss / per["train"]
        if val_losses and "val" in per:
            out["final_val_loss_per_byte"] = val_losses[-1] / per["val"]
            out["best_val_loss_per_byte"] = min(val_losses) / per["val"]
        return out


# --------------------------------------------------------------------------------------------
# Built-in sources
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def stdlib_corpus(val_fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(train bytes, val bytes, number of files) of the standard library's `.py` sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise UserError(f"data.source = 'stdlib': no .py files under {root}")
    train: list[bytes] = []
    val: list[bytes] = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        # crc32 is stable across processes and Python versions (hash() is salted).
        bucket = val if (zlib.crc32(rel.encode()) % 10_000) < val_fraction * 10_000 else train
        bucket.append(p.read_bytes())
    if not val:  # tiny val_fraction: still validate on something
        val.append(train.pop())
    to_array = lambda chunks: np.frombuffer(b"\n".join(chunks), dtype=np.uint8)  # noqa: E731
    return to_array(train), to_array(val), len(files)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies (the loss of a context-free model)."""
    flat = np.asarray(tokens).ravel()
    counts_int = np.zeros(vocab_size, dtype=np.int64)
    # bincount copies its input to int64: 4M-token chunks bound that copy to 32 MiB.
    for start in range(0, len(flat), 1 << 22):
        counts_int += np.bincount(flat[start : start + (1 << 22)], minlength=vocab_size)
    counts = counts_int.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def synthetic_classification(
    num_samples: int, num_features: int, num_classes: int, seed: int = SYNTHETIC_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded Gaussian-mixture classification set: 2 clusters per class, overlapping a little.

    Each class owns two cluster centres drawn from N(0, I) and scaled to norm 4; a sample is
    its centre plus N(0, I) noise. Two clusters per class make the classes not linearly
    separable, so the hidden layer matters; the overlap puts the best achievable accuracy a
    little below 100% (the classic MLP recipe reaches about 95%).

    Example:
        >>> x, y = synthetic_classification(100, 5, 3)
        >>> tuple(x.shape), int(y.max()) <= 2
        ((100, 5), True)
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 2, num_features, generator=g)
    centres = 4.0 * centres / centres.norm(dim=-1, keepdim=True)
    y = torch.randint(0, num_classes, (num_samples,), generator=g)
    cluster = torch.randint(0, 2, (num_samples,), generator=g)
    x = centres[y, cluster] + torch.randn(num_samples, num_features, generator=g)
    return x, y


IMAGE_SIZE = 16


def shape_images(num_samples: int, num_classes: int, seed: int = SYNTHETIC_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded image classification set: 16x16 grey images of one of `num_classes` (<= 10) shapes.

    Each image draws its shape's class, a centre, a size and a brightness at random, then adds
    Gaussian noise (sd 0.3), so the classes overlap a little and a convolutional net has
    something to learn that a linear model does not. The shapes: filled square, disc, plus,
    cross, ring, horizontal bar, vertical bar, upper triangle, square outline, two dots.

    Example:
        >>> x, y = shape_images(8, 10)
        >>> tuple(x.shape), int(y.max()) < 10
        ((8, 1, 16, 16), True)
    """
    g = torch.Generator().manual_seed(seed)
    n = num_samples
    y = torch.randint(0, num_classes, (n,), generator=g)
    centre = 5.5 + 5.0 * torch.rand(n, 2, generator=g)  # in [5.5, 10.5]: the shape stays in the image
    size = 2.5 + 2.0 * torch.rand(n, generator=g)
    bright = 0.7 + 0.6 * torch.rand(n, generator=g)
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    r = (grid.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)) / size.view(-1, 1, 1)  # rows
    c = (grid.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)) / size.view(-1, 1, 1)  # columns
    ar, ac, d = r.abs(), c.abs(), (r**2 + c**2).sqrt()
    masks = torch.stack(
        [
            (ar <= 1) & (ac <= 1),  # filled square
            d <= 1,  # disc
            ((ar <= 0.3) & (ac <= 1)) | ((ac <= 0.3) & (ar <= 1)),  # plus
            ((r - c).abs() <= 0.35) & (d <= 1.3) | ((r + c).abs() <= 0.35) & (d <= 1.3),  # cross
            (d <= 1) & (d >= 0.6),  # ring
            (ar <= 0.35) & (ac <= 1.2),  # horizontal bar
            (ac <= 0.35) & (ar <= 1.2),  # vertical bar
            (r <= 1) & (c >= -1) & (r >= c),  # triangle
            (ar <= 1) & (ac <= 1) & ((ar >= 0.65) | (ac >= 0.65)),  # square outline
            ((r**2 + (c - 0.8) ** 2).sqrt() <= 0.45) | ((r**2 + (c + 0.8) ** 2).sqrt() <= 0.45),  # two dots
        ],
        dim=1,
    )
    image = masks[torch.arange(n), y].float() * bright.view(-1, 1, 1)
    image = image + 0.3 * torch.randn(n, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return image.unsqueeze(1), y


def load_shapes(cfg: DataConfig, context: int) -> TaskData:
    """`shapes`: the seeded image set of `shape_images`, split by `val_fraction`."""
    x, y = shape_images(cfg.num_samples, cfg.num_classes)
    n_val = round(cfg.num_samples * cfg.val_fraction)
    n_train = cfg.num_samples - n_val
    return TaskData(
        TensorSamples((x[:n_train], y[:n_train])),
        TensorSamples((x[n_train:], y[n_train:])) if n_val else None,
        num_features=IMAGE_SIZE * IMAGE_SIZE,
        num_classes=cfg.num_classes,
        description=f"shapes: {cfg.num_classes} classes of 16x16 images, {n_train} train / {n_val} val samples",
    )


def _read_path(source: str) -> Path:
    path = Path(source.split(":", 1)[1]).expanduser()
    if not path.exists():
        raise UserError(f"data.source = {source!r}: {str(path)!r} does not exist")
    return path


def _check_length(source: str, n_tokens: int, context: int, what: str) -> None:
    if n_tokens == 0:
        raise UserError(f"data.source = {source!r}: the {what} is empty")
    if n_tokens < context + 1:
        raise UserError(f"data.source = {source!r}: the {what} has {n_tokens} tokens, fewer than model.context + 1 = {context + 1}")


def _memmap_tokens(source: str, path: Path, dtype: str = "uint16") -> np.ndarray:
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise UserError(f"data.source = {source!r}: {path.name} has {size} bytes, not a whole number of {dtype} tokens")
    if size == 0:
        raise UserError(f"data.source = {source!r}: {path.name} is empty")
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class TokensDir:
    """The splits of a tokens directory, with what its meta.json says (if it has one)."""

    train: np.ndarray
    val: np.ndarray
    vocab: int
    meta: dict[str, Any] | None = None
    codec: TextCodec | None = None


def read_tokens_dir(source: str, path: Path) -> TokensDir:
    """train.bin and val.bin of a directory; dtype and vocabulary from meta.json when there is one."""
    meta = read_meta(path, f"data.source = {source!r}")
    if meta is not None:
        check_files(path, meta, f"data.source = {source!r}")
    elif not (path / "train.bin").exists():
        raise UserError(f"data.source = {source!r}: the directory has no train.bin (make one with regimen prepare)")
    dtype = meta["dtype"] if meta else "uint16"
    train = _memmap_tokens(source, path / "train.bin", dtype)
    val = _memmap_tokens(source, path / "val.bin", dtype) if (path / "val.bin").exists() else train[:0]
    if not len(val):
        warnings.warn(f"data.source = {source!r}: no val.bin, so the run has no validation", stacklevel=3)
    if meta is None:
        # The vocabulary must cover every token id; one pass over the file finds it.
        return TokensDir(train, val, int(max(train.max(), val.max() if len(val) else 0)) + 1)
    return TokensDir(train, val, int(meta["vocab_size"]), meta, codec_of(path, meta, f"data.source = {source!r}"))


def load_source(cfg: DataConfig, context: int) -> TaskData:
    """The `TaskData` of a built-in source (regimen.registry.DATA_SOURCES), for a model with the given context length."""
    loader: Callable[[DataConfig, int], TaskData] = DATA_SOURCES[cfg.kind].load()
    return loader(cfg, context)


def load_synthetic(cfg: DataConfig, context: int) -> TaskData:
    """`synthetic`: the seeded Gaussian-mixture classification set, split by `val_fraction`."""
    x, y = synthetic_classification(cfg.num_samples, cfg.num_features, cfg.num_classes)
    n_val = round(cfg.num_samples * cfg.val_fraction)
    n_train = cfg.num_samples - n_val
    return TaskData(
        TensorSamples((x[:n_train], y[:n_train])),
        TensorSamples((x[n_train:], y[n_train:])) if n_val else None,
        num_features=cfg.num_features,
        num_classes=cfg.num_classes,
        description=f"synthetic: {cfg.num_classes}-class Gaussian mixture, {n_train} train / {n_val} val samples",
    )


def load_python(cfg: DataConfig, context: int) -> TaskData:
    """`python`: data given in Python (`rg.fit`), never read from a strategy file."""
    raise UserError("data.source = 'python' is the data given to rg.fit in Python; a strategy file names stdlib, text:PATH or tokens:PATH")


def load_stdlib(cfg: DataConfig, context: int) -> TaskData:
    """`stdlib`: the standard library's `.py` files as bytes, split by file."""
    train, val, n_files = stdlib_corpus(cfg.val_fraction)
    desc = f"stdlib: {n_files} .py files of Python's standard library, {len(train) / 1e6:.1f}M train / {len(val) / 1e6:.1f}M val bytes"
    out = _token_data(cfg.source, train, val, context, 256, desc)
    out.codec = TextCodec.bytes()
    return out


def load_text(cfg: DataConfig, context: int) -> TaskData:
    """`text:PATH`: a file's bytes; the last `val_fraction` of it is the validation set."""
    path = _read_path(cfg.source)
    if path.is_dir():
        raise UserError(
            f"data.source = {cfg.source!r}: {str(path)!r} is a directory; give a text file (or tokens:DIR for a prepared directory)"
        )
    data = np.fromfile(path, dtype=np.uint8)
    cut = len(data) - int(len(data) * cfg.val_fraction)
    out = _token_data(cfg.source, data[:cut], data[cut:], context, 256, f"text: {path} ({len(data) / 1e6:.2f}M bytes)")
    out.codec = TextCodec.bytes()
    return out


def load_tokens(cfg: DataConfig, context: int) -> TaskData:
    """`tokens:PATH`: token ids, one uint16 `.bin` file (split by position) or a directory of train.bin / val.bin
    (with `regimen prepare`'s meta.json: uint16 or uint32, the vocabulary, the tokenizer, bytes per token)."""
    path = _read_path(cfg.source)
    tokens: TokensDir | None = None
    if path.is_dir():
        tokens = read_tokens_dir(cfg.source, path)
        train, val, vocab = tokens.train, tokens.val, tokens.vocab
    else:
        data = _memmap_tokens(cfg.source, path)
        cut = len(data) - int(len(data) * cfg.val_fraction)
        train, val = data[:cut], data[cut:]
        # The vocabulary must cover every token id; one pass over the file finds it.
        vocab = int(max(train.max(), val.max() if len(val) else 0)) + 1
    desc = f"tokens: {path} ({len(train) / 1e6:.2f}M train / {len(val) / 1e6:.2f}M val tokens, vocab {vocab})"
    out = _token_data(cfg.source, train, val, context, vocab, desc)
    if tokens is not None and tokens.meta is not None:
        out.codec, out.tokens_dir, out.tokens_meta = tokens.codec, path, tokens.meta
        out.bytes_per_token = bytes_per_token(tokens.meta)
    return out


def _token_data(source: str, train: np.ndarray, val: np.ndarray, context: int, vocab: int, desc: str) -> TaskData:
    """Windows of `context + 1` tokens for training and validation (validation only when it holds one)."""
    _check_length(source, len(train), context, "training set")
    val_windows = TokenWindows(val, context) if len(val) >= context + 1 else None
    if len(val) and val_windows is None:
        warnings.warn(f"data.source = {source!r}: {len(val)} validation tokens, fewer than model.context + 1: no validation", stacklevel=3)
    entropy = unigram_entropy(train, 256) if vocab == 256 else None
    return TaskData(
        TokenWindows(train, context), val_windows, tokens_per_sample=context, vocab_size=vocab, unigram_entropy=entropy, description=desc
    )


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` sizes that differ by at most one, larger first.

    >>> split_evenly(10, 3)
    [4, 3, 3]
    """
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def micro_sizes(share: int, micro: int | None) -> list[int]:
    """A rank's share of the global batch split into micro-batches of at most `micro`.

    >>> micro_sizes(10, 4)
    [4, 3, 3]
    """
    if micro is None or micro >= share:
        return [share]
    return split_evenly(share, math.ceil(share / micro))
