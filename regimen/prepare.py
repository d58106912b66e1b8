"""`regimen prepare`: text, jsonl, parquet or a saved `datasets` dataset -> a tokens directory.

```
regimen prepare SOURCE... --out DIR [--tokenizer bytes | bpe:VOCAB | PATH/tokenizer.json]
                [--field text] [--val-fraction 0.1] [--jobs N]
```

Inputs. Each SOURCE is a file or a directory, read recursively in sorted order (hidden entries
skipped). A `.jsonl` file holds one JSON object per line and its `--field` is a document; a
`.parquet` file's `--field` column holds one document per row; a directory written by
`datasets`' `save_to_disk` (a Dataset or a DatasetDict, every split in order) is read with
`datasets.load_from_disk` and its `--field` column holds the documents; any other file is one
document of text. Nothing is downloaded. Empty documents are skipped.

Pieces. A document is read in pieces of about 64 KiB, cut only after a newline that sits between
two printable ASCII characters (`x\\ny`). GPT-2's pre-tokenizer (and so the byte-level BPE that
prepare trains) never joins characters across such a cut, so encoding the pieces one by one
gives exactly the tokens of the whole document, while a long file can be encoded on every core
in bounded memory. (A tokenizer.json that normalises or pre-tokenises otherwise, e.g.
SentencePiece's leading "▁", may tokenise the first characters of a piece differently.)

The validation split is made of whole pieces (whole documents, unless a document is longer than
a piece), chosen by content, not by position: each piece is hashed (BLAKE2b), and the pieces
with the smallest hashes go to validation until they hold `--val-fraction` of the bytes, always
leaving one piece for training. So the split is deterministic, the same for every tokenizer (a
bytes run and a BPE run validate on the same text), and mostly unchanged when files are added. A
corpus of a single piece is cut in two at the last line break before `1 - val_fraction` of it.
`--val-fraction 0` writes no val.bin.

Tokens. Each document's tokens are followed by a separator: the tokenizer's end-of-text token
(`<|endoftext|>`, which the trained BPE has as id 0; for a tokenizer.json, the first of
`tokens.END_OF_TEXT` it has, else nothing), or for bytes a newline unless the document ends with
one (so text files come out exactly as `cat` would join them). `bpe:VOCAB` trains a byte-level
BPE (GPT-2's pre-tokenizer, 256 byte tokens, `<|endoftext|>`, merges up to VOCAB) on the
training pieces only. Ids are stored as uint16 when the vocabulary fits, uint32 otherwise.

Output. Everything is written into a temporary directory beside `--out` and renamed into place
when whole, so an error or Ctrl-C never leaves a half-written DIR. An existing `--out` is replaced
only when it is an earlier prepare output (its meta.json and nothing else of ours); a rerun whose
sources (by size and modification time, else by SHA-256) and options are unchanged does nothing.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("hello\\n")
    >>> prepare([d / "a.txt"], d / "tokens", val_fraction=0, quiet=True).meta["splits"]["train"]["tokens"]
    6
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from regimen.errors import UserError
from regimen.tokens import (
    DATA_EXTRA,
    FORMAT,
    META,
    TOKENIZER,
    VERSION,
    check_files,
    dtype_for,
    end_of_text_id,
    import_tokenizers,
    parse_tokenizer,
    read_meta,
    vocab_size_of,
)

PIECE_BYTES = 1 << 16
# Pieces are sent to the encoding processes in batches of about this many bytes.
BATCH_BYTES = 1 << 20
MIN_BPE_VOCAB = 257  # 256 byte tokens + <|endoftext|>
OUTPUTS = frozenset({"train.bin", "val.bin", TOKENIZER, META})
# A cut point: after a newline between two printable ASCII characters (see the module docstring).
_CUT = re.compile(rb"[!-~]\n(?=[!-~])")
_TMP_MARK = ".regimen-prepare"

Kind = Literal["text", "jsonl", "parquet", "dataset"]


# --------------------------------------------------------------------------------------------
# Inputs and their fingerprints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One input: a text, jsonl or parquet file, or a directory saved by `datasets`."""

    path: Path
    kind: Kind

    def files(self) -> list[Path]:
        """The files it is read from (a saved dataset: every file under its directory)."""
        if self.kind != "dataset":
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file())


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _kind_of(path: Path) -> Kind:
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")  # type: ignore[return-value]


