"""Distributed training on this machine: FSDP2's per-rank memory vs DDP, and tokens/s for 1 and 2 processes.

(a) Memory. A GPT of about 20M parameters (6 blocks, d_model 512, context 128, vocab 256) is
wrapped as regimen wraps it (`regimen.parallel.wrap`) on 2 ranks, with DDP and with FSDP2,
and takes one AdamW step (regimen's optimizer and parameter groups). Then each rank adds up
the storage of the tensors it holds, `numel x element_size` of the local shard
(`DTensor.to_local()`): parameters, gradients and optimizer state. DDP keeps a full copy of
all three on every rank; FSDP2 keeps 1/world of each. Target: FSDP2 <= 0.6 x DDP per rank.
(DDP's gradient buckets, a further full-size buffer, are not counted: the target is about the
tensors the training state is made of, so the real DDP figure is higher still.)

(b) Throughput. The tiny-ish GPT (2 blocks, d_model 128, context 64, global batch 32) trained
with the command itself, `regimen train ... --nproc N`, and read back from `metrics.jsonl`:
the median tokens/s over the logged windows after the first (warm-up, evaluation excluded),
counted for the whole job. One process with 1 and with 2 intra-op threads, two processes
(DDP, FSDP2) with 1 thread each, so every configuration uses at most the 2 cores. Beside it,
the time of one gloo all-reduce of a gradient-sized buffer between 2 ranks: the
communication a DDP step adds.

    .venv/bin/python -m benchmarks.distributed            # about 5 minutes on 2 idle CPU cores
    .venv/bin/python -m benchmarks.distributed --quick    # fewer steps (noisier)
    python -m benchmarks --only distributed --write       # into BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Table, cli, run_worker, to_json

MEMORY_TARGET = 0.6
# About 20M parameters: 6 x 12 x 512^2 in the blocks, plus the (tied) embeddings.
BIG_GPT = {"vocab_size": 256, "context": 128, "n_layer": 6, "n_head": 8, "d_model": 512}
TINY = ["model.n_layer=2", "model.n_head=4", "model.d_model=128", "model.context=64", "batch.size=32"]
MiB = 2**20


# ---- (a) memory: a torchrun worker ----------------------------------------------------------


def local_bytes(t: Any) -> int:
    """Bytes this rank stores for `t`: the local shard of a DTensor, else the tensor itself."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def memory_worker(mode: str) -> dict[str, Any]:
    """One rank of (a): wrap, one optimizer step, then the bytes of params, grads and optimizer state."""
    import torch
    import torch.distributed as dist

    from regimen import parallel
    from regimen.models import GPT, GPTConfig, count_parameters
    from regimen.optim import build_optimizer
    from regimen.strategy import OptimizerConfig

    d = parallel.Dist.from_env("cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**BIG_GPT))
    n_params = count_parameters(model)
    wrapped = parallel.wrap(model, mode, d, torch.device("cpu"))
    optimizer = build_optimizer(model, OptimizerConfig(name="adamw"))
    idx = torch.randint(0, BIG_GPT["vocab_size"], (2, BIG_GPT["context"]))
    logits = wrapped(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    optimizer.step()  # creates the state (exp_avg, exp_avg_sq, step); the gradients stay
    params = {id(p): p for p in model.parameters()}.values()  # a tied weight counts once
    mine = {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
    }
    everyone: list[dict[str, int]] = [{} for _ in range(d.world_size)]
    dist.all_gather_object(everyone, mine)
    d.close()
    # The largest rank is what must fit on one device.
    return {"mode": mode, "n_params": n_params, **{k: max(r[k] for r in everyone) for k in mine}}


def allreduce_worker(numel: int, repeats: int) -> dict[str, Any]:
    """Median seconds of one gloo all-reduce of `numel` float32 (a DDP step's gradient sync)."""
    import torch
    import torch.distributed as dist

    from regimen import parallel

    d = parallel.Dist.from_env("cpu")
    buf = torch.ones(numel)
    times = []
    for _ in range(repeats + 2):
        d.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    d.close()
    return {"seconds": statistics.median(times[2:])}


def torchrun(*worker_args: str, timeout: float = 600) -> dict[str, Any]:
    """Run this module's worker on 2 local ranks with torchrun; rank 0's JSON result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "benchmarks.distributed", "--worker", *worker_args]
    return run_worker(cmd, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def memory_table() -> Table:
    rows, results = [], {mode: torchrun("memory", mode) for mode in ("ddp", "fsdp")}
    total = {mode: r["params"] + r["grads"] + r["optimizer"] for mode, r in results.items()}
    for mode, r in results.items():
        rows.append([mode, r["params"] / MiB, r["grads"] / MiB, r["optimizer"] / MiB, total[mode] / MiB, total[mode] / total["ddp"]])
    ratio = total["fsdp"] / total["ddp"]
    n = results["ddp"]["n_params"]
    return Table(
        title=f"Per-rank memory of parameters, gradients and AdamW state: GPT of {n / 1e6:.1f}M parameters, 2 ranks",
        columns=["mode", "params MiB", "grads MiB", "optimizer MiB", "total MiB", "vs DDP"],
        rows=rows,
        command="python -m benchmarks.distributed",
        fmt={"vs DDP": ".3f", "params MiB": ".1f", "grads MiB": ".1f", "optimizer MiB": ".1f", "total MiB": ".1f"},
        notes=[
            "Sum of numel x element_size of each rank's local tensors (DTensor.to_local() for FSDP2) after one optimizer "
            "step, the largest rank shown; DDP's gradient buckets are not counted.",
            f"FSDP2 / DDP = {ratio:.3f}: target <= {MEMORY_TARGET} {'met' if ratio <= MEMORY_TARGET else 'NOT met'}.",
        ],
    )


# ---- (b) throughput: the command itself -----------------------------------------------------


def write_corpus(directory: Path) -> Path:
    """2 MB of the standard library's source as one text file (loads in a moment)."""
    src = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(src.glob("*.py")))[: 2 * MiB]
    path = directory / "corpus.txt"
    path.write_bytes(data)
    return path


def train_tokens_per_s(corpus: Path, run_dir: Path, nproc: int, threads: int, mode: str, steps: int) -> float:
    """Median tokens/s (whole job) over the logged windows after the first, from `regimen train`."""
    import subprocess

    log_every = max(steps // 6, 1)
    cmd = [sys.executable, "-m", "regimen", "train", *TINY, f"data.source=text:{corpus}", f"train.steps={steps}"]
    cmd += [f"train.log_every={log_every}", f"train.eval_every={steps}", "train.eval_samples=64", f"parallel.mode={mode}"]
    cmd += ["observe.progress=none", "observe.report=false", "--run-dir", str(run_dir), "--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def throughput_table(quick: bool) -> Table:
    steps, repeats = (30, 1) if quick else (60, 3)
    configs = [("1 process, 1 thread", 1, 1, "none"), ("1 process, 2 threads", 1, 2, "none")]
    configs += [("2 processes DDP, 1 thread each", 2, 1, "ddp"), ("2 processes FSDP2, 1 thread each", 2, 1, "fsdp")]
    load = [os.getloadavg()[0]]
    samples: list[list[float]] = [[] for _ in configs]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp))
        # Rounds over all configurations (not one configuration at a time): a change in the
        # machine's load then hits every configuration alike.
        for rep in range(repeats):
            for i, (_, nproc, threads, mode) in enumerate(configs):
                samples[i].append(train_tokens_per_s(corpus, Path(tmp) / f"run{rep}-{i}", nproc, threads, mode, steps))
    load.append(os.getloadavg()[0])
    speeds = [statistics.median(s) for s in samples]
    base = speeds[0]
    rows = [[name, speed, speed / base] for (name, *_), speed in zip(configs, speeds)]
    from regimen.models import GPT, GPTConfig, count_parameters

    n_params = count_parameters(GPT(GPTConfig(256, 64, 2, 4, 128)))
    sync = torchrun("allreduce", str(n_params), "10" if quick else "30")["seconds"]
    step_s = 32 * 64 / speeds[2]  # one DDP step, from its measured throughput
    notes = [
        f"{steps} steps per run, median of {repeats} run(s) per configuration; each run's figure is the median over its "
        "logged windows after the first (warm-up), evaluation excluded; tokens/s counts the whole job's tokens.",
        f"One gloo all-reduce of the {n_params / 1e6:.2f}M gradients between 2 ranks: {sync * 1e3:.1f} ms, "
        f"{sync / step_s:.0%} of a DDP step ({step_s * 1e3:.0f} ms).",
        f"Scaling on 2 CPU cores: on an idle machine the ceiling is 2x one single-thread process; measured DDP "
        f"x{speeds[2] / base:.2f}, FSDP2 x{speeds[3] / base:.2f}, one process with 2 threads x{speeds[1] / base:.2f}. "
        f"The cores were shared (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end): the scheduler "
        "divides them per thread, so 2 processes also get a bigger share of the machine than 1 (which can push DDP "
        "past 2x), and a process with 2 intra-op threads loses most, its threads waiting for each other at every op.",
        "What limits scaling: each rank pays the whole per-step fixed cost for half the batch (Python and per-op "
        "overhead, which dominate a model this small, and under DDP the full AdamW update on every rank); FSDP2 adds "
        "an all-gather per block in forward and backward, a reduce-scatter, and DTensor dispatch on every optimizer "
        "and clipping op, so it can trail DDP on a tiny model; the gradient all-reduce itself is cheap.",
    ]
    return Table(
        title=f"Training throughput of the tiny-ish GPT ({n_params / 1e6:.2f}M parameters, global batch 32 x 64 tokens)",
        columns=["configuration", "tokens/s", "vs 1 process, 1 thread"],
        rows=rows,
        command=f"OMP_NUM_THREADS=1|2 regimen train {' '.join(TINY)} data.source=text:CORPUS train.steps={steps} "
        "[--nproc 2 parallel.mode=ddp|fsdp]",
        fmt={"tokens/s": ".0f", "vs 1 process, 1 thread": ".2f"},
        notes=notes,
    )


def run(quick: bool) -> list[Table]:
    """Both tables; the protocol of `python -m benchmarks`."""
    return [memory_table(), throughput_table(quick)]


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.distributed [--quick]`, or one torchrun worker (`--worker ...`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        parser = argparse.ArgumentParser(prog="benchmarks.distributed --worker")
        parser.add_argument("kind", choices=["memory", "allreduce"])
        parser.add_argument("args", nargs="*")
        args = parser.parse_args(argv[1:])
        result = memory_worker(*args.args) if args.kind == "memory" else allreduce_worker(int(args.args[0]), int(args.args[1]))
        if int(os.environ.get("RANK", "0")) == 0:
            print(to_json(result), flush=True)
        return
    cli(run, __doc__)


if __name__ == "__main__":
    main()
