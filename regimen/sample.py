"""`regimen sample`: text from a trained built-in GPT, and the samples a run writes as it trains.

```
regimen sample RUN_DIR [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S] [--checkpoint PATH]
```

The run directory has all it needs: `strategy.toml` (the model's shape), the weights
(`model.safetensors`, else the newest checkpoint, or `--checkpoint PATH`), and how tokens map to
text (bytes for the `stdlib` and `text:` sources; the `tokenizer.json` and `tokens_meta.json` a
run copies from its `tokens:DIR`). Generation samples one token at a time from the softmax of
the last position's logits divided by the temperature (0: the most likely token), restricted to
the `top_k` most likely (0: all), with its own seeded generator, so the same seed gives the
same text. The output starts with the prompt's tokens; an empty prompt starts after an unseen
document boundary (the end-of-text token, or a newline for bytes). Past the model's context,
the model sees the last `context` tokens (a sliding window).

During training on text (`observe.samples` tokens, default 64; 0 = off), `TrainingSamples`
runs right after each evaluation: the first tokens of the validation text as the prompt, the
run's seed, the line shown under the progress bar and kept in `samples.jsonl` (step, prompt,
text); `regimen.report_html.samples_section` renders them for the report.

Example:
    >>> import torch
    >>> from regimen.models import GPT, GPTConfig
    >>> torch.manual_seed(0) and None
    >>> gpt = GPT(GPTConfig(vocab_size=256, context=8, n_layer=1, n_head=1, d_model=16)).eval()
    >>> ids = generate(gpt, [104, 105], 12, context=8, generator=torch.Generator().manual_seed(1))
    >>> len(ids), ids[:2], ids == generate(gpt, [104, 105], 12, context=8, generator=torch.Generator().manual_seed(1))
    (14, [104, 105], True)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from regimen.errors import UserError
from regimen.models import GPT, GPTConfig
from regimen.rundir import SAMPLES_FILE, JsonlWriter, MetricsWriter
from regimen.tokens import TextCodec, read_run_codec

if TYPE_CHECKING:
    from regimen.observe import ProgressDisplay
    from regimen.strategy import Strategy
    from regimen.trainer import Trainer

TEMPERATURE = 0.8  # nanoGPT's sample.py defaults
TOP_K = 200
PROMPT_TOKENS = 16  # the training samples' prompt: the first tokens of the validation text


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: Sequence[int],
    new_tokens: int,
    *,
    context: int,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    generator: torch.Generator | None = None,
) -> list[int]:
    """`prompt` followed by `new_tokens` sampled ids (a sliding window past `context`)."""
    assert prompt, "generation starts from at least one token"
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    for _ in range(new_tokens):
        logits = model(ids[:, -context:])[:, -1, :].float()
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if 0 < top_k < logits.size(-1):
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, token], dim=1)
    return ids[0].tolist()


# --------------------------------------------------------------------------------------------
# regimen sample
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """A generated text: the prompt's ids, all ids (prompt first), and the text they decode to."""

    prompt_ids: list[int]
    ids: list[int]
    text: str


def _weights(run_dir: Path, checkpoint: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """The model's tensors and where they came from: --checkpoint, model.safetensors, else the newest checkpoint."""
    from regimen.checkpoint import latest_checkpoint, model_tensors

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise UserError(f"--checkpoint {checkpoint!r}: no such checkpoint")
        return model_tensors(path), str(path)
    exported = run_dir / "model.safetensors"
    if exported.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(exported)), str(exported)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{exported} is not readable safetensors ({e})") from None
    found = latest_checkpoint(run_dir)
    if found is None:
        raise UserError(f"{run_dir} has no model.safetensors and no complete checkpoint; train it first, or give --checkpoint PATH")
    return model_tensors(found), str(found)


def load_run_model(run_dir: Path, checkpoint: str | None = None) -> tuple[GPT, Strategy, str]:
    """The run's built-in GPT with its trained weights, its strategy, and where the weights came from."""
    from regimen.strategy import Strategy

    if not (run_dir / "strategy.toml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no strategy.toml)")
    strategy = Strategy.load(run_dir / "strategy.toml")
    m = strategy.model
    if m.name != "gpt":
        raise UserError(f"{run_dir}: model.name = {m.name!r}; regimen sample writes with the built-in GPT only")
    tensors, source = _weights(run_dir, checkpoint)
    if "tok_emb.weight" not in tensors:
        raise UserError(f"{source} holds no tok_emb.weight: not the weights of the built-in GPT")
    model = GPT(GPTConfig(int(tensors["tok_emb.weight"].shape[0]), m.context, m.n_layer, m.n_head, m.d_model, 0.0))
    # A tied weight is stored under its first name only: the other names may be missing.
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise UserError(f"{source} does not fit the run's [model] ({str(e).splitlines()[-1].strip()[:200]})") from None
    if unexpected or set(missing) - aliases:
        what = f"extra {unexpected[:3]}" if unexpected else f"missing {sorted(set(missing) - aliases)[:3]}"
        raise UserError(f"{source} does not fit the run's [model] ({what})")
    return model.eval(), strategy, source


