"""A tokens directory (what `regimen prepare` writes) and the codec between its token ids and text.

Layout of a tokens directory:

```
train.bin        the training tokens, back to back (uint16, or uint32 past 65,536 ids)
val.bin          the validation tokens (absent when there is no validation split)
tokenizer.json   the Hugging Face tokenizer (absent for bytes)
meta.json        written last: format, dtype, vocabulary, tokenizer, sources, counts per split
```

`meta.json` is what makes the directory readable: `data.source = "tokens:DIR"` takes the dtype
and the vocabulary from it, refuses a directory whose files disagree with it, and reports the
loss per byte of text from its byte and token counts. A directory without `meta.json` (nanoGPT's
`prepare.py` output) is read as uint16, as before.

A `TextCodec` turns text into token ids and back: bytes (ids 0-255, one per byte of UTF-8) or a
Hugging Face `tokenizer.json`. A run keeps its codec in its run directory (`tokenizer.json`
and `tokens_meta.json`) so that `regimen sample` needs nothing else.

Example:
    >>> codec = TextCodec.bytes()
    >>> codec.encode("hé"), codec.decode([104, 195, 169])
    ([104, 195, 169], 'hé')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from regimen.errors import UserError

FORMAT = "regimen-tokens"
VERSION = 1
META = "meta.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": 2, "uint32": 4}
# Names under which tokenizers keep their end-of-text token; the first one present separates
# documents (GPT-2's is the first, and what `prepare` trains).
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
# What a run directory keeps of its tokens directory.
RUN_TOKENIZER = "tokenizer.json"
RUN_META = "tokens_meta.json"
DATA_EXTRA = "pip install 'regimen[data]'"


def dtype_for(vocab_size: int) -> str:
    """The narrowest dtype that holds every id of a vocabulary.

    >>> dtype_for(50257), dtype_for(65536), dtype_for(65537)
    ('uint16', 'uint16', 'uint32')
    """
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def import_tokenizers() -> Any:
    """The `tokenizers` package, or one line saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"Hugging Face tokenizers is not installed: {DATA_EXTRA}") from None
    return tokenizers


def parse_tokenizer(text: str, where: str) -> Any:
    """A `tokenizers.Tokenizer` from the text of a tokenizer.json; one line when it does not parse."""
    tokenizers = import_tokenizers()
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise UserError(f"{where} is not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def end_of_text_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's end-of-text token (the document separator), if it has one."""
    for name in END_OF_TEXT:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    return None


def vocab_size_of(tokenizer: Any) -> int:
    """One past the largest id (ids may have gaps, so not always `get_vocab_size()`)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


@dataclass
class TextCodec:
    """Text <-> token ids: `bytes` (UTF-8 bytes as ids) or a Hugging Face tokenizer.json.

    `eot_id` is the end-of-text token that separates documents (None for bytes, which separate
    documents with a newline). An empty prompt starts from it (or from a newline).

    Example:
        >>> TextCodec.bytes().start_ids()
        [10]
    """

    kind: Literal["bytes", "tokenizer"]
    tokenizer_json: str | None = None
    eot_id: int | None = None
    vocab_size: int = 256
    _tokenizer: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def bytes(cls) -> TextCodec:
        return cls("bytes")

    @classmethod
    def from_json(cls, text: str, where: str) -> TextCodec:
        """A codec from the text of a tokenizer.json (`where` names it in errors)."""
        tokenizer = parse_tokenizer(text, where)
        codec = cls("tokenizer", text, end_of_text_id(tokenizer), vocab_size_of(tokenizer))
        codec._tokenizer = tokenizer
        return codec

    @property
    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` (loaded on first use)."""
        if self._tokenizer is None:
            assert self.tokenizer_json is not None
            self._tokenizer = parse_tokenizer(self.tokenizer_json, TOKENIZER)
        return self._tokenizer

    def available(self) -> str | None:
        """Why this codec cannot encode and decode here (None when it can)."""
        if self.kind == "bytes":
            return None
        try:
            self.tokenizer  # noqa: B018
        except UserError as e:
            return str(e)
        return None

    def encode(self, text: str) -> list[int]:
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        if self.kind == "bytes":
            return bytes(ids).decode("utf-8", errors="replace")
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def start_ids(self) -> list[int]:
        """What generation starts from when the prompt is empty: a document boundary."""
        if self.eot_id is not None:
            return [self.eot_id]
        return self.encode("\n")


# --------------------------------------------------------------------------------------------
# Reading a tokens directory
# --------------------------------------------------------------------------------------------


def read_meta(directory: Path, where: str) -> dict[str, Any] | None:
    """The directory's meta.json (None when it has none); one line when it is not ours or is corrupt."""
    path = directory / META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{where}: {META} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f'{where}: {META} is not a regimen tokens metadata file (no "format": "{FORMAT}")')
    if meta.get("version", 0) > VERSION:
        raise UserError(f"{where}: {META} has format version {meta.get('version')}; this regimen reads up to {VERSION}: upgrade regimen")
    return meta


