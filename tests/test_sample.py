"""`regimen sample` and the samples a run writes at each evaluation.

Oracles: a plain greedy loop over the model's own logits (the sliding window), the same run's
checkpoint against its exported weights, and the tokenizer's own encoding of the prompt.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest
import torch

from regimen.errors import UserError
from regimen.models import GPT, GPTConfig
from regimen.report_html import samples_section as samples_html
from regimen.rundir import read_samples
from regimen.sample import TEMPERATURE, TOP_K, generate, load_run_model, sample_run
from tests.conftest import TINY_GPT, need

QUIET = ["observe.progress=none", "observe.report=false"]


def train_run(run_dir: Path, source: str, *extra: str) -> Path:
    from regimen.runner import run_training
    from regimen.strategy import Strategy

    s = Strategy.load(
        None, [*TINY_GPT, f"data.source={source}", "train.steps=4", "train.eval_every=2", "checkpoint.every=2", *QUIET, *extra]
    )
    assert run_training(s, run_dir, quiet=True) == 0
    return run_dir


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path, one_thread: None) -> Path:
    return train_run(tmp_path_factory.mktemp("bytes") / "run", f"text:{corpus}")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path, one_thread: None) -> Path:
    need("tokenizers")
    from regimen.prepare import prepare

    root = tmp_path_factory.mktemp("bpe")
    tokens = prepare([corpus], root / "tokens", "bpe:320", val_fraction=0.1, jobs=1, piece_bytes=4096, quiet=True).out
    return train_run(root / "run", f"tokens:{tokens}")


def test_generate_is_a_greedy_loop_over_a_sliding_window() -> None:
    """Temperature 0 past the context: each token is the argmax of the model on the last `context` tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context=6, n_layer=1, n_head=2, d_model=16)).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]  # longer than the context already
    ids = generate(model, prompt, 10, context=6, temperature=0)
    oracle = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            oracle.append(int(model(torch.tensor([oracle[-6:]]))[0, -1].argmax()))
    assert ids == oracle


def test_top_k_1_is_greedy() -> None:
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=40, context=8, n_layer=1, n_head=1, d_model=16)).eval()
    greedy = generate(model, [1, 2], 12, context=8, temperature=0)
    assert generate(model, [1, 2], 12, context=8, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(3)) == greedy