def sample_run(
    run_dir: str | Path,
    prompt: str = "",
    tokens: int = 200,
    *,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    seed: int = 0,
    checkpoint: str | None = None,
) -> Sample:
    """Text from a trained run (what `regimen sample` prints)."""
    if tokens < 1:
        raise UserError(f"--tokens {tokens}: must be >= 1")
    if temperature < 0:
        raise UserError(f"--temperature {temperature:g}: must be >= 0 (0 = always the most likely token)")
    if top_k < 0:
        raise UserError(f"--top-k {top_k}: must be >= 0 (0 = no limit)")
    run_dir = Path(run_dir)
    model, strategy, source = load_run_model(run_dir, checkpoint)
    codec = read_run_codec(run_dir, strategy.data.source)
    if codec is None:
        raise UserError(
            f"{run_dir}: its data ({strategy.data.source}) has no meta.json, so how its tokens map to text is unknown; "
            "make the tokens with regimen prepare"
        )
    reason = codec.available()
    if reason is not None:
        raise UserError(reason)
    vocab = model.cfg.vocab_size
    if codec.vocab_size != vocab:
        raise UserError(f"{run_dir}: the tokenizer has {codec.vocab_size:,} ids but the model {vocab:,}; the run directory is inconsistent")
    print(f"regimen: weights from {source}", file=sys.stderr)
    prompt_ids = codec.encode(prompt)
    start = prompt_ids or codec.start_ids()
    generator = torch.Generator().manual_seed(seed)
    ids = generate(model, start, tokens, context=strategy.model.context, temperature=temperature, top_k=top_k, generator=generator)
    ids = prompt_ids + ids[len(start) :]
    return Sample(prompt_ids, ids, codec.decode(ids))


def run(args: argparse.Namespace) -> int:
    """`regimen sample RUN_DIR [--prompt] [--tokens] [--temperature] [--top-k] [--seed] [--checkpoint]`."""
    result = sample_run(
        args.run_dir, args.prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed, checkpoint=args.checkpoint
    )
    print(result.text)
    return 0


# --------------------------------------------------------------------------------------------
# Samples during training
# --------------------------------------------------------------------------------------------


class TrainingSamples:
    """After each evaluation: a short text from the model in training, shown and kept in samples.jsonl.

    Made by `start(trainer)` (None when off: `observe.samples = 0`, not a text source, not the
    built-in GPT, or under FSDP, whose sharded forward would need every rank). Rank 0 samples
    with the unwrapped model and its own generator, so the training's random stream is untouched.
    """

    def __init__(self, codec: TextCodec, prompt: list[int], tokens: int, seed: int, context: int, path: Path | None) -> None:
        self.codec, self.prompt, self.tokens, self.seed, self.context, self.path = codec, prompt, tokens, seed, context, path
        self.prompt_text = codec.decode(prompt)

    @classmethod
    def start(cls, trainer: Trainer) -> TrainingSamples | None:
        s, data = trainer.strategy, trainer.data
        if not trainer.is_main or s.observe.samples == 0 or data.codec is None or trainer.mode == "fsdp":
            return None
        if not isinstance(trainer.model, GPT):
            return None
        reason = data.codec.available()
        if reason is not None:
            print(f"regimen: warning: no samples during training ({reason})", file=sys.stderr)
            return None
        tokens = getattr(data.val, "tokens", None)
        if tokens is None or not len(tokens):
            tokens = getattr(data.train, "tokens", None)
        if tokens is None:
            return None
        prompt = [int(t) for t in tokens[: min(PROMPT_TOKENS, s.model.context)]]
        path = trainer.run_dir / SAMPLES_FILE if trainer.run_dir is not None else None
        if path is not None and trainer.progress.step > 0:
            # A resumed run redoes the samples past its checkpoint: marked, never cut (regimen.rundir).
            with MetricsWriter(path) as w:
                w.resume_from(trainer.progress.step)
        return cls(data.codec, prompt, s.observe.samples, s.train.seed, s.model.context, path)

    def __call__(self, trainer: Trainer, display: ProgressDisplay) -> None:
        from regimen.optim import set_train_mode

        model = trainer.model
        was_training = model.training
        model.eval()
        set_train_mode(trainer.optimizer, False)  # schedule-free: the weights it evaluates
        try:
            generator = torch.Generator(device=trainer.device).manual_seed(self.seed)
            ids = generate(model, self.prompt, self.tokens, context=self.context, generator=generator)
        finally:
            model.train(was_training)
            set_train_mode(trainer.optimizer, True)
        text = self.codec.decode(ids[len(self.prompt) :])
        row = {"step": trainer.progress.step, "prompt": self.prompt_text, "text": text}
        if self.path is not None:
            with JsonlWriter(self.path) as w:
                w.write(row)
        display.message(f"step {row['step']:>6}  sample: {self.prompt_text + text!r}")
