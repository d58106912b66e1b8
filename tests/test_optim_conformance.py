"""One conformance suite over every optimizer name regimen registers (STYLE.md, principle 4).

Each optimizer, built by `build_optimizer` as the trainer builds it (with weight decay but in
(a), so that the decayed and undecayed groups both take part), must:

(a) fit a small regression problem (loss below a quarter of the starting loss in 200 full-batch steps);
(b) survive a state_dict round trip through `torch.save` / `torch.load(weights_only=True)`: a
    fresh model and optimizer loaded after 5 steps take the next 5 steps bit for bit like the
    originals, with the same counters and modes in their param groups;
(c) keep float32 and bfloat16 parameters, and the state shaped like them, in their dtype (every
    optimizer here runs in bf16 on CPU; the fused CPU kernels of SGD, Adagrad, Adam and AdamW included);
(d) take the same step from one batch of 32 as from 4 accumulated micro-batches of 8, each loss
    scaled by 8/32 (float64, 1e-6);
(e) leave `.grad` as it found it (accumulation and the noise scale read it after the step), and
    a parameter without a gradient and its state (torch's Adagrad makes it up front) untouched;
(f) return the loss of a closure, evaluated with gradients enabled.

Whether each step is the algorithm's formula is pinned elsewhere: torch's optimizers in
test_optim_formulas.py, regimen's own in test_optim_own_vs_reference.py, Muon in test_muon.py.

Schedule-free optimizers are switched with `set_train_mode` (their `.train()` / `.eval()`):
train before stepping, eval before the parameters are read as the model's weights.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from regimen.optim import NAMES, build_optimizer, set_train_mode
from regimen.strategy import OptimizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# A learning rate that suits each algorithm on the toy problem (sign-based Lion wants a small
# one, LARS a large one because the trust ratio scales it down).
LR = {
    "gd": 0.2,
    "sgd": 0.2,
    "momentum": 0.05,
    "nesterov": 0.05,
    "adagrad": 0.05,
    "rmsprop": 0.003,
    "adam": 0.01,
    "adamw": 0.01,
    "nadam": 0.01,
    "radam": 0.01,
    "adafactor": 0.01,
    "muon": 0.02,
    "lion": 0.003,
    "lamb": 0.01,
    "lars": 1.0,
    "schedulefree_adamw": 0.01,
    "schedulefree_sgd": 0.5,
}
STEPS = 200  # of the convergence test


WEIGHT_DECAY = 0.01


def test_every_name_has_a_learning_rate() -> None:
    # A newly registered optimizer must join the suite, not slip past it.
    assert set(LR) == set(NAMES)


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Two hidden layers, so Muon has hidden matrices and AdamW the output layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)


def make_data(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]], dtype=torch.float64))
    return x.to(dtype), y.to(dtype)


def build(model: nn.Module, name: str, weight_decay: float = WEIGHT_DECAY, **options: Any) -> torch.optim.Optimizer:
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=LR[name], weight_decay=weight_decay, **options))
    set_train_mode(opt, True)
    return opt


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # The loss in float32 at least: bf16 outputs are upcast, float64 ones kept.
    out = model(x)
    return nn.functional.mse_loss(out.float() if out.dtype == torch.bfloat16 else out, y.to(torch.promote_types(out.dtype, torch.float32)))


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, micro: int | None = None) -> None:
    """One optimizer step on (x, y), accumulated over micro-batches of `micro` as the trainer does."""
    opt.zero_grad(set_to_none=True)
    n = len(x)
    micro = micro or n
    for start in range(0, n, micro):
        xb, yb = x[start : start + micro], y[start : start + micro]
        (loss_of(model, xb, yb) * (len(xb) / n)).backward()
    opt.step()


@torch.no_grad()
def eval_params(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The model's weights as evaluation sees them (schedule-free: x, not y); leaves train mode on."""
    set_train_mode(opt, False)
    params = [p.detach().clone() for p in model.parameters()]
    set_train_mode(opt, True)
    return params


# ---- (a) it learns -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_decreases_loss(name: str) -> None:
    x, y = make_data(128)
    model = make_model()
    opt = build(model, name, weight_decay=0.0)  # the LRs above are tuned without decay
    with torch.no_grad():
        before = loss_of(model, x, y).item()
    for _ in range(STEPS):
        step(model, opt, x, y)
    set_train_mode(opt, False)
    with torch.no_grad():
        after = loss_of(model, x, y).item()
    assert after < 0.25 * before, f"{name}: loss {before:.4f} -> {after:.4f} in {STEPS} steps (lr {LR[name]})"


