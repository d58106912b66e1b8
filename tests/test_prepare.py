"""`regimen prepare` and the `tokens:DIR` source it feeds.

Oracles: the raw bytes of the files (bytes mode), and the `tokenizers` library encoding each
document directly, followed by the end-of-text token (every other mode). Every bad input must
give one line, exit code 2, and leave nothing in --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from regimen.errors import UserError
from regimen.prepare import choose_val, find_inputs, prepare, read_pieces, split_pieces
from regimen.tokens import check_files, read_meta
from tests.conftest import ROOT, TINY_GPT, need

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Documents whose line breaks test the piece cuts: runs of spaces or newlines before a break
# must not be cut (GPT-2's pre-tokenizer joins whitespace up to the end of a string).
TRICKY = "a  \nb\n\nc\t\nd\n e\nf\n\n\ng \n\nh\nx = [1,\n  2]\nok\nend"


def stdlib_docs(n: int, skip: int = 0) -> list[str]:
    """Small real documents: the starts of some standard-library modules."""
    files = sorted(STDLIB.glob("*.py"))[skip : skip + n]
    return [p.read_text(encoding="utf-8", errors="replace")[:3000] for p in files]


def write_texts(directory: Path, docs: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return directory


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def bins(out: Path) -> tuple[np.ndarray, np.ndarray | None]:
    meta = json.loads((out / "meta.json").read_text())
    val = out / "val.bin"
    return np.fromfile(out / "train.bin", dtype=meta["dtype"]), (np.fromfile(val, dtype=meta["dtype"]) if val.exists() else None)


def expected_stream(tokenizer_json: Path, docs: list[str]) -> list[int]:
    """The oracle: each document encoded by `tokenizers` itself, then the end-of-text token."""
    tokenizers = need("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    eot = tok.token_to_id("<|endoftext|>")
    out: list[int] = []
    for doc in docs:
        out += [*tok.encode(doc, add_special_tokens=False).ids, eot]
    return out


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [*stdlib_docs(6), TRICKY, "ünïcödé text — with “quotes” and emoji 🙂\n"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    """The documents as text files, prepared with a trained BPE of 300 tokens and no validation."""
    need("tokenizers")
    root = tmp_path_factory.mktemp("bpe")
    return prepare([write_texts(root / "texts", docs)], root / "out", "bpe:300", val_fraction=0, jobs=1, quiet=True).out


# --------------------------------------------------------------------------------------------
# The token stream of each input format
# --------------------------------------------------------------------------------------------


def test_bytes_mode_is_the_raw_bytes_of_the_files(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "t", ["first file\n", "second, no newline", "third\n\n"])
    out = prepare([texts], tmp_path / "out", "bytes", val_fraction=0, quiet=True).out
    train, val = bins(out)
    # Files are joined as `cat` joins them; a document without a final newline gets one.
    assert train.tobytes() == np.frombuffer(b"first file\nsecond, no newline\nthird\n\n", np.uint8).astype(np.uint16).tobytes()
    assert val is None and not (out / "tokenizer.json").exists()
    meta = read_meta(out, "x")
    assert meta is not None and (meta["dtype"], meta["vocab_size"], meta["tokenizer"]["kind"]) == ("uint16", 256, "bytes")
    assert meta["splits"]["train"]["bytes"] == len(b"first file\nsecond, no newline\nthird\n\n") - 1  # the added newline is not text


def test_trained_bpe_gives_the_tokenizers_own_encoding(bpe_dir: Path, docs: list[str]) -> None:
    train, _ = bins(bpe_dir)
    meta = read_meta(bpe_dir, "x")
    assert meta is not None and meta["vocab_size"] == 300 and meta["tokenizer"]["eot_id"] == 0
    assert train.tolist() == expected_stream(bpe_dir / "tokenizer.json", docs)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dataset", "dataset_dict"])
def test_every_format_gives_the_same_stream(tmp_path: Path, bpe_dir: Path, docs: list[str], fmt: str) -> None:
    """jsonl, parquet and a saved `datasets` dataset, through a loaded tokenizer.json: the same tokens as the text files."""
    if fmt == "jsonl":
        source = write_jsonl(tmp_path / "docs.jsonl", docs, field="body")
    elif fmt == "parquet":
        pa, pq = need("pyarrow"), need("pyarrow.parquet")
        source = tmp_path / "docs.parquet"
        # Two row groups: the reader must go on past the first.
        pq.write_table(pa.table({"n": list(range(len(docs))), "body": docs}), source, row_group_size=3)
    else:
        datasets = need("datasets")
        half = len(docs) // 2
        if fmt == "dataset":
            datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
        else:  # a DatasetDict: its splits in order
            parts = {"a": docs[:half], "b": docs[half:]}
            datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v}) for k, v in parts.items()}).save_to_disk(str(tmp_path / "ds"))
        source = tmp_path / "ds"
    out = prepare([source], tmp_path / "out", str(bpe_dir / "tokenizer.json"), field="body", val_fraction=0, jobs=1, quiet=True).out
    assert bins(out)[0].tolist() == bins(bpe_dir)[0].tolist()
    assert (out / "tokenizer.json").read_text() == (bpe_dir / "tokenizer.json").read_text()


def test_pieces_of_long_documents_encode_like_the_whole_documents(tmp_path: Path, bpe_dir: Path, docs: list[str]) -> None:
    """Cut into ~64-byte pieces (and encoded on 2 processes), the stream is unchanged."""
    out = prepare(
        [bpe_dir.parent / "texts"], tmp_path / "out", str(bpe_dir / "tokenizer.json"), val_fraction=0, jobs=2, piece_bytes=64, quiet=True
    )
    assert out.meta["splits"]["train"]["pieces"] > 5 * len(docs)
    assert bins(out.out)[0].tolist() == bins(bpe_dir)[0].tolist()


def test_a_cut_after_any_newline_would_change_the_pre_tokens(bpe_dir: Path) -> None:
    """The cut rule is not vacuous: GPT-2's pre-tokenizer (BPE merges within its words only) splits
    TRICKY's pieces as it splits the whole, but not the pieces of a cut after every newline."""
    tokenizers = need("tokenizers")
    pre = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json")).pre_tokenizer

    def words(parts: list[str]) -> list[str]:
        return [w for part in parts for w, _ in pre.pre_tokenize_str(part)]

    whole = words([TRICKY])
    assert words([p.decode() for _, p in split_pieces([TRICKY.encode()], 1)]) == whole
    assert words(TRICKY.splitlines(keepends=True)) != whole


