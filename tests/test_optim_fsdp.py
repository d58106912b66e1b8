"""Every optimizer FSDP2 accepts steps its DTensor shards as it steps plain tensors.

FSDP2 hands the optimizer DTensors, which report the global shape and refuse to mix with plain
tensors in one op. regimen's own optimizers take a reused plain temporary for a tensor larger
than `CPU_CHUNK_NUMEL` on CPU (`regimen.optim.cpu.Scratch`), a path the small models of the
2-process tests never reach: here a 1-rank process group (gloo, in this process) shards a model
whose largest weight is above that size, and each optimizer's shards must end where the same
optimizer leaves an unsharded copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from regimen.optim import build_optimizer
from regimen.optim.cpu import CPU_CHUNK_NUMEL
from regimen.registry import OPTIMIZERS
from regimen.strategy import OptimizerConfig

WIDTH = 272  # 272^2 = 73,984 elements > CPU_CHUNK_NUMEL: the large-tensor path
STEPS = 3
FSDP_OPTIMIZERS = [e.name for e in OPTIMIZERS.entries() if e.meta.get("fsdp", True)]
# Muon's Newton-Schulz in float32 (auto picks bfloat16 on CPUs with bf16 units); the LR of each
# is small enough that no step is large, the same for all: the comparison is of arithmetic.
CONFIG = {"lr": 1e-3, "weight_decay": 0.1}


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    store = dist.FileStore(str(Path(tmp_path_factory.mktemp("fsdp-store")) / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, WIDTH), nn.LayerNorm(WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, 4))


def train(net: nn.Module, name: str) -> None:
    extra = {"ns_dtype": "float32"} if name == "muon" else {}
    optimizer = build_optimizer(net, OptimizerConfig(name=name, **CONFIG, **extra))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_the_model_reaches_the_large_tensor_path() -> None:
    assert max(p.numel() for p in model().parameters()) > CPU_CHUNK_NUMEL


@pytest.mark.parametrize("name", FSDP_OPTIMIZERS)
def test_sharded_steps_equal_plain_steps(one_rank_group: None, name: str) -> None:
    from torch.distributed.fsdp import fully_shard

    plain = model()
    sharded = copy.deepcopy(plain)
    for layer in sharded.children():
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(sharded)
    train(plain, name)
    train(sharded, name)
    # One rank holds every element, but the paths differ (a plain CPU tensor may take a fused
    # or native kernel, a DTensor takes foreach ops): float32 rounding of a few steps, relative
    # to the weights' scale. A wrong path (a temporary of the wrong shape, a skipped tensor)
    # moves weights by the LR, 1e-3, orders of magnitude above this.
    # Lion steps by the sign of an interpolation: where rounding differs between the two paths
    # (another CPU's kernels) and that interpolation is within an ulp of 0, an element may flip,
    # moving by up to 2 lr a step. Such elements are rare (about 1e-7 of them per step); a wrong
    # path moves most elements.
    tol = 1e-5
    scale = max(p.abs().max().item() for p in plain.parameters())
    for (pname, want), got in zip(plain.named_parameters(), sharded.parameters(), strict=True):
        full = got.full_tensor() if hasattr(got, "full_tensor") else got
        err = (full.detach() - want.detach()).abs() / scale
        if name == "lion":
            flipped = float((err > tol).float().mean())
            assert flipped <= 1e-3, f"lion: {pname}: {flipped:.1%} of its elements differ after {STEPS} steps"
            assert err.max().item() <= 2 * CONFIG["lr"] * STEPS / scale + tol, f"lion: {pname} differs by more than a sign flip"
        else:
            worst = err.max().item()
            assert worst <= tol, f"{name}: {pname} differs by {worst:.2e} x the largest weight after {STEPS} steps"


@pytest.mark.parametrize("name", [e.name for e in OPTIMIZERS.entries() if e.target.startswith("torch.")])
def test_plans_fake_tensors_get_the_plain_tensors_implementation(name: str) -> None:
    """`regimen plan` traces the step on fake tensors: they must take the kernels real ones take
    (only DTensors are steered away from the fused kernels), or the plan prices another step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from regimen.optim import _implementation

    plain = [nn.Parameter(torch.zeros(4))]
    with FakeTensorMode() as mode:
        fake = [nn.Parameter(mode.from_tensor(torch.zeros(4)))]
    for choice in ("auto", "foreach", "loop"):
        assert _implementation(name, choice, fake) == _implementation(name, choice, plain)
