"""regimen's Muon: torch's Muon bit for bit in bfloat16, the closed-form update in float32 (with
and without Nesterov), and the rule by which `ns_dtype = "auto"` picks the dtype on a machine."""

from __future__ import annotations

import copy
from collections.abc import Iterator

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


@pytest.mark.parametrize("nesterov", [True, False])
def test_float32_matches_the_formula_in_float64(nesterov: bool) -> None:
    lr, wd, mu = 0.01, 0.1, 0.95
    params = _params()
    opt = Muon(params, lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov, adjust_lr_fn="original", ns_dtype="float32")
    got = _run(opt, params)
    want = [p.detach().double() for p in _params()]
    bufs = [torch.zeros_like(w) for w in want]
    for step in range(4):
        for i, g in enumerate(_grads(step)):
            g = g.double()
            bufs[i] = mu * bufs[i] + (1 - mu) * g
            direction = (1 - mu) * g + mu * bufs[i] if nesterov else bufs[i]  # Nesterov: lerp(g, buf, mu)
            rows, cols = want[i].shape
            want[i] = want[i] * (1 - lr * wd) - lr * max(1.0, rows / cols) ** 0.5 * _reference_ns(direction)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5)
    # The momentum is the plain average of the gradients: the iteration must not rescale it.
    for p, buf in zip(params, bufs, strict=True):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), buf, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_buffer_after_one_step_is_the_closed_form(nesterov: bool, ns_dtype: str) -> None:
    # m = lerp(0, g, 1 - mu) = (1 - mu) g: 0.05 for g = 1 and mu = 0.95, whatever the iteration does
    # with it afterwards (it once divided the buffer by its own norm in place: 1/sqrt(12) = 0.2887).
    w = torch.nn.Parameter(torch.zeros(3, 4))
    opt = Muon([w], lr=0.01, momentum=0.95, nesterov=nesterov, ns_dtype=ns_dtype)
    w.grad = torch.ones(3, 4)
    opt.step()
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.full((3, 4), 0.05))


def test_newton_schulz_leaves_its_input_alone() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.randn(6, 4, dtype=dtype)
        before = g.clone()
        newton_schulz(g, COEFFICIENTS, 5, 1e-7, dtype)
        assert torch.equal(g, before), dtype


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


# ---- how "auto" decides: CPU flags and oneDNN (mocked), GPU compute capability ---------------------

# Flags as Linux reports them (abridged to what matters), for the CPUs a run may land on.
CPUS = {
    "sapphire-rapids": ("avx2 avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile", True),
    "cooper-lake": ("avx2 avx512f avx512bw avx512vl avx512_bf16", True),
    "zen4": ("avx2 avx512f avx512bw avx512vl avx512_bf16", True),
    "ice-lake": ("avx2 avx512f avx512bw avx512vl avx512_vnni", False),  # oneDNN says "supported": emulated
    "skylake-x": ("avx2 avx512f avx512bw avx512vl", False),
    "zen3": ("avx2 fma", False),
    "graviton3": ("fp asimd sve bf16 i8mm", True),
    "graviton2": ("fp asimd", False),
}


@pytest.mark.parametrize("cpu", list(CPUS))
def test_auto_picks_bfloat16_only_on_cpus_that_multiply_it(cpu: str) -> None:
    flags, native = CPUS[cpu]
    assert muon_module.cpu_bf16_is_native(frozenset(flags.split()), onednn=True) is native
    # Without oneDNN torch's fallback kernels emulate bf16 even on a capable CPU.
    assert muon_module.cpu_bf16_is_native(frozenset(flags.split()), onednn=False) is False


def test_cpu_flags_are_read_from_proc_cpuinfo_on_x86_and_arm() -> None:
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512_bf16\nbugs\t\t: spectre_v1\n"
    arm = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd40\n"
    assert muon_module.parse_cpuinfo_flags(x86) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert muon_module.parse_cpuinfo_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert muon_module.parse_cpuinfo_flags("") == frozenset()  # unknown: "auto" then uses float32


@pytest.fixture
def fresh_native_bf16() -> Iterator[None]:
    muon_module.native_bf16.cache_clear()  # the answer is cached per process: start and end clean
    yield
    muon_module.native_bf16.cache_clear()


@pytest.mark.usefixtures("fresh_native_bf16")
@pytest.mark.parametrize(("flags", "onednn", "native"), [("avx512f avx512_bf16", True, True), ("avx512f", True, False), ("", False, False)])
def test_native_bf16_on_cpu_asks_the_flags_and_onednn_once(monkeypatch: pytest.MonkeyPatch, flags: str, onednn: bool, native: bool) -> None:
    calls: list[str] = []
    monkeypatch.setattr(muon_module, "cpu_flags", lambda: calls.append("flags") or frozenset(flags.split()))
    monkeypatch.setattr(muon_module, "onednn_bf16", lambda: onednn)
    assert muon_module.native_bf16(torch.device("cpu")) is native
    assert muon_module.native_bf16(torch.device("cpu")) is native
    assert calls == ["flags"]  # cached: /proc/cpuinfo is not read at every step


@pytest.mark.usefixtures("fresh_native_bf16")
@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_native_bf16_on_cuda_from_ampere_on(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], native: bool) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert muon_module.native_bf16(torch.device("cuda", 0)) is native


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