def test_split_pieces_cuts_only_between_printable_characters() -> None:
    pieces = [p for _, p in split_pieces([b"ab\n", b"cd\n\nef \ngh"], 1)]
    assert b"".join(pieces) == b"ab\ncd\n\nef \ngh"
    assert pieces == [b"ab\n", b"cd\n\nef \ngh"]  # not after "\n\n", not after " \n"


# --------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------


def test_val_split_is_by_document_content_and_the_same_for_every_tokenizer(tmp_path: Path, docs: list[str]) -> None:
    need("tokenizers")
    texts = write_texts(tmp_path / "t", stdlib_docs(20, skip=10))
    files = sorted(texts.iterdir())
    a = prepare([texts], tmp_path / "a", "bytes", val_fraction=0.25, quiet=True).meta
    b = prepare(list(reversed(files)), tmp_path / "b", "bytes", val_fraction=0.25, quiet=True).meta  # another order
    c = prepare([texts], tmp_path / "c", "bpe:300", val_fraction=0.25, jobs=1, quiet=True).meta
    total = a["splits"]["train"]["bytes"] + a["splits"]["val"]["bytes"]
    assert a["splits"]["val"]["bytes"] >= 0.25 * total and a["splits"]["val"]["documents"] < 20
    assert a["splits"]["val"]["bytes"] == b["splits"]["val"]["bytes"] == c["splits"]["val"]["bytes"]
    # The val stream of bytes is exactly the val documents: each file either wholly in it or not.
    val = bins(tmp_path / "a")[1]
    assert val is not None
    val_text = val.astype(np.uint8).tobytes()
    inside = [f for f in files if f.read_bytes() in val_text]
    assert sum(len(f.read_bytes()) for f in inside) == a["splits"]["val"]["bytes"]


def test_choose_val_takes_the_smallest_hashes_and_leaves_a_training_piece() -> None:
    sizes = np.array([10, 10, 10])
    assert choose_val(np.array([3, 2, 1]), sizes, 0.5).tolist() == [False, True, True]
    assert choose_val(np.array([3, 2, 1]), sizes, 0.99).tolist() == [False, True, True]
    assert not choose_val(np.array([1]), np.array([5]), 0.5).any()


