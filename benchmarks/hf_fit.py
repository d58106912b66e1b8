"""`rg.fit` against Hugging Face's own `Trainer`, on Hugging Face's own GPT-2 (issue 16).

A user moving from `transformers.Trainer` to `rg.fit` should not lose speed on HF's own model.
The same work on both sides:

- the model: `transformers.GPT2LMHeadModel` from a `GPT2Config` (4 layers, width 256, 4 heads,
  context 128, GPT-2's vocabulary of 50,257), random init from one seed; its own loss
  (`labels` = `input_ids`, shifted inside the model);
- the data: the same seeded random token ids, `steps x 16` sequences of 128 tokens, batch 16;
- the optimizer: torch's fused AdamW (HF's default `adamw_torch_fused`; regimen's `adamw` on CPU),
  lr 3e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, a constant LR, no gradient clipping
  (`rg.fit`'s default `train.clip = 0`: regimen still computes the gradient norm, one read of the
  gradients, for its non-finite guard; it no longer multiplies them by 1.0);
- the loops: `Trainer.train()` with reporting, saving, logging, evaluation and tqdm off; `rg.fit`
  with a mapping of tensors, one log row (and no evaluation) at the end, no run directory.

Each run is its own fresh process; the two loops alternate (hf, regimen, regimen, hf, ...) so a
change of machine load hits both alike; each figure is the median over repeats, shown with its
range. Throughput is timed from the end of the first `warmup` steps to the end of the last one,
so start-up is excluded and every per-step cost of each loop is included. It runs in
`.bench-venv` (`make bench-env`: transformers and accelerate), and leaves the table out where
the HF Trainer does not import.

    python -m benchmarks --only hf_fit [--quick]
    python -m benchmarks.hf_fit --worker regimen --steps 40 --warmup 10   # one run, JSON out
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import ROOT, Table, cli, loop_worker_parser, python_command, rerun_command, run_worker, threads, to_json

GPT2 = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 128, "vocab_size": 50257}
CONTEXT = 128
BATCH = 16
LR = 3e-4
SEED = 0
KINDS = ("hf", "regimen")
LABELS = {"hf": "HF Trainer", "regimen": "rg.fit"}


def make_model() -> Any:
    """The GPT-2 both loops train, from the same seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    return GPT2LMHeadModel(GPT2Config(**GPT2, bos_token_id=0, eos_token_id=0))


def make_ids(steps: int) -> torch.Tensor:
    """`steps x BATCH` sequences of seeded random token ids: one epoch is the whole run."""
    return torch.randint(0, GPT2["vocab_size"], (steps * BATCH, CONTEXT), generator=torch.Generator().manual_seed(SEED))


def hf_run(steps: int) -> list[float]:
    """`transformers.Trainer.train()`; a timestamp at the end of every optimizer step."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class Rows(torch.utils.data.Dataset):
        def __init__(self, ids: torch.Tensor) -> None:
            self.ids = ids

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    model, ids = make_model(), make_ids(steps)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            learning_rate=LR,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            optim="adamw_torch_fused",
            max_grad_norm=0.0,  # no clipping (HF clips only when > 0)
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            seed=SEED,
        )
        Trainer(model=model, args=args, train_dataset=Rows(ids), callbacks=[Stamp()]).train()
    return stamps


def regimen_run(steps: int) -> list[float]:
    """`rg.fit` on a mapping of tensors; a timestamp at the end of every `train_step`."""
    import regimen as rg
    from regimen.trainer import Trainer

    stamps: list[float] = []
    step = Trainer.train_step

    def timed_step(self: Trainer) -> dict:
        out = step(self)
        stamps.append(time.perf_counter())
        return out

    Trainer.train_step = timed_step  # type: ignore[method-assign]  # this worker process only
    model, ids = make_model(), make_ids(steps)
    rg.fit(
        model,
        {"input_ids": ids, "labels": ids},
        optimizer={"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        lr=LR,
        batch_size=BATCH,
        overrides={"train.steps": steps, "train.device": "cpu"},
        verbose=False,
    )
    return stamps


def worker(kind: str, steps: int, warmup: int, threads: int) -> dict:
    """One run of one loop in this process: tokens/s after warmup."""
    torch.set_num_threads(threads)
    stamps = hf_run(steps) if kind == "hf" else regimen_run(steps)
    assert len(stamps) == steps, f"{kind}: {len(stamps)} steps timed, {steps} asked"
    seconds = stamps[-1] - stamps[warmup - 1]
    return {
        "kind": kind,
        "tokens_per_s": (steps - warmup) * BATCH * CONTEXT / seconds,
        "ms_per_step": 1000 * seconds / (steps - warmup),
        "threads": torch.get_num_threads(),
    }


def run(quick: bool) -> list[Table]:
    """Alternating fresh-process runs of both loops; the ratio rg.fit / HF Trainer."""
    from benchmarks.peers import bench_python, importable

    python = bench_python()
    peers = importable(python)
    command = rerun_command("hf_fit", quick)
    if not peers.get("hf"):
        note = f"HF Trainer not importable by `{python}` ({peers.get('hf_error', 'make bench-env')}): nothing measured."
        return [Table("rg.fit vs HF Trainer, GPT-2", ["loop", "tokens/s"], [], command, notes=[note])]
    repeats, steps, warmup = (2, 6, 2) if quick else (5, 60, 10)
    n_threads = threads()
    results: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(repeats):
        for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
            cmd = python_command("hf_fit", "--worker", kind, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(n_threads))
            cmd[0] = python
            results[kind].append(run_worker(cmd))
    rows, med = [], {}
    for kind in KINDS:
        rates = [r["tokens_per_s"] for r in results[kind]]
        med[kind] = statistics.median(rates)
        ms = statistics.median(r["ms_per_step"] for r in results[kind])
        rows.append([LABELS[kind], med[kind], f"{min(rates):.0f}-{max(rates):.0f}", ms])
    ratio = med["regimen"] / med["hf"]
    per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["regimen"], results["hf"])]  # the same round: adjacent runs
    for row, kind in zip(rows, KINDS):
        row.append(med[kind] / med["hf"])
    notes = [
        f"GPT2LMHeadModel {GPT2}, batch {BATCH}, fused AdamW lr {LR}, constant LR, no clipping; {steps} steps of which the first "
        f"{warmup} are not timed; median of {repeats} alternating runs, each its own process, {n_threads} torch threads; "
        f"interpreter `{python.replace(str(ROOT) + '/', '')}`.",
        f"rg.fit / HF Trainer = {ratio:.3f} (ratio within each round: median {statistics.median(per_round):.3f}, "
        f"range {min(per_round):.3f}-{max(per_round):.3f}): " + ("rg.fit as fast or faster." if ratio >= 1 else "**rg.fit behind**."),
    ]
    return [
        Table(
            title="rg.fit vs HF Trainer, GPT-2 (4 layers, width 256, context 128)",
            columns=["loop", "tokens/s", "range", "ms/step", "x HF Trainer"],
            rows=rows,
            command=command,
            notes=notes,
            fmt={"tokens/s": ".0f", "ms/step": ".1f", "x HF Trainer": ".3f"},
        )
    ]


def main() -> None:
    """Without --worker: the whole benchmark (`common.cli`); with it: one run, JSON out."""
    import sys

    if "--worker" not in sys.argv:
        cli(run, __doc__)
        return
    args = loop_worker_parser(KINDS, steps=40).parse_args()
    print(to_json(worker(args.worker, args.steps, args.warmup, args.threads or threads())))


if __name__ == "__main__":
    main()