def check_files(directory: Path, meta: dict[str, Any], where: str) -> None:
    """Every split the metadata lists is there with the size its token count says, and no other.

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "train.bin").write_bytes(b"\\0" * 6)
        6
        >>> check_files(d, {"dtype": "uint16", "vocab_size": 256, "splits": {"train": {"tokens": 3}}}, "tokens:" + str(d))
    """
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise UserError(f"{where}: {META} has dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1 or (dtype == "uint16" and vocab > 1 << 16):
        raise UserError(f"{where}: {META} has vocab_size {vocab!r}, which {dtype} cannot hold")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise UserError(f"{where}: {META} lists no train split")
    for split in SPLITS:
        path = directory / f"{split}.bin"
        info = splits.get(split)
        if info is None:
            if path.exists():
                raise UserError(f"{where}: {path.name} is there but {META} lists no {split} split; re-run regimen prepare")
            continue
        if not path.exists():
            raise UserError(
                f"{where}: {META} lists {path.name} ({info.get('tokens')} tokens) but there is no such file; re-run regimen prepare"
            )
        expected = int(info.get("tokens", -1)) * DTYPES[dtype]
        size = path.stat().st_size
        if size != expected:
            raise UserError(
                f"{where}: {path.name} has {size:,} bytes but {META} says {info.get('tokens')} {dtype} tokens "
                f"({expected:,} bytes); the directory was changed after prepare: re-run regimen prepare"
            )


def bytes_per_token(meta: dict[str, Any]) -> dict[str, float]:
    """Bytes of original text per token, per split (the factor from nats/token to nats/byte).

    >>> bytes_per_token({"splits": {"train": {"tokens": 10, "bytes": 35}, "val": {"tokens": 0, "bytes": 0}}})
    {'train': 3.5}
    """
    out = {}
    for split, info in meta.get("splits", {}).items():
        if info.get("tokens") and info.get("bytes"):
            out[split] = info["bytes"] / info["tokens"]
    return out


def codec_of(directory: Path, meta: dict[str, Any], where: str) -> TextCodec:
    """The codec of a tokens directory (or of a run directory that keeps one), from its meta.json."""
    kind = meta.get("tokenizer", {}).get("kind")
    if kind == "bytes":
        return TextCodec.bytes()
    path = directory / TOKENIZER
    if not path.exists():
        raise UserError(f"{where}: {META} names a {kind} tokenizer but there is no {TOKENIZER}")
    # Parsed on first use: training needs only the ids, not the tokenizers package.
    return TextCodec("tokenizer", path.read_text(), meta["tokenizer"].get("eot_id"), int(meta["vocab_size"]))


# --------------------------------------------------------------------------------------------
# What a run directory keeps of its tokenizer
# --------------------------------------------------------------------------------------------


def write_run_codec(run_dir: Path, tokens_dir: Path | None, meta: dict[str, Any] | None) -> None:
    """Copy a tokens directory's meta.json and tokenizer.json into a run directory (once).

    A resumed run whose tokens directory now holds another tokenizer is refused: its tokens
    would no longer mean what the checkpoint learned.
    """
    if tokens_dir is None or meta is None:
        return
    wanted = {RUN_META: json.dumps(meta, indent=1) + "\n"}
    if (tokens_dir / TOKENIZER).exists():
        wanted[RUN_TOKENIZER] = (tokens_dir / TOKENIZER).read_text()
    for name, text in wanted.items():
        path = run_dir / name
        if path.exists():
            if name == RUN_TOKENIZER and path.read_text() != text:
                raise UserError(
                    f"{path} differs from {tokens_dir / TOKENIZER}: the run was trained with another tokenizer; "
                    "use a new run directory (or --overwrite)"
                )
            if name == RUN_TOKENIZER:
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def read_run_codec(run_dir: Path, source: str) -> TextCodec | None:
    """The codec a run trained with: its copied tokenizer, or bytes for the byte sources; None if unknown."""
    meta_path = run_dir / RUN_META
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise UserError(f"{meta_path} is not readable JSON ({e})") from None
        return codec_of(run_dir, meta, str(run_dir))
    if source.split(":", 1)[0] in ("stdlib", "text"):
        return TextCodec.bytes()
    return None