# ---- (b) state_dict round trip --------------------------------------------------------------


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _stateful(opt: torch.optim.Optimizer) -> bool:
    return any(torch.is_tensor(v) and k != "step" for s in opt.state.values() for k, v in s.items())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    batches = [make_data(16, seed=s) for s in range(10)]
    model = make_model()
    opt = build(model, name)
    for x, y in batches[:5]:
        step(model, opt, x, y)
    # Through bytes with weights_only=True, as regimen's checkpoints load.
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = make_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # the load must overwrite these, not coincide with them
    fresh.load_state_dict(saved["model"])
    fresh_opt = build(fresh, name)
    fresh_opt.load_state_dict(saved["optimizer"])
    unloaded = copy.deepcopy(model)
    unloaded_opt = build(unloaded, name)  # same weights, no optimizer state: must differ, if there is state
    for x, y in batches[5:]:
        for m, o in ((model, opt), (fresh, fresh_opt), (unloaded, unloaded_opt)):
            step(m, o, x, y)
    want = eval_params(model, opt)
    got = eval_params(fresh, fresh_opt)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"{name}: parameter {i} differs after the round trip by {(a - b).abs().max().item():.3g}"
    # Counters and modes live in the param groups (schedule-free's step count, averaging weights, train mode).
    assert [_settings(g) for g in fresh_opt.param_groups] == [_settings(g) for g in opt.param_groups]
    if _stateful(opt):
        other = eval_params(unloaded, unloaded_opt)
        assert any(not torch.equal(a, b) for a, b in zip(other, want)), f"{name}: the optimizer state made no difference"


# ---- (c) dtype ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_preserved(name: str, dtype: torch.dtype) -> None:
    x, y = make_data(32, dtype)
    model = make_model(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build(model, name)
    for _ in range(3):
        step(model, opt, x, y)
    after = eval_params(model, opt)
    for i, (p, q) in enumerate(zip(model.parameters(), after)):
        assert p.dtype == dtype and q.dtype == dtype, f"{name}: parameter {i} is {p.dtype}, not {dtype}"
        assert torch.isfinite(q).all(), f"{name}: parameter {i} is not finite in {dtype}"
        for key, value in opt.state[p].items():  # moments and buffers; not step counters or factored (row, column) statistics
            if torch.is_tensor(value) and value.shape == p.shape:
                assert value.dtype == dtype, f"{name}: state {key!r} of parameter {i} is {value.dtype}, not {dtype}"
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{name}: nothing moved in {dtype}"


# ---- (d) gradient accumulation ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_accumulation_equivalence(name: str) -> None:
    whole = make_model(torch.float64)
    split = copy.deepcopy(whole)
    # Muon's iteration pinned to float32 (`auto` picks bfloat16 on CPUs with bf16 instructions):
    # the 1e-6 below is reasoned for float64 gradients and a float32 iteration, on any CPU.
    options = {"ns_dtype": "float32"} if name == "muon" else {}
    opt_whole, opt_split = build(whole, name, **options), build(split, name, **options)
    for s in range(3):  # a few steps, so that the optimizer state takes part
        x, y = make_data(32, torch.float64, seed=10 + s)
        step(whole, opt_whole, x, y)
        step(split, opt_split, x, y, micro=8)
        for i, (a, b) in enumerate(zip(eval_params(split, opt_split), eval_params(whole, opt_whole))):
            err = (a - b).abs().max().item()
            assert err < 1e-6, f"{name}: step {s + 1}, parameter {i}: 4 x 8 accumulated differs from 32 by {err:.3g}"


def test_accumulation_check_can_fail() -> None:
    # Without the 8/32 scaling the accumulated gradient is 4x too big: plain SGD must notice.
    whole = make_model(torch.float64)
    split = copy.deepcopy(whole)
    opt_whole, opt_split = build(whole, "sgd"), build(split, "sgd")
    x, y = make_data(32, torch.float64)
    step(whole, opt_whole, x, y)
    opt_split.zero_grad()
    for start in range(0, 32, 8):
        loss_of(split, x[start : start + 8], y[start : start + 8]).backward()
    opt_split.step()
    assert max((a - b).abs().max().item() for a, b in zip(split.parameters(), whole.parameters())) > 1e-3


# ---- (e) gradients and gradient-less parameters are left alone ---------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_leaves_gradients_and_gradless_parameters_alone(name: str) -> None:
    x, y = make_data(16)
    model = make_model()
    frozen = model[2].weight  # a hidden matrix (Muon's) and decayed: the branch that writes most
    opt = build(model, name)
    loss_of(model, x, y).backward()
    frozen.grad = None
    before, state_before = frozen.detach().clone(), copy.deepcopy(opt.state.get(frozen, {}))
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    opt.step()
    for p in model.parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[id(p)]), f"{name}: step() modified a .grad"
    assert torch.equal(frozen, before), f"{name}: a parameter without a gradient moved"
    state = opt.state.get(frozen, {})
    assert state.keys() == state_before.keys(), f"{name}: state made for a parameter without a gradient"
    assert all(torch.equal(state[k], v) if torch.is_tensor(v) else state[k] == v for k, v in state_before.items())


# ---- (f) the closure's loss ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_closure_loss_is_returned(name: str) -> None:
    x, y = make_data(16)
    model = make_model()
    opt = build(model, name)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        expected = loss_of(model, x, y).item()
    loss = opt.step(closure)
    assert loss is not None and loss.item() == pytest.approx(expected)
    assert all(p.grad is not None for p in model.parameters())  # the closure ran with gradients enabled
