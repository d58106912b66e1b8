"""regimen's Muon: torch's Muon bit for bit in bfloat16, the closed-form update in float32."""

from __future__ import annotations

import copy

import pytest
import torch

from regimen.errors import UserError
from regimen.optim import build_optimizer
from regimen.optim import muon as muon_module
from regimen.optim.muon import Muon, newton_schulz
from regimen.strategy import OptimizerConfig, Strategy

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SHAPES = [(12, 5), (5, 12), (8, 8)]  # tall (transposed inside), wide, square


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*s, generator=g) for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 4) -> list[torch.Tensor]:
    for step in range(steps):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_bfloat16_is_torch_muon_bit_for_bit(nesterov: bool, adjust_lr_fn: str | None) -> None:
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, theirs = _params(), _params()
    a = _run(Muon(ours, ns_dtype="bfloat16", **kw), ours)
    b = _run(torch.optim.Muon(theirs, **kw), theirs)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def _reference_ns(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration written out in float64: X <- aX + (bA + cA^2)X, A = XX^T."""
    a, b, c = COEFFICIENTS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / max(x.norm().item(), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_float32_matches_the_formula_in_float64() -> None:
    lr, wd, mu = 0.01, 0.1, 0.95
    params = _params()
    got = _run(Muon(params, lr=lr, weight_decay=wd, momentum=mu, adjust_lr_fn="original", ns_dtype="float32"), params)
    want = [p.detach().double() for p in _params()]
    bufs = [torch.zeros_like(w) for w in want]
    for step in range(4):
        for i, g in enumerate(_grads(step)):
            g = g.double()
            bufs[i] = mu * bufs[i] + (1 - mu) * g
            direction = (1 - mu) * g + mu * bufs[i]  # Nesterov: lerp(g, buf, mu)
            rows, cols = want[i].shape
            want[i] = want[i] * (1 - lr * wd) - lr * max(1.0, rows / cols) ** 0.5 * _reference_ns(direction)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5)


def test_float32_orthogonalises_better_than_bfloat16() -> None:
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    exact = _reference_ns(g)
    err32 = (newton_schulz(g, COEFFICIENTS, 5, 1e-7, torch.float32).double() - exact).abs().max()
    err16 = (newton_schulz(g, COEFFICIENTS, 5, 1e-7, torch.bfloat16).double() - exact).abs().max()
    assert err32 < 1e-4 < err16


@pytest.mark.parametrize(("native", "dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_uses_bfloat16_only_where_the_hardware_has_it(monkeypatch: pytest.MonkeyPatch, native: bool, dtype: torch.dtype) -> None:
    monkeypatch.setattr(muon_module, "native_bf16", lambda device: native)
    seen: list[torch.dtype] = []
    real = muon_module.newton_schulz
    monkeypatch.setattr(muon_module, "newton_schulz", lambda *a: seen.append(a[-1]) or real(*a))
    params = _params()
    _run(Muon(params, lr=0.01), params, steps=1)
    assert seen == [dtype] * len(SHAPES)


def test_state_is_torch_muons_so_checkpoints_load_either_way() -> None:
    theirs, ours = _params(), _params()
    torch_opt = torch.optim.Muon(theirs, lr=0.02)
    _run(torch_opt, theirs, steps=2)
    our_opt = Muon(ours, lr=0.02, ns_dtype="bfloat16")
    our_opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # as from a file: no shared tensors
    with torch.no_grad():
        for mine, other in zip(ours, theirs, strict=True):
            mine.copy_(other)
    for x, y in zip(_run(our_opt, ours, steps=1), _run(torch_opt, theirs, steps=1), strict=True):
        assert torch.equal(x, y)  # the momentum carried over: the next step is torch's


def test_built_from_the_strategy_with_its_ns_dtype() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))
    opt = build_optimizer(model, OptimizerConfig(name="muon", lr=0.01, ns_dtype="float32"))
    muons = [o for o in opt.optimizers if isinstance(o, Muon)]  # type: ignore[attr-defined]
    assert len(muons) == 1 and muons[0].ns_dtype == "float32"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.ns_dtype=float16", "allowed: auto, bfloat16, float32"),
        ("optimizer.adjust_lr_fn=rms", "allowed: original, match_rms_adamw"),
    ],
)
def test_bad_muon_settings_are_user_errors(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Strategy.load(None, ["optimizer.name=muon", override]).resolve()


def test_ns_dtype_belongs_to_muon_only() -> None:
    with pytest.raises(UserError, match="adamw has no such parameter"):
        Strategy.load(None, ["optimizer.name=adamw", "optimizer.ns_dtype=float32"]).resolve()