@pytest.mark.parametrize("which", ["byte_run", "bpe_run"])
def test_sample_is_deterministic_for_a_seed_and_starts_with_the_prompt(which: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(which)
    prompt = "def main(argv):\n    "
    a = sample_run(run, prompt, 40, seed=7)
    assert a.ids == sample_run(run, prompt, 40, seed=7).ids
    assert a.ids != sample_run(run, prompt, 40, seed=8).ids
    assert a.ids[: len(a.prompt_ids)] == a.prompt_ids and len(a.ids) == len(a.prompt_ids) + 40
    assert a.text.startswith(prompt)
    if which == "bpe_run":  # the prompt's ids are the run's tokenizer's own encoding
        tokenizers = need("tokenizers")
        tok = tokenizers.Tokenizer.from_file(str(run / "tokenizer.json"))
        assert a.prompt_ids == tok.encode(prompt, add_special_tokens=False).ids
    else:
        assert a.prompt_ids == list(prompt.encode())


def test_sample_from_the_exported_weights_alone_equals_the_checkpoint(byte_run: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported"
    shutil.copytree(byte_run, exported)
    shutil.rmtree(exported / "checkpoints")
    from_safetensors = sample_run(exported, "import ", 30, seed=1)
    checkpointed = tmp_path / "checkpointed"
    shutil.copytree(byte_run, checkpointed)
    (checkpointed / "model.safetensors").unlink()
    assert sample_run(checkpointed, "import ", 30, seed=1).ids == from_safetensors.ids
    # --checkpoint picks other weights: the final checkpoint's are the exported ones, bit for bit; step 2's are not.
    exported_model = load_run_model(exported)[0].state_dict()
    final = load_run_model(byte_run, str(byte_run / "checkpoints" / "step-00000004"))[0].state_dict()
    early = load_run_model(byte_run, str(byte_run / "checkpoints" / "step-00000002"))[0].state_dict()
    assert all(torch.equal(final[k], v) for k, v in exported_model.items())
    assert not all(torch.equal(early[k], v) for k, v in exported_model.items())


def test_an_empty_prompt_starts_a_new_document(bpe_run: Path) -> None:
    result = sample_run(bpe_run, "", 20, seed=0)
    assert result.prompt_ids == [] and len(result.ids) == 20


def test_sample_cli(byte_run: Path, cli) -> None:
    result = cli("sample", str(byte_run), "--prompt", "class ", "--tokens", "20", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("class ") and "weights from" in result.stderr
    again = cli("sample", str(byte_run), "--prompt", "class ", "--tokens", "20", "--seed", "3")
    assert again.stdout == result.stdout


def test_cli_defaults_are_the_module_defaults() -> None:
    from regimen.cli import _subparsers, build_parser

    args = _subparsers(build_parser())["sample"].parse_args(["run"])
    assert (args.temperature, args.top_k) == (TEMPERATURE, TOP_K)


@pytest.mark.parametrize(
    "problem",
    ["not a run", "mlp run", "no tokenizer", "bad tokens"],
)
def test_bad_sample_requests_are_one_line(problem: str, tmp_path: Path, byte_run: Path, cli) -> None:
    if problem == "not a run":
        args, message = [str(tmp_path)], "is not a run directory (no strategy.toml)"
    elif problem == "mlp run":
        train_run_mlp = tmp_path / "mlp"
        train_run_mlp.mkdir()
        (train_run_mlp / "strategy.toml").write_text('[model]\nname = "mlp"\n[data]\nsource = "synthetic"\n')
        args, message = [str(train_run_mlp)], "regimen sample writes with the built-in GPT only"
    elif problem == "no tokenizer":
        run = tmp_path / "run"
        shutil.copytree(byte_run, run)
        text = (run / "strategy.toml").read_text().replace('source = "text:', 'source = "tokens:')
        (run / "strategy.toml").write_text(text)
        args, message = [str(run)], "how its tokens map to text is unknown"
    else:
        args, message = [str(byte_run), "--tokens", "0"], "--tokens 0: must be >= 1"
    result = cli("sample", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# --------------------------------------------------------------------------------------------
# Samples during training
# --------------------------------------------------------------------------------------------


def test_a_text_run_records_a_sample_at_each_evaluation(byte_run: Path, corpus: Path) -> None:
    rows = read_samples(byte_run)
    assert [r["step"] for r in rows] == [2, 4]
    # The prompt is the start of the validation text (the last tenth of the file for text:PATH).
    data = corpus.read_bytes()
    val = data[len(data) - int(len(data) * 0.1) :]
    assert all(r["prompt"] == val[:16].decode() for r in rows)
    assert all(0 < len(r["text"]) <= 64 for r in rows)  # 64 bytes: at most 64 characters


def test_the_run_report_shows_the_samples_by_step(byte_run: Path, tmp_path: Path) -> None:
    from regimen.report import write_report

    page = write_report([byte_run], tmp_path / "report").read_text()
    assert 'id="samples"' in page
    texts = [r["text"] for r in read_samples(byte_run)]
    assert page.index(html.escape(texts[0])) < page.index(html.escape(texts[1])) or texts[0] == texts[1]


def test_samples_follow_the_seed_and_are_off_with_zero(tmp_path: Path, corpus: Path, one_thread: None) -> None:
    a = read_samples(train_run(tmp_path / "a", f"text:{corpus}", "observe.samples=8"))
    b = read_samples(train_run(tmp_path / "b", f"text:{corpus}", "observe.samples=8"))
    assert a == b and all(0 < len(r["text"]) <= 8 for r in a)
    assert read_samples(train_run(tmp_path / "off", f"text:{corpus}", "observe.samples=0")) == []
    assert not (tmp_path / "off" / "samples.jsonl").exists()


def test_samples_do_not_change_training(tmp_path: Path, corpus: Path, one_thread: None) -> None:
    """Sampling draws from its own generator: the metrics of a run with samples equal those without."""

    def losses(run: Path) -> list[tuple[float, float | None]]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["loss"], r.get("val_loss")) for r in rows]

    with_samples = train_run(tmp_path / "on", f"text:{corpus}", "model.dropout=0.1", "observe.samples=16")
    without = train_run(tmp_path / "off", f"text:{corpus}", "model.dropout=0.1", "observe.samples=0")
    assert losses(with_samples) == losses(without)


def test_no_samples_for_a_task_that_is_not_text(tmp_path: Path, one_thread: None) -> None:
    from regimen.runner import run_training
    from regimen.strategy import Strategy

    s = Strategy.load(None, ["model.name=mlp", "data.source=synthetic", "train.steps=2", "train.eval_every=1", *QUIET])
    run_training(s, tmp_path / "mlp", quiet=True)
    assert not (tmp_path / "mlp" / "samples.jsonl").exists()


def test_samples_html_escapes_and_orders_by_step() -> None:
    fragment = samples_html([{"step": 20, "prompt": "<p>", "text": "b & 'c'"}, {"step": 10, "prompt": "", "text": "</pre><script>"}])
    assert fragment.index("<td>10</td>") < fragment.index("<td>20</td>")
    assert "<script>" not in fragment and "&lt;/pre&gt;&lt;script&gt;" in fragment
    assert "&lt;p&gt;" in fragment and "b &amp; &#x27;c&#x27;" in fragment
    assert samples_html([]) == ""


def test_sample_refuses_weights_of_another_shape(byte_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(byte_run, run)
    (run / "strategy.toml").write_text((run / "strategy.toml").read_text().replace("d_model = 32", "d_model = 64"))
    with pytest.raises(UserError, match="does not fit the run's"):
        sample_run(run, "x", 5)


def test_a_resumed_run_redoes_the_samples_past_its_checkpoint(byte_run: Path, tmp_path: Path, one_thread: None) -> None:
    """Resumed from step 2 of 4: the samples file has each step once, the same as the uninterrupted run's."""
    from regimen.runner import run_training
    from regimen.strategy import Strategy

    run = tmp_path / "run"
    shutil.copytree(byte_run, run)
    s = Strategy.load(run / "strategy.toml")
    assert run_training(s, run, resume=str(run / "checkpoints" / "step-00000002"), quiet=True) == 0
    assert read_samples(run) == read_samples(byte_run)
