"""The peers regimen is measured against, used only by the benchmarks and only where importable.

They live in `.bench-venv` (`make bench-env`): PyTorch Lightning and Hugging Face's Trainer for
loop speed, pytorch_optimizer and timm for the optimizers torch lacks. regimen never depends on
them. `python -m benchmarks.peers --check` imports each and prints its version (the last step
of `make bench-env`); `--json` prints what is importable, for the benchmarks' parent process.

timm is installed without its dependencies: its `torchvision` requirement does not import beside
the CPU torch 2.13.0 build, and `import timm` pulls torchvision in through `timm.data`. Only
`timm.optim` is needed, so `timm_optim()` loads that subpackage without running `timm/__init__`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import ROOT

if TYPE_CHECKING:
    from benchmarks.loop_speed import Workload

BENCH_VENV = ROOT / ".bench-venv"


def bench_python() -> str:
    """The interpreter of `.bench-venv` when it exists (REGIMEN_BENCH_PEERS=0: this one)."""
    python = BENCH_VENV / "bin" / "python"
    if os.environ.get("REGIMEN_BENCH_PEERS", "1") != "0" and python.exists():
        return str(python)
    return sys.executable


def timm_optim() -> types.SimpleNamespace:
    """timm's Lion, Lamb and Lars, loaded without `timm/__init__` and `timm/optim/__init__`.

    Both package files import torchvision (through timm.data and timm.models); the optimizer
    modules themselves need only torch and timm.optim's private helpers.
    """
    spec = importlib.util.find_spec("timm") if "timm" not in sys.modules else None
    if "timm" not in sys.modules:
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("timm is not installed (make bench-env)")
        # Empty package objects in place of the two __init__ files: submodules import from their paths.
        root = next(iter(spec.submodule_search_locations))
        for name, path in (("timm", root), ("timm.optim", f"{root}/optim")):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    return types.SimpleNamespace(
        Lion=importlib.import_module("timm.optim.lion").Lion,
        Lamb=importlib.import_module("timm.optim.lamb").Lamb,
        Lars=importlib.import_module("timm.optim.lars").Lars,
    )


def _probe() -> dict[str, Any]:
    """Which peers import here, with their versions or the import error."""
    found: dict[str, Any] = {}
    checks = {
        "lightning": lambda: importlib.import_module("lightning"),
        "hf": lambda: (importlib.import_module("accelerate"), importlib.import_module("transformers"))[1],
        "pytorch_optimizer": lambda: importlib.import_module("pytorch_optimizer"),
        "timm": timm_optim,
    }
    for name, load in checks.items():
        try:
            module = load()
            version = getattr(module, "__version__", None)
            if version is None:  # timm.optim carries no version; the distribution does
                from importlib.metadata import version as dist_version

                version = dist_version(name)
            found[name] = version
        except Exception as e:  # any failure means "not available": the row is left out
            found[name] = None
            found[name + "_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return found


def importable(python: str) -> dict[str, Any]:
    """`_probe()` run by `python` (the benchmark interpreter may not be this one)."""
    proc = subprocess.run([python, "-m", "benchmarks.peers", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# ---- Lightning and Hugging Face loops (loop_speed's workers) ---------------------------------


def lightning_loop(w: Workload) -> tuple[list[float], float]:
    """(c) `lightning.Trainer.fit` on the workload; a timestamp after every optimizer step.

    Features mode: `gradient_clip_val`, the WSD LR as a per-step `LambdaLR`, validation every
    `w.every` steps (`val_check_interval`) on the fixed samples, `ModelCheckpoint` every
    `w.every` steps (model and optimizer, `torch.save`).
    """
    import lightning as L
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.loop_speed import BATCH, lr_multiplier, make_optimizer

    stamps: list[float] = []
    losses: list[float] = []
    schedule = lr_multiplier(w.features, w.steps)

    class LitGPT(L.LightningModule):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            logits = self.model(x)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self) -> Any:
            optimizer = make_optimizer(self.model)
            if not w.features:
                return optimizer
            lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)  # type: ignore[arg-type]
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    class Stamp(L.Callback):
        # Lightning's automatic optimisation steps the optimizer before this hook.
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            stamps.append(time.perf_counter())
            losses.append(float(outputs["loss"]))

    x, y = w.samples()
    loader = DataLoader(TensorDataset(x, y), batch_size=w.batch, shuffle=False)  # in the workload's order
    callbacks: list[Any] = [Stamp()]
    options: dict[str, Any] = {"enable_checkpointing": False, "limit_val_batches": 0}
    val_loader = None
    if w.features:
        vx, vy = w.val_samples()
        val_loader = DataLoader(TensorDataset(vx, vy), batch_size=BATCH)
        callbacks.append(ModelCheckpoint(dirpath=w.save_dir, every_n_train_steps=w.every, save_top_k=-1, save_last=False))
        options = {"enable_checkpointing": True, "val_check_interval": w.every, "check_val_every_n_epoch": None}
    trainer = L.Trainer(
        max_steps=w.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=w.clip or None,
        callbacks=callbacks,
        default_root_dir=w.save_dir,
        **options,
    )
    trainer.fit(LitGPT(w.model), loader, val_loader)
    return stamps, losses[-1]


def hf_loop(w: Workload) -> tuple[list[float], float]:
    """(d) `transformers.Trainer.train` on the workload, with our optimizer and LR schedule.

    Features mode: `max_grad_norm`, the WSD LR as a `LambdaLR`, `eval_strategy="steps"` on the
    fixed samples and `save_strategy="steps"` (model and optimizer) every `w.every` steps.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from benchmarks.loop_speed import BATCH, lr_multiplier, make_optimizer

    stamps: list[float] = []

    class LM(nn.Module):
        """The GPT with the loss in forward: what HF's Trainer expects of a model."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            self.last_loss = torch.zeros(())

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.model(input_ids)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1))
            if self.training:
                self.last_loss = loss.detach()
            return {"loss": loss}

        def state_dict(self, *args: Any, **kwargs: Any) -> Any:
            # The head is tied to the embedding: saved once, as save_pretrained saves a tied weight
            # (HF's Trainer writes a plain module's state dict with safetensors, which refuses aliases).
            state = super().state_dict(*args, **kwargs)
            state.pop("model.head.weight", None)
            return state

    class Samples(torch.utils.data.Dataset):
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.x, self.y = x, y

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.x[i], "labels": self.y[i]}

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    lm = LM(w.model)
    optimizer = make_optimizer(w.model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(w.features, w.steps))  # type: ignore[arg-type]
    features: dict[str, Any] = {"save_strategy": "no", "eval_strategy": "no"}
    eval_dataset = None
    if w.features:
        eval_dataset = Samples(*w.val_samples())
        features = {
            "save_strategy": "steps",
            "save_steps": w.every,
            "eval_strategy": "steps",
            "eval_steps": w.every,
            "per_device_eval_batch_size": BATCH,
            "prediction_loss_only": True,
        }
    args = TrainingArguments(
        output_dir=w.save_dir,
        max_steps=w.steps,
        per_device_train_batch_size=w.batch,
        max_grad_norm=w.clip,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        **features,
    )
    x, y = w.samples()
    trainer = Trainer(
        model=lm, args=args, train_dataset=Samples(x, y), eval_dataset=eval_dataset, optimizers=(optimizer, schedule), callbacks=[Stamp()]
    )
    trainer.train()
    return stamps, float(lm.last_loss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="import every peer; exit 1 if one fails")
    parser.add_argument("--json", action="store_true", help="print what imports here as one JSON line")
    args = parser.parse_args()
    found = _probe()
    if args.json:
        print(json.dumps(found))
        return 0
    import torch

    print(f"{Path(sys.executable).parent.parent.name}: torch {torch.__version__}")
    bad = 0
    for name in ("lightning", "hf", "pytorch_optimizer", "timm"):
        if found[name]:
            print(f"  {name:18} {found[name]}")
        else:
            bad += 1
            print(f"  {name:18} FAILED: {found[name + '_error']}")
    if args.check and not torch.__version__.startswith("2.13.0"):
        print(f"torch {torch.__version__} is not the 2.13.0 the benchmarks compare on")
        bad += 1
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
