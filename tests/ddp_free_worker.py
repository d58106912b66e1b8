"""A torchrun worker that trains two DDP steps through `Trainer.train_step` and then frees the trainer.

Freeing the DDP module frees its reducer, which can hold the last reference to gloo's process
group; destroying the group joins gloo's threads while holding the GIL, and a thread still
releasing the last collective's tensors needs the GIL: a deadlock unless the module lets go of
the GIL first (regimen.parallel). Prints "freed" on rank 0 once the trainer is gone.

Usage: torchrun --nproc-per-node 2 tests/ddp_free_worker.py CORPUS
"""

from __future__ import annotations

import os
import sys

import torch

from regimen.launch import end_worker
from regimen.strategy import Strategy
from regimen.task import build_task
from regimen.trainer import Trainer


def train_and_free(corpus: str) -> list[float]:
    shape = ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.context=256", "batch.size=8"]
    s = Strategy.load(None, [*shape, f"data.source=text:{corpus}", "optimizer.name=adamw", "parallel.mode=ddp", "train.device=cpu"])
    trainer = Trainer(s.resolve(), build_task(s.resolve()))
    for _ in range(2):
        trainer.train_step()
    summary = trainer.dist.all_reduce_sum(torch.ones(4, dtype=torch.float64))  # a last collective on a Python tensor
    trainer.dist.close()  # destroy_process_group: now the DDP reducer holds the group's last reference
    return summary.tolist()  # the trainer (its DDP module, and with it the group) is freed on return


if __name__ == "__main__":
    train_and_free(sys.argv[1])
    if int(os.environ.get("RANK", "0")) == 0:
        print("freed", flush=True)
    end_worker(0)  # as regimen's workers end: the interpreter's finalization is another story (regimen.launch)