def find_inputs(sources: Sequence[str | Path], exclude: Path | None = None) -> list[Input]:
    """Every input the sources name, in order (a directory's entries sorted by name).

    `exclude` (the output directory, when it sits inside a source) is never read.
    """
    if not sources:
        raise UserError("prepare: give at least one SOURCE (a text, .jsonl or .parquet file, or a directory)")
    inputs: list[Input] = []
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"prepare: source {str(source)!r} does not exist")
        if path.is_file():
            inputs.append(Input(path.resolve(), _kind_of(path)))
            continue
        found = list(_walk(path.resolve(), exclude))
        if not found:
            raise UserError(f"prepare: source {str(source)!r} is a directory with no files")
        inputs += found
    return inputs


def _walk(directory: Path, exclude: Path | None) -> Iterator[Input]:
    if _is_saved_dataset(directory):
        yield Input(directory, "dataset")
        return
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry == exclude:
            continue
        if entry.is_dir():
            yield from _walk(entry, exclude)
        elif entry.is_file():
            yield Input(entry, _kind_of(entry))


def fingerprint(inputs: Sequence[Input], previous: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Path, kind, size, mtime and SHA-256 of every input file.

    A file whose size and modification time equal those `previous` recorded keeps its recorded
    hash (the quick check of rsync and make); any other file is hashed.
    """
    known = {(p["path"], p["size"], p["mtime_ns"]): p["sha256"] for p in previous}
    out = []
    for inp in inputs:
        for path in inp.files():
            st = path.stat()
            digest = known.get((str(path), st.st_size, st.st_mtime_ns))
            if digest is None:
                with path.open("rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            out.append({"path": str(path), "kind": inp.kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return out


# --------------------------------------------------------------------------------------------
# Documents and pieces
# --------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """Part of a document: its bytes, where it comes from (for errors), its offset, and whether it ends the document."""

    data: bytes
    where: str
    offset: int
    end: bool


def split_pieces(blocks: Iterable[bytes], piece_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, piece) of one document: a cut at the first cut point at or after every `piece_bytes`.

    >>> [p for _, p in split_pieces([b"ab\\ncd\\n\\nef"], 2)]  # never inside "\\n\\n"
    [b'ab\\n', b'cd\\n\\nef']
    """
    buf = bytearray()
    offset = 0
    for block in blocks:
        buf += block
        while len(buf) > piece_bytes:
            match = _CUT.search(buf, piece_bytes - 1)
            if match is None:
                break  # no cut point yet: read on
            cut = match.end()
            yield offset, bytes(buf[:cut])
            del buf[:cut]
            offset += cut
    if buf:
        yield offset, bytes(buf)


def _text_blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from iter(lambda: f.read(1 << 20), b"")


def _utf8(text: Any, where: str, field: str) -> bytes:
    if not isinstance(text, str):
        raise UserError(f"{where}: field {field!r} is {'null' if text is None else 'a ' + type(text).__name__}, not a string")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: field {field!r} is not valid text ({e.reason} at character {e.start})") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, list[bytes]]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{where}: not a JSON line ({e})") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(map(str, row)) if isinstance(row, dict) else f"a {type(row).__name__}"
                raise UserError(f"{where}: no field {field!r} (it has: {keys or 'nothing'}); choose it with --field")
            yield where, [_utf8(row[field], where, field)]


def _column_documents(batches: Iterable[Any], field: str, where: str) -> Iterator[tuple[str, list[bytes]]]:
    """Documents from Arrow record batches or tables of one string column."""
    row = 0
    for batch in batches:
        for value in batch.column(field).to_pylist():
            yield f"{where} row {row}", [_utf8(value, f"{where} row {row}", field)]
            row += 1