def test_a_single_document_is_cut_at_a_line_break(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    (tmp_path / "one.txt").write_text(text)
    train, val = bins(prepare([tmp_path / "one.txt"], tmp_path / "out", "bytes", val_fraction=0.1, quiet=True).out)
    assert val is not None
    head, tail = train.astype(np.uint8).tobytes(), val.astype(np.uint8).tobytes()
    assert head + tail == text.encode() and head.endswith(b"\n") and 0.09 <= len(tail) / len(text) <= 0.12


def test_read_pieces_marks_the_end_of_each_document(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["aa\nbb", "", "cc"])
    pieces = list(read_pieces(find_inputs([path]), "text", 1))
    assert [(p.data, p.end) for p in pieces] == [(b"aa\n", False), (b"bb", True), (b"cc", True)]  # the empty one is skipped


# --------------------------------------------------------------------------------------------
# Reruns and the output directory
# --------------------------------------------------------------------------------------------


def test_a_rerun_does_nothing_and_a_changed_file_is_encoded_again(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "t", ["alpha\n", "beta\n", "gamma\n"])
    out = tmp_path / "out"
    first = prepare([texts], out, "bytes", val_fraction=0, quiet=True)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    again = prepare([texts], out, "bytes", val_fraction=0, jobs=3, quiet=True)  # --jobs does not change the output
    assert again.up_to_date and not first.up_to_date
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before
    # Touched but unchanged: the hash decides, still nothing to do.
    os.utime(texts / "doc01.txt", ns=(1, 1))
    assert prepare([texts], out, "bytes", val_fraction=0, quiet=True).up_to_date
    # Changed: encoded again, with the new text.
    (texts / "doc01.txt").write_text("BETA!\n")
    changed = prepare([texts], out, "bytes", val_fraction=0, quiet=True)
    assert not changed.up_to_date
    assert bins(out)[0].astype(np.uint8).tobytes() == b"alpha\nBETA!\ngamma\n"
    # Another option: encoded again.
    assert not prepare([texts], out, "bytes", val_fraction=0.3, quiet=True).up_to_date
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t"]  # no temporary directory left


def test_a_failure_midway_leaves_the_previous_output_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import regimen.prepare as prep

    texts = write_texts(tmp_path / "t", ["one\n", "two\n"])
    out = tmp_path / "out"
    prepare([texts], out, "bytes", val_fraction=0, quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (texts / "doc00.txt").write_text("ONE, changed\n")

    def interrupted(self, pieces, ends):  # Ctrl-C in the middle of encoding
        raise KeyboardInterrupt

    monkeypatch.setattr(prep.Encoder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([texts], out, "bytes", val_fraction=0, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t"]


def test_an_out_with_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "t", ["x\n"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a prepare output"):
        prepare([texts], out, "bytes", quiet=True)
    prepare([texts], tmp_path / "ok", "bytes", val_fraction=0, quiet=True)
    (tmp_path / "ok" / "notes.txt").write_text("mine too")
    with pytest.raises(UserError, match=r"holds files prepare did not write \(notes.txt\)"):
        prepare([texts], tmp_path / "ok", "bytes", val_fraction=0.5, quiet=True)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "ok" / "notes.txt").read_text() == "mine too"


# --------------------------------------------------------------------------------------------
# uint32 and the tokens:DIR source
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A word-level tokenizer of 70,000 words (built, not trained) and a corpus that uses ids past 65,535."""
    tokenizers = need("tokenizers")
    from tokenizers import models, pre_tokenizers

    root = tmp_path_factory.mktemp("wide")
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(60_000, 70_000, 300)) for _ in range(4)]
    write_jsonl(root / "words.jsonl", docs)
    out = prepare([root / "words.jsonl"], root / "out", str(root / "tokenizer.json"), val_fraction=0.25, jobs=1, quiet=True).out
    return out, [i for d in docs for i in [*tok.encode(d).ids, 0]]


def test_a_vocabulary_past_65535_is_stored_as_uint32(wide_tokens: tuple[Path, list[int]]) -> None:
    out, stream = wide_tokens
    meta = read_meta(out, "x")
    assert meta is not None and (meta["dtype"], meta["vocab_size"]) == ("uint32", 70_002)
    train, val = bins(out)
    assert val is not None and max(train.max(), val.max()) > 65_535
    assert sorted([*train.tolist(), *val.tolist()]) == sorted(stream)  # every token, in one split or the other
    assert (out / "train.bin").stat().st_size == 4 * len(train)


def test_tokens_dir_reads_uint32_and_trains(wide_tokens: tuple[Path, list[int]], tmp_path: Path, one_thread: None) -> None:
    from regimen.data import load_source
    from regimen.runner import run_training
    from regimen.strategy import Strategy

    out, _ = wide_tokens
    s = Strategy.load(
        None,
        [*TINY_GPT, f"data.source=tokens:{out}", "train.steps=3", "train.eval_every=3", "observe.progress=none", "observe.report=false"],
    )
    data = load_source(s.data, s.model.context)
    assert data.vocab_size == 70_002 and data.train.gather(np.array([0]))[0].max() > 65_535  # type: ignore[union-attr]
    assert run_training(s, tmp_path / "run", quiet=True) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["final_val_loss"])
    meta = json.loads((tmp_path / "run" / "tokens_meta.json").read_text())  # the run keeps its tokenizer
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    per = meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"]
    assert summary["final_val_loss_per_byte"] == pytest.approx(summary["final_val_loss"] / per)
    assert summary["best_val_loss_per_byte"] == pytest.approx(summary["best_val_loss"] / per)


def test_tokens_dir_without_meta_is_read_as_uint16(tmp_path: Path) -> None:
    from regimen.data import load_source
    from regimen.strategy import DataConfig

    np.arange(300, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "val.bin")
    data = load_source(DataConfig(source=f"tokens:{tmp_path}"), context=8)
    assert data.vocab_size == 300 and data.codec is None and data.bytes_per_token is None
    assert data.train.gather(np.array([1]))[0].tolist() == [list(range(8, 16))]  # type: ignore[union-attr]


def test_tokens_dir_without_val_bin_warns_and_has_no_validation(tmp_path: Path) -> None:
    from regimen.data import load_source
    from regimen.strategy import DataConfig

    texts = write_texts(tmp_path / "t", ["some text\n" * 20])
    out = prepare([texts], tmp_path / "out", "bytes", val_fraction=0, quiet=True).out
    with pytest.warns(UserWarning, match="no val.bin, so the run has no validation"):
        data = load_source(DataConfig(source=f"tokens:{out}"), context=8)
    assert data.val is None and data.vocab_size == 256


def test_tokens_dir_whose_files_disagree_with_the_metadata_is_refused(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "t", stdlib_docs(4))
    out = prepare([texts], tmp_path / "out", "bytes", val_fraction=0.3, quiet=True).out
    with (out / "val.bin").open("ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match=r"val.bin has [\d,]+ bytes but meta.json says"):
        check_files(out, json.loads((out / "meta.json").read_text()), "x")
    os.remove(out / "val.bin")
    with pytest.raises(UserError, match=r"lists val\.bin"):
        check_files(out, json.loads((out / "meta.json").read_text()), "x")


# --------------------------------------------------------------------------------------------
# Bad input on the command line: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "ok.txt").write_text("fine text\n")
    (tmp / "bad.jsonl").write_text('{"text": "a"}\n{"text": broken\n')
    (tmp / "nofield.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "empty" / "blank.txt").write_text("")
    (tmp / "tok.json").write_text('{"version": "1.0", "model": ')
    cases = {
        "missing source": ([str(tmp / "nope.txt")], "source '" + str(tmp / "nope.txt") + "' does not exist"),
        "not json": ([str(tmp / "bad.jsonl")], f"{tmp / 'bad.jsonl'}:2: not a JSON line"),
        "no field": ([str(tmp / "nofield.jsonl")], f"{tmp / 'nofield.jsonl'}:3: no field 'text' (it has: body)"),
        "empty corpus": ([str(tmp / "empty")], "the corpus is empty"),
        "small vocab": ([str(tmp / "ok.txt"), "--tokenizer", "bpe:256"], "the vocabulary must be at least 257"),
        "bad tokenizer": ([str(tmp / "ok.txt"), "--tokenizer", str(tmp / "tok.json")], "is not a valid tokenizer.json"),
    }
    return cases


@pytest.mark.parametrize("case", ["missing source", "not json", "no field", "empty corpus", "small vocab", "bad tokenizer"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, cli, case: str) -> None:
    if case in ("small vocab", "bad tokenizer"):
        need("tokenizers")
    args, message = _bad_inputs(tmp_path / "in")[case]
    result = cli("prepare", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regimen: error: ") and message in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no --out, no temporary directory


def test_parquet_without_the_column_is_one_line(tmp_path: Path, cli) -> None:
    pa, pq = need("pyarrow"), need("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "d.parquet")
    result = cli("prepare", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"regimen: error: {tmp_path / 'd.parquet'}: no column 'text' (it has: content); choose it with --field"
    assert not (tmp_path / "out").exists()


def test_training_on_a_tokens_dir_that_disagrees_with_its_metadata_is_one_line(tmp_path: Path, cli) -> None:
    texts = write_texts(tmp_path / "t", stdlib_docs(3))
    out = prepare([texts], tmp_path / "out", "bytes", val_fraction=0, quiet=True).out
    with (out / "train.bin").open("ab") as f:
        f.write(b"\0\0\0\0")
    result = cli("train", *TINY_GPT, f"data.source=tokens:{out}", "train.steps=1", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "train.bin has" in result.stderr and "re-run regimen prepare" in result.stderr


def test_prepare_cli_writes_and_reruns(tmp_path: Path, cli) -> None:
    texts = write_texts(tmp_path / "t", stdlib_docs(3))
    first = cli("prepare", str(texts), "--out", str(tmp_path / "out"), "--jobs", "1")
    assert first.returncode == 0, first.stderr
    assert "train tokens" in first.stderr
    again = cli("prepare", str(texts), "--out", str(tmp_path / "out"))
    assert again.returncode == 0 and "is up to date" in again.stderr and "nothing to do" in again.stderr


def test_regimen_imports_none_of_the_data_extras(cli) -> None:
    """`regimen --help` and config handling stay fast without tokenizers, datasets or pyarrow."""
    extras = "('tokenizers', 'datasets', 'pyarrow')"
    code = f"import sys, regimen.cli, regimen.prepare, regimen.tokens; print(sorted(m for m in {extras} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_run_keeps_its_tokenizer_and_refuses_another(tmp_path: Path, bpe_dir: Path, wide_tokens: tuple[Path, list[int]]) -> None:
    from regimen.tokens import write_run_codec

    run = tmp_path / "run"
    run.mkdir()
    meta = read_meta(bpe_dir, "x")
    write_run_codec(run, bpe_dir, meta)
    write_run_codec(run, bpe_dir, meta)  # a resume with the same tokenizer
    assert (run / "tokenizer.json").read_text() == (bpe_dir / "tokenizer.json").read_text()
    with pytest.raises(UserError, match="trained with another tokenizer"):
        write_run_codec(run, wide_tokens[0], read_meta(wide_tokens[0], "x"))
    assert (run / "tokenizer.json").read_text() == (bpe_dir / "tokenizer.json").read_text()


def test_an_out_inside_a_source_is_not_read_back(tmp_path: Path) -> None:
    texts = write_texts(tmp_path / "t", ["alpha\n", "beta\n"])
    first = prepare([texts], texts / "tokens", "bytes", val_fraction=0, quiet=True)
    assert len(first.meta["sources"]) == 2
    assert prepare([texts], texts / "tokens", "bytes", val_fraction=0, quiet=True).up_to_date


def test_os_errors_are_one_line_and_leave_out_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable source, a full disk: one UserError line; the previous output is untouched."""
    import regimen.prepare as prep

    texts = write_texts(tmp_path / "t", ["alpha\n"])
    out = prepare([texts], tmp_path / "out", "bytes", val_fraction=0, quiet=True).out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (texts / "doc00.txt").write_text("changed\n")

    def unreadable(f, digest):  # what open() or read() raises on a file without read permission
        raise PermissionError(13, "Permission denied", str(texts / "doc00.txt"))

    with monkeypatch.context() as m:
        m.setattr(prep.hashlib, "file_digest", unreadable)
        with pytest.raises(UserError, match=r"cannot read .*doc00.txt \(Permission denied\)"):
            prepare([texts], out, "bytes", val_fraction=0, quiet=True)

    def disk_full(self, ids):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(prep.SplitWriter, "write", disk_full)
    with pytest.raises(UserError, match=r"No space left on device .* it was left as it was"):
        prepare([texts], out, "bytes", val_fraction=0, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t"]