def _parquet_documents(path: Path, field: str) -> Iterator[tuple[str, list[bytes]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"prepare: reading {path.name} needs pyarrow: {DATA_EXTRA}") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
        raise UserError(f"{path}: not a Parquet file ({str(e).splitlines()[0][:200]})") from None
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise UserError(f"{path}: no column {field!r} (it has: {', '.join(columns)}); choose it with --field")
    yield from _column_documents(parquet.iter_batches(batch_size=1024, columns=[field]), field, str(path))


def _dataset_documents(path: Path, field: str) -> Iterator[tuple[str, list[bytes]]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"prepare: reading the saved dataset {path} needs Hugging Face datasets: {DATA_EXTRA}") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError / arrow errors for a damaged directory
        raise UserError(f"{path}: datasets.load_from_disk cannot read it ({str(e).splitlines()[0][:200]})") from None
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, ds in parts:
        where = f"{path}" + (f" [{split}]" if split else "")
        if field not in ds.column_names:
            raise UserError(f"{where}: no column {field!r} (it has: {', '.join(ds.column_names)}); choose it with --field")
        yield from _column_documents(ds.select_columns([field]).with_format("arrow").iter(batch_size=1024), field, where)


def documents(inp: Input, field: str) -> Iterator[tuple[str, Iterable[bytes]]]:
    """(where, blocks of bytes) of every document of an input."""
    if inp.kind == "text":
        yield str(inp.path), _text_blocks(inp.path)
    elif inp.kind == "jsonl":
        yield from _jsonl_documents(inp.path, field)
    elif inp.kind == "parquet":
        yield from _parquet_documents(inp.path, field)
    else:
        yield from _dataset_documents(inp.path, field)


def read_pieces(inputs: Sequence[Input], field: str, piece_bytes: int) -> Iterator[Piece]:
    """Every piece of every document, in order; the last piece of a document has `end` set."""
    for inp in inputs:
        for where, blocks in documents(inp, field):
            previous: tuple[int, bytes] | None = None
            for offset, data in split_pieces(blocks, piece_bytes):
                if previous is not None:
                    yield Piece(previous[1], where, previous[0], end=False)
                previous = (offset, data)
            if previous is not None:
                yield Piece(previous[1], where, previous[0], end=True)


# --------------------------------------------------------------------------------------------
# The plan: which pieces are validation
# --------------------------------------------------------------------------------------------


def _piece_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def choose_val(hashes: np.ndarray, sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Which pieces are validation: the smallest hashes until they hold `fraction` of the bytes.

    At least one piece always stays in training.

    >>> choose_val(np.array([5, 1, 9, 3]), np.array([10, 10, 10, 10]), 0.3).tolist()
    [False, True, False, True]
    """
    n = len(hashes)
    val = np.zeros(n, dtype=bool)
    if fraction <= 0 or n < 2:
        return val
    order = np.lexsort((np.arange(n), hashes))  # by hash, ties by position
    reached = np.cumsum(sizes[order]) >= fraction * sizes.sum()
    count = min(int(np.argmax(reached)) + 1, n - 1)
    val[order[:count]] = True
    return val


def cut_point(data: bytes, fraction: float) -> int | None:
    """Where to cut a single-piece corpus so the tail holds about `fraction` of it.

    After the last newline before the target (else at the target, moved to a UTF-8 character start).

    >>> cut_point(b"one\\ntwo\\nthree\\n", 0.5)  # "one\\n" | "two\\nthree\\n"
    4
    """
    target = len(data) - int(len(data) * fraction)
    if fraction <= 0 or target <= 0 or target >= len(data):
        return None
    newline = data.rfind(b"\n", 0, target)
    if newline >= 0:
        return newline + 1
    while 0 < target < len(data) and (data[target] & 0xC0) == 0x80:  # a UTF-8 continuation byte
        target -= 1
    return target or None


@dataclass
class Plan:
    """What the first pass learnt: each piece's size and split, and the single-piece cut."""

    sizes: np.ndarray
    val: np.ndarray
    cut: int | None = None
    total_bytes: int = 0

    def pieces(self, inputs: Sequence[Input], field: str, piece_bytes: int) -> Iterator[tuple[Piece, bool]]:
        """(piece, is validation) in order, the same pieces the plan saw (checked)."""
        stream = read_pieces(inputs, field, piece_bytes)
        if self.cut is not None:
            stream = _cut_single(stream, self.cut)
        count = 0
        for i, piece in enumerate(stream):
            if i >= len(self.sizes) or len(piece.data) != self.sizes[i]:
                raise UserError(f"prepare: {piece.where} changed while prepare was reading it; run prepare again")
            count += 1
            yield piece, bool(self.val[i])
        if count != len(self.sizes):
            raise UserError("prepare: the sources changed while prepare was reading them; run prepare again")


def _cut_single(stream: Iterator[Piece], cut: int) -> Iterator[Piece]:
    for piece in stream:
        yield Piece(piece.data[:cut], piece.where, piece.offset, end=False)
        yield Piece(piece.data[cut:], piece.where, piece.offset + cut, end=piece.end)


def make_plan(
    inputs: Sequence[Input], field: str, piece_bytes: int, val_fraction: float, check_utf8: bool, progress: Callable[[int], None]
) -> Plan:
    """Read every piece once: check it, hash it, and choose the validation pieces."""
    hashes: list[int] = []
    sizes: list[int] = []
    first: bytes | None = None
    for piece in read_pieces(inputs, field, piece_bytes):
        if check_utf8:
            try:
                piece.data.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = piece.offset + e.start
                raise UserError(
                    f"{piece.where}: not UTF-8 text (byte {byte:,}); a tokenizer reads text: fix it, or use --tokenizer bytes"
                ) from None
        if first is None:
            first = piece.data
        hashes.append(_piece_hash(piece.data))
        sizes.append(len(piece.data))
        progress(len(piece.data))
    if not sizes:
        raise UserError("prepare: the corpus is empty (no document has any text)")
    total = sum(sizes)
    if len(sizes) == 1 and first is not None:
        cut = cut_point(first, val_fraction)
        if cut is not None:
            return Plan(np.array([cut, total - cut]), np.array([False, True]), cut, total)
    return Plan(np.array(sizes, dtype=np.int64), choose_val(np.array(hashes, dtype=np.uint64), np.array(sizes), val_fraction), None, total)


# --------------------------------------------------------------------------------------------
# Tokenizers and encoding
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizerSpec:
    """What `--tokenizer` asked for: bytes, a BPE to train, or a tokenizer.json to load."""

    kind: Literal["bytes", "bpe", "file"]
    vocab: int = 0
    path: Path | None = None
    text: str = ""  # the tokenizer.json's text (kind "file")

    @classmethod
    def parse(cls, spec: str) -> TokenizerSpec:
        if spec == "bytes":
            return cls("bytes")
        if spec.startswith("bpe:"):
            try:
                vocab = int(spec[4:])
            except ValueError:
                raise UserError(f"--tokenizer {spec}: expected bpe:VOCAB with an integer VOCAB, e.g. bpe:8192") from None
            if vocab < MIN_BPE_VOCAB:
                raise UserError(f"--tokenizer {spec}: the vocabulary must be at least {MIN_BPE_VOCAB} (256 bytes + <|endoftext|>)")
            import_tokenizers()
            return cls("bpe", vocab)
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / TOKENIZER
        if not path.is_file():
            raise UserError(f"--tokenizer {spec!r}: allowed: bytes, bpe:VOCAB, or the path of a tokenizer.json (no such file)")
        text = path.read_text(errors="replace")
        parse_tokenizer(text, f"--tokenizer {spec!r}")  # fail now, before anything is read
        return cls("file", path=path.resolve(), text=text)

    def identity(self) -> dict[str, Any]:
        """What a rerun must match (a loaded file by its content)."""
        if self.kind == "file":
            return {"kind": "file", "sha256": hashlib.sha256(self.text.encode()).hexdigest()}
        return {"kind": self.kind, "vocab": self.vocab} if self.kind == "bpe" else {"kind": "bytes"}


def train_bpe(texts: Iterable[str], vocab: int, length: int, show_progress: bool) -> Any:
    """A byte-level BPE (GPT-2's pre-tokenizer, 256 byte tokens, <|endoftext|> as id 0) trained on `texts`."""
    tokenizers = import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    # No prefix space: a piece must tokenise as it does inside its document.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        show_progress=show_progress,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


@dataclass
class Encoder:
    """Pieces -> one array of token ids, with the separator after each document's last piece.

    Picklable (the tokenizer travels as its JSON), so each encoding process builds its own.

    Example:
        >>> Encoder("bytes", dtype="uint16")([b"ab", b"c\\n"], [True, True]).tolist()
        [97, 98, 10, 99, 10]
    """

    kind: Literal["bytes", "tokenizer"]
    tokenizer_json: str = ""
    eot_id: int | None = None
    dtype: str = "uint16"
    _tokenizer: Any = dataclasses.field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, pieces: Sequence[bytes], ends: Sequence[bool]) -> np.ndarray:
        if self.kind == "bytes":
            joined = b"".join(p + b"\n" if end and not p.endswith(b"\n") else p for p, end in zip(pieces, ends))
            return np.frombuffer(joined, dtype=np.uint8).astype(self.dtype)
        if self._tokenizer is None:
            self._tokenizer = parse_tokenizer(self.tokenizer_json, TOKENIZER)
        # Without offsets (encode_batch_fast): prepare needs only the ids.
        encodings = self._tokenizer.encode_batch_fast([p.decode("utf-8") for p in pieces], add_special_tokens=False)
        ids: list[int] = []
        for encoding, end in zip(encodings, ends):
            ids += encoding.ids
            if end and self.eot_id is not None:
                ids.append(self.eot_id)
        return np.array(ids, dtype=self.dtype)


_worker_encoder: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process: --jobs processes in all
    _worker_encoder = encoder


def _encode_in_worker(pieces: list[bytes], ends: list[bool]) -> np.ndarray:
    assert _worker_encoder is not None
    return _worker_encoder(pieces, ends)


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Encode in this process on one core (the tokenizers' thread pool otherwise takes them all)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


@dataclass
class SplitWriter:
    """Appends one split's arrays to its .bin file and counts what went in."""

    file: BinaryIO
    tokens: int = 0
    bytes: int = 0
    pieces: int = 0
    documents: int = 0

    def write(self, ids: np.ndarray) -> None:
        ids.tofile(self.file)
        self.tokens += len(ids)

    def counts(self, name: str) -> dict[str, Any]:
        return {"file": name, "tokens": self.tokens, "bytes": self.bytes, "pieces": self.pieces, "documents": self.documents}


def encode_all(
    planned: Iterator[tuple[Piece, bool]], encoder: Encoder, jobs: int, writers: dict[str, SplitWriter], progress: Callable[[int], None]
) -> None:
    """Encode every piece in batches, in `jobs` processes (bytes: here), writing in order."""
    pending: deque[tuple[str, Future[np.ndarray] | np.ndarray, int]] = deque()
    executor = None
    if jobs > 1 and encoder.kind == "tokenizer":
        import multiprocessing

        # spawn: a fork after the tokenizers' thread pool ran (training) could deadlock.
        executor = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(encoder,))

    def submit(split: str, batch: list[bytes], ends: list[bool]) -> None:
        size = sum(map(len, batch))
        result = executor.submit(_encode_in_worker, batch, ends) if executor else encoder(batch, ends)
        pending.append((split, result, size))
        while pending and (len(pending) > 2 * jobs or executor is None):
            drain()

    def drain() -> None:
        split, result, size = pending.popleft()
        try:
            ids = result.result() if isinstance(result, Future) else result
        except BrokenProcessPool:
            raise UserError(f"prepare: an encoding process died (out of memory?); try fewer --jobs than {jobs}") from None
        writers[split].write(ids)
        progress(size)

    batches: dict[str, tuple[list[bytes], list[bool]]] = {"train": ([], []), "val": ([], [])}
    sizes = {"train": 0, "val": 0}
    try:
        with _serial_tokenizers() if executor is None else contextlib.nullcontext():
            for piece, is_val in planned:
                split = "val" if is_val else "train"
                w = writers[split]
                w.bytes += len(piece.data)
                w.pieces += 1
                w.documents += piece.end
                batches[split][0].append(piece.data)
                batches[split][1].append(piece.end)
                sizes[split] += len(piece.data)
                if sizes[split] >= BATCH_BYTES:
                    submit(split, *batches[split])
                    batches[split], sizes[split] = ([], []), 0
            for split, (batch, ends) in batches.items():
                if batch:
                    submit(split, batch, ends)
            while pending:
                drain()
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# The output directory
# --------------------------------------------------------------------------------------------


def _check_out(out: Path) -> dict[str, Any] | None:
    """Refuse an --out that is not ours to replace; return the earlier output's meta, if any."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory (a new one, or an earlier prepare output)")
    names = {p.name for p in out.iterdir()}
    if not names:
        return None
    meta = read_meta(out, f"--out {str(out)!r}") if META in names else None
    if meta is None:
        raise UserError(f"--out {str(out)!r} exists and is not a prepare output (no {META}); choose a new directory")
    foreign = sorted(names - OUTPUTS)
    if foreign:
        raise UserError(
            f"--out {str(out)!r} holds files prepare did not write ({', '.join(foreign[:3])}); it was left alone: choose a new directory"
        )
    return meta


def _up_to_date(out: Path, meta: dict[str, Any], identity: dict[str, Any], sources: list[dict[str, Any]]) -> bool:
    if meta.get("identity") != identity:
        return False
    if [(s["path"], s["sha256"]) for s in meta.get("sources", [])] != [(s["path"], s["sha256"]) for s in sources]:
        return False
    try:
        check_files(out, meta, str(out))
    except UserError:
        return False
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary directories that a killed prepare of the same --out left (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.prepare-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not (tmp / _TMP_MARK).exists() or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an earlier output is replaced only then."""
    (tmp / _TMP_MARK).unlink()
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)  # onto a missing or empty directory


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What `prepare` did: the output directory, its metadata, and whether it was already up to date."""

    out: Path
    meta: dict[str, Any]
    up_to_date: bool = False


def usable_cores() -> int:
    """Cores this process may run on (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _bar(total: int, desc: str, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not show, leave=False, file=sys.stderr)


def prepare(
    sources: Sequence[str | Path],
    out: str | Path,
    tokenizer: str = "bytes",
    *,
    field: str = "text",
    val_fraction: float = 0.1,
    jobs: int | None = None,
    piece_bytes: int = PIECE_BYTES,
    progress: bool | None = None,
    quiet: bool = False,
) -> Prepared:
    """Turn sources into a tokens directory at `out` (the module docstring has the details)."""
    start = time.perf_counter()
    log: Callable[[str], None] = (lambda _: None) if quiet else (lambda m: print(f"regimen: {m}", file=sys.stderr))
    show = sys.stderr.isatty() if progress is None else progress
    jobs = usable_cores() if jobs is None else jobs
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: must be >= 1")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction:g}: must be in [0, 1)")
    spec = TokenizerSpec.parse(tokenizer)
    out = Path(out).expanduser().absolute()
    previous = _check_out(out)
    try:
        inputs = find_inputs(sources, exclude=out.resolve())
        sources_fp = fingerprint(inputs, previous.get("sources", []) if previous else [])
    except OSError as e:
        raise UserError(f"prepare: cannot read {e.filename or 'a source'} ({e.strerror or e})") from None
    identity = {"version": VERSION, "tokenizer": spec.identity(), "field": field, "val_fraction": val_fraction, "piece_bytes": piece_bytes}
    if previous is not None and _up_to_date(out, previous, identity, sources_fp):
        log(f"{out} is up to date ({len(sources_fp)} source file(s) and the options unchanged); nothing to do")
        return Prepared(out, previous, up_to_date=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.prepare-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # our own pid's: a leftover of this very process
    tmp.mkdir()
    (tmp / _TMP_MARK).write_text("a regimen prepare in progress; removed when it ends\n")
    try:
        total_in = sum(s["size"] for s in sources_fp)
        with _bar(total_in, "reading", show) as bar:
            plan = make_plan(inputs, field, piece_bytes, val_fraction, spec.kind != "bytes", bar.update)
        codec, extra = _build_tokenizer(spec, plan, inputs, field, piece_bytes, show, log)
        dtype = dtype_for(codec.vocab_size if codec.kind == "tokenizer" else 256)
        encoder = Encoder(codec.kind, codec.tokenizer_json or "", codec.eot_id, dtype)
        names = {"train": "train.bin", "val": "val.bin"}
        has_val = bool(plan.val.any())
        with contextlib.ExitStack() as stack:
            writers = {s: SplitWriter(stack.enter_context((tmp / names[s]).open("wb"))) for s in names if s == "train" or has_val}
            with _bar(plan.total_bytes, f"encoding ({jobs} job{'s' if jobs > 1 else ''})", show) as bar:
                encode_all(plan.pieces(inputs, field, piece_bytes), encoder, jobs, writers, bar.update)
            for w in writers.values():
                w.file.flush()
                os.fsync(w.file.fileno())
        if codec.kind == "tokenizer":
            (tmp / TOKENIZER).write_text(codec.tokenizer_json or "")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype,
            "vocab_size": codec.vocab_size,
            "tokenizer": {
                "kind": spec.kind,
                "eot_id": codec.eot_id,
                "separator": "newline" if codec.kind == "bytes" else ("end-of-text token" if codec.eot_id is not None else "none"),
                **extra,
            },
            "field": field,
            "val_fraction": val_fraction,
            "piece_bytes": piece_bytes,
            "identity": identity,
            "sources": sources_fp,
            "splits": {s: w.counts(names[s]) for s, w in writers.items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")  # last: it is what makes the directory readable
        _publish(tmp, out)
    except OSError as e:  # an unreadable source, a full disk: one line, and DIR as it was
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "it was left as it was" if out.exists() else "nothing was written"
        raise UserError(f"prepare: {e.strerror or e} ({e.filename or out}); {out} {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report(meta, out, time.perf_counter() - start, log)
    return Prepared(out, meta)


def _build_tokenizer(
    spec: TokenizerSpec, plan: Plan, inputs: Sequence[Input], field: str, piece_bytes: int, show: bool, log: Callable[[str], None]
) -> tuple[Any, dict[str, Any]]:
    """The codec to encode with, and what the metadata records about it."""
    from regimen.tokens import TextCodec

    if spec.kind == "bytes":
        return TextCodec.bytes(), {}
    if spec.kind == "file":
        assert spec.path is not None
        codec = TextCodec.from_json(spec.text, str(spec.path))
        return codec, {"source": str(spec.path), "sha256": hashlib.sha256(spec.text.encode()).hexdigest()}
    train_texts = (p.data.decode("utf-8") for p, is_val in plan.pieces(inputs, field, piece_bytes) if not is_val)
    log(f"training a byte-level BPE of {spec.vocab:,} tokens on {int((~plan.val).sum()):,} training piece(s)")
    tokenizer = train_bpe(train_texts, spec.vocab, int((~plan.val).sum()), show)
    text = tokenizer.to_str()
    codec = TextCodec("tokenizer", text, end_of_text_id(tokenizer), vocab_size_of(tokenizer))
    if codec.vocab_size < spec.vocab:
        log(f"the BPE has {codec.vocab_size:,} tokens, not {spec.vocab:,}: the corpus has no more pairs seen twice to merge")
    return codec, {"vocab_requested": spec.vocab}


def _report(meta: dict[str, Any], out: Path, seconds: float, log: Callable[[str], None]) -> None:
    splits = meta["splits"]
    train, val = splits["train"], splits.get("val")
    text_bytes = train["bytes"] + (val["bytes"] if val else 0)
    ratio = text_bytes / max(train["tokens"] + (val["tokens"] if val else 0), 1)
    val_part = f"{val['tokens']:,} val tokens ({val['documents']:,} documents)" if val else "no validation split"
    log(
        f"wrote {out}: {train['tokens']:,} train tokens ({train['documents']:,} documents), {val_part}; "
        f"{text_bytes / 1e6:.2f} MB of text, {ratio:.2f} bytes/token, vocabulary {meta['vocab_size']:,} ({meta['dtype']}); "
        f"{seconds:.1f} s"
    )


def run(args: argparse.Namespace) -> int:
    """`regimen prepare SOURCE... --out DIR [--tokenizer] [--field] [--val-fraction] [--jobs]`."""
    jobs = args.jobs if args.jobs is not None else usable_cores()
    # The BPE trainer runs on the tokenizers' own thread pool: size it before its first use.
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(jobs, 1)))
    prepare(args.sources, args.out, args.tokenizer, field=args.field, val_fraction=args.val_fraction, jobs=jobs)
    return 0
