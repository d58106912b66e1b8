"""regimen's own optimizers (Lion, LAMB, LARS, schedule-free SGD / AdamW) step as their references.

Each fast optimizer is checked step by step, in float64, against its line-by-line reference in
`regimen.optim.reference`, on every code path it takes in production:

- every option that changes the update: weight decay on and off, LARS's momentum off, Nesterov
  and `lars_exclude`, schedule-free's warmup and averaging weights;
- on CPU, runs of small tensors updated together, tensors alone in their run, and tensors above
  `CPU_CHUNK_NUMEL` whose temporary comes from the reused scratch buffer (LAMB's Adam step from
  torch's fused kernel there), a buffer that grows when a larger tensor follows;
- the device (CUDA) path, where a bucket is one run and the trust ratios stay on the device,
  run here on CPU tensors by reporting them as off-CPU;
- Lion's compiled CPU kernel (`regimen.optim.native`, one loop over the whole parameter list,
  the default where a C compiler is present) and its foreach path (`fused=False`), both.

Both versions are also pinned by one hand-computed step each. What every optimizer, torch's
included, must do for the trainer (learn, state_dict round trips, dtypes, accumulation, leave
gradients alone) is the conformance suite's (test_optim_conformance.py).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from regimen.optim import cpu, lamb, lars, native
from regimen.optim import reference as ref
from regimen.optim.cpu import CPU_CHUNK_NUMEL, cpu_chunks, scratch_of
from regimen.optim.lamb import LAMB
from regimen.optim.lars import LARS
from regimen.optim.lion import Lion
from regimen.optim.schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE_FREE = (ScheduleFreeAdamW, ScheduleFreeSGD)


# (id, fast class, reference class, hyperparameters): non-default values, so that every option
# that selects a code path is exercised both ways.
CASES: list[tuple[str, type, type, dict[str, Any]]] = [
    ("lion", Lion, ref.LionReference, {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    ("lion_no_wd", Lion, ref.LionReference, {"lr": 0.01}),
    ("lion_foreach", functools.partial(Lion, fused=False), ref.LionReference, {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    ("lamb", LAMB, ref.LAMBReference, {"lr": 0.01, "betas": (0.85, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("lamb_no_wd", LAMB, ref.LAMBReference, {"lr": 0.02}),
    ("lars", LARS, ref.LARSReference, {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01, "trust_coefficient": 0.01}),
    ("lars_nesterov", LARS, ref.LARSReference, {"lr": 0.5, "momentum": 0.8, "weight_decay": 0.01, "nesterov": True}),
    ("lars_no_wd", LARS, ref.LARSReference, {"lr": 0.5, "momentum": 0.9, "trust_coefficient": 0.01}),
    ("lars_no_momentum", LARS, ref.LARSReference, {"lr": 0.5, "momentum": 0.0, "weight_decay": 0.01, "trust_coefficient": 0.01}),
    (
        "sf_adamw",
        ScheduleFreeAdamW,
        ref.ScheduleFreeAdamWReference,
        {"lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 0.05, "warmup_steps": 10},
    ),
    ("sf_adamw_r", ScheduleFreeAdamW, ref.ScheduleFreeAdamWReference, {"lr": 0.01, "r": 1.0, "weight_lr_power": 1.0}),
    ("sf_sgd", ScheduleFreeSGD, ref.ScheduleFreeSGDReference, {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.05, "warmup_steps": 10}),
    ("sf_sgd_no_wd", ScheduleFreeSGD, ref.ScheduleFreeSGDReference, {"lr": 0.05, "momentum": 0.8}),
]
IDS = [c[0] for c in CASES]
STEPS = 100  # on the small MLP
STEPS_ON_EVERY_PATH = 20  # on the tensors below: past schedule-free's warmup of 10 steps, with a mode switch at 10

# Mixed shapes: small ones (1-D among them: LARS excludes them) that share a CPU run, two of
# 40,000 that take one run each, three above CPU_CHUNK_NUMEL (the scratch buffer grows from the
# first to the second; LARS excludes the 1-D one), and an all-zero one last (the norm-0 rules).
SMALL = [(4, 3), (5,), (2, 3, 2), (1,), (3, 3)]
SHAPES = [*SMALL, (200, 200), (200, 200), (257, 256), (300, 300), (70_000,)]
LARGEST = 300 * 300


def _random_tensors(dtype: torch.dtype = torch.float64, shapes: list[tuple[int, ...]] = SMALL) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    tensors.append(torch.zeros(2, 2, dtype=dtype))
    return tensors


def test_the_tensors_reach_every_cpu_path() -> None:
    tensors = _random_tensors(shapes=SHAPES)
    runs = [tensors[r] for r in cpu_chunks(tensors)]
    assert any(len(run) > 1 for run in runs), "no run of several tensors"
    assert any(len(run) == 1 and run[0].numel() <= CPU_CHUNK_NUMEL for run in runs), "no tensor alone in its run"
    assert sum(len(run) == 1 and run[0].numel() > CPU_CHUNK_NUMEL for run in runs) >= 2, "fewer than two scratch tensors"


@pytest.fixture(params=["cpu", "device"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The CPU path, or the device (CUDA) one run on CPU tensors that report themselves off-CPU."""
    if request.param == "device":
        for module in (cpu, lamb, lars):
            monkeypatch.setattr(module, "on_cpu", lambda t: False)
    yield request.param


# Whether a case's CPU path takes a temporary from the scratch buffer for its large tensors:
# LARS takes none without weight decay (the gradient is its direction); schedule-free SGD takes one
# even then, unused.
USES_SCRATCH = {name: name != "lars_no_wd" for name in IDS}
# Lion's kernel (where it builds) updates every tensor in place in one loop: no temporary at all.
USES_SCRATCH.update({name: native.lion_kernel() is None for name in ("lion", "lion_no_wd")})


def _x_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The schedule-free average x, recovered from y (the parameter) and z in train mode."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    beta = group["betas"][0] if "betas" in group else group["momentum"]
    return torch.lerp(p, opt.state[p]["z"], 1.0 - 1.0 / beta)


def _step_twins(a: Any, b: Any, params: list[torch.Tensor], twins: list[torch.Tensor], steps: int, seed: int) -> None:
    """Step optimizers `a` (over `params`) and `b` (over `twins`) `steps` times on the same random gradients."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        a.step()
        b.step()


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        err = (x - y).abs().max().item()
        assert err <= 1e-6, f"{what}: tensor {i} differs from the reference by {err:.3g}"


@pytest.mark.parametrize(("name", "fast_cls", "ref_cls", "kwargs"), CASES, ids=IDS)
def test_matches_reference_on_random_gradients(name: str, fast_cls: type, ref_cls: type, kwargs: dict[str, Any], path: str) -> None:
    fast_params = _random_tensors(shapes=SHAPES)
    ref_params = [p.clone() for p in fast_params]
    fast, slow = fast_cls(fast_params, **kwargs), ref_cls(ref_params, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS_ON_EVERY_PATH):
        for p, q in zip(fast_params, ref_params):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        fast.step()
        slow.step()
        _assert_close(fast_params, ref_params, f"{name} ({path}) step {step + 1}")
        if fast_cls in SCHEDULE_FREE:
            x_fast, x_ref = [_x_of(fast, p) for p in fast_params], [slow.state[q]["x"] for q in ref_params]
            _assert_close(x_fast, x_ref, f"{name} ({path}) x, step {step + 1}")
            if step == STEPS_ON_EVERY_PATH // 2:
                fast.eval()
                slow.eval()
                _assert_close(fast_params, ref_params, f"{name} ({path}) eval() (x) at step {step + 1}")
                fast.train()
                slow.train()
                _assert_close(fast_params, ref_params, f"{name} ({path}) train() (y) at step {step + 1}")
    # The large tensors took the path meant for them: a scratch buffer as large as the largest (CPU only).
    buffers = scratch_of(fast)._buffers
    expected = {torch.float64: LARGEST} if path == "cpu" and USES_SCRATCH[name] else {}
    assert {dtype: b.numel() for dtype, b in buffers.items()} == expected


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.5 * x[:, :1]
    return x, y


@pytest.mark.parametrize(("name", "fast_cls", "ref_cls", "kwargs"), CASES, ids=IDS)
def test_matches_reference_on_a_small_mlp(name: str, fast_cls: type, ref_cls: type, kwargs: dict[str, Any]) -> None:
    x, y = _regression_data()
    fast_model = _mlp()
    ref_model = copy.deepcopy(fast_model)
    fast, slow = fast_cls(fast_model.parameters(), **kwargs), ref_cls(ref_model.parameters(), **kwargs)
    for step in range(STEPS):
        for model in (fast_model, ref_model):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
        fast.step()
        slow.step()
        _assert_close(list(fast_model.parameters()), list(ref_model.parameters()), f"{name} step {step + 1}")
        if fast_cls in SCHEDULE_FREE and step == STEPS // 2:
            fast.eval()
            slow.eval()
            _assert_close(list(fast_model.parameters()), list(ref_model.parameters()), f"{name} eval() (x) at step {step + 1}")
            fast.train()
            slow.train()


# ---- one step by hand, for both the fast and the reference version ------------------------------


def _run(cls: type, params: list[torch.Tensor], grads: list[list[list[float]]], **kwargs: Any) -> torch.optim.Optimizer:
    opt = cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return opt


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("cls", [Lion, ref.LionReference])
def test_lion_by_hand(cls: type) -> None:
    # lr 0.1, betas (0.9, 0.99), wd 0.5; theta = [1, -2, 0.5]; m starts at 0.
    # step 1, g = [0.3, -0.1, 0]:   c = 0.1 g = [0.03, -0.01, 0]  ->  sign [1, -1, 0]
    #   theta = theta * (1 - 0.1*0.5) - 0.1 sign = [0.95 - 0.1, -1.9 + 0.1, 0.475] = [0.85, -1.8, 0.475]
    #   m = 0.01 g = [0.003, -0.001, 0]
    # step 2, g = [-0.05, -0.1, 0.2]: c = 0.9 m + 0.1 g = [0.0027 - 0.005, -0.0009 - 0.01, 0.02] -> sign [-1, -1, 1]
    #   (the first coordinate's sign flips if c wrongly used beta2: 0.99*0.003 - 0.0005 > 0)
    #   theta = [0.85*0.95 + 0.1, -1.8*0.95 + 0.1, 0.475*0.95 - 0.1] = [0.9075, -1.61, 0.35125]
    #   m = 0.99 m + 0.01 g = [0.00297 - 0.0005, -0.00099 - 0.001, 0.002] = [0.00247, -0.00199, 0.002]
    theta = _t(1.0, -2.0, 0.5)
    opt = _run(cls, [theta], [[[0.3, -0.1, 0.0]], [[-0.05, -0.1, 0.2]]], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    torch.testing.assert_close(theta, _t(0.9075, -1.61, 0.35125))
    torch.testing.assert_close(opt.state[theta]["exp_avg"], _t(0.00247, -0.00199, 0.002))


@pytest.mark.parametrize("cls", [LAMB, ref.LAMBReference])
def test_lamb_by_hand(cls: type) -> None:
    # lr 0.1, betas (0.9, 0.999), eps 1e-6, wd 0.1; one step (t = 1, so m_hat = g and v_hat = g^2).
    # W = [3, 4] (norm 5), g = [0.1, -0.2]:
    #   u = g / (|g| + eps) + 0.1 W = [0.1/(0.1+1e-6) + 0.3, -0.2/(0.2+1e-6) + 0.4]
    #     ~ [1.3, -0.6] (norm ~ sqrt(2.05));  r = 5 / ||u||;  W -= 0.1 r u  ~ [3 - 0.453980, 4 + 0.209529] = [2.546020, 4.209529]
    # b = [0, 0] (norm 0, so r = 1), g = [0.5, 0]:  u = [0.5/(0.5+1e-6), 0];  b = -0.1 u
    w, b = _t(3.0, 4.0), _t(0.0, 0.0)
    _run(cls, [w, b], [[[0.1, -0.2], [0.5, 0.0]]], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    u = _t(0.1 / (0.1 + 1e-6) + 0.3, -0.2 / (0.2 + 1e-6) + 0.4)
    torch.testing.assert_close(w, _t(3.0, 4.0) - 0.1 * (5.0 / u.norm()) * u)
    torch.testing.assert_close(w, _t(2.546020, 4.209529), atol=1e-6, rtol=0)  # the same, as numbers
    torch.testing.assert_close(b, _t(-0.1 * 0.5 / (0.5 + 1e-6), 0.0))


@pytest.mark.parametrize("cls", [LARS, ref.LARSReference])
def test_lars_by_hand(cls: type) -> None:
    # lr 0.1, momentum 0.9, wd 0.01, trust 0.001, eps 0.
    # W = [[3, 4]] (2-D: adapted; norm 5), g = [[0.6, 0.8]] (norm 1) at step 1:
    #   local_lr = 0.001 * 5 / (1 + 0.01*5) = 0.005 / 1.05
    #   v = local_lr * (g + 0.01 W) = local_lr * [0.63, 0.84];  W = W - 0.1 v
    # b = [1] (1-D: excluded, so local_lr = 1 and no decay), g = 0.5 at both steps:
    #   step 1: v = 0.5, b = 1 - 0.05 = 0.95;  step 2: v = 0.9*0.5 + 0.5 = 0.95, b = 0.95 - 0.095 = 0.855
    w, b = torch.tensor([[3.0, 4.0]], dtype=torch.float64), _t(1.0)
    opt = _run(cls, [w, b], [[[[0.6, 0.8]], [0.5]]], lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001, eps=0.0)
    local_lr = 0.005 / 1.05
    torch.testing.assert_close(w, torch.tensor([[3.0 - 0.1 * local_lr * 0.63, 4.0 - 0.1 * local_lr * 0.84]], dtype=torch.float64))
    torch.testing.assert_close(b, _t(0.95))
    w.grad = None
    b.grad = _t(0.5)
    opt.step()
    torch.testing.assert_close(b, _t(0.855))


@pytest.mark.parametrize("cls", [ScheduleFreeSGD, ref.ScheduleFreeSGDReference])
def test_schedulefree_sgd_by_hand(cls: type) -> None:
    # lr 0.5, momentum 0.9, warmup 2 steps, r 0, weight_lr_power 2; theta = y = x = z = 1.
    # step 1: lr_1 = 0.5 * 1/2 = 0.25; w_1 = 0.25^2 = 0.0625; c = 1.    g = 2:
    #   z = 1 - 0.25*2 = 0.5;  x = z = 0.5;  y = 0.9*0.5 + 0.1*0.5 = 0.5
    # step 2: lr_2 = 0.5; w_2 = 0.5^2 = 0.25; c = 0.25 / 0.3125 = 0.8.  g = 1:
    #   z = 0.5 - 0.5 = 0;  x = 0.2*0.5 + 0.8*0 = 0.1;  y = 0.9*0.1 + 0.1*0 = 0.09
    theta = _t(1.0)
    opt = _run(cls, [theta], [[[2.0]], [[1.0]]], lr=0.5, momentum=0.9, warmup_steps=2)
    torch.testing.assert_close(theta, _t(0.09))  # train mode: y
    opt.eval()
    torch.testing.assert_close(theta, _t(0.1))  # eval mode: x
    opt.train()
    torch.testing.assert_close(theta, _t(0.09))


@pytest.mark.parametrize("cls", [ScheduleFreeAdamW, ref.ScheduleFreeAdamWReference])
def test_schedulefree_adamw_by_hand(cls: type) -> None:
    # lr 0.1, betas (0.9, 0.999), eps 0, wd 0.1 (at y); theta = 1.
    # step 1 (c = 1), g = 2:  v = 0.001*4 = 0.004;  v_hat = 0.004/0.001 = 4
    #   d = 2/sqrt(4) + 0.1*1 = 1.1;  z = 1 - 0.11 = 0.89;  x = y = 0.89
    # step 2 (equal weights: c = 0.5), g = -1:  v = 0.999*0.004 + 0.001*1 = 0.004996
    #   v_hat = 0.004996 / (1 - 0.999^2) = 0.004996 / 0.001999 = 2.49925;  d = -1/sqrt(v_hat) + 0.1*0.89 = -0.54355
    #   z = 0.89 + 0.054355 = 0.944355;  x = (0.89 + z)/2 = 0.917178;  y = 0.9 x + 0.1 z = 0.919895
    theta = _t(1.0)
    opt = _run(cls, [theta], [[[2.0]], [[-1.0]]], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.1)
    d = -1.0 / math.sqrt(0.004996 / 0.001999) + 0.089
    z = 0.89 - 0.1 * d
    x = 0.5 * 0.89 + 0.5 * z
    torch.testing.assert_close(theta, _t(0.9 * x + 0.1 * z))
    torch.testing.assert_close(theta, _t(0.919895), atol=1e-6, rtol=0)
    opt.eval()
    torch.testing.assert_close(theta, _t(x))
    torch.testing.assert_close(theta, _t(0.917178), atol=1e-6, rtol=0)


# ---- low precision, on every path -----------------------------------------------------------

FAST = [(name, cls, kwargs) for name, cls, _, kwargs in CASES]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "cls", "kwargs"), FAST, ids=IDS)
def test_low_precision_keeps_its_dtype_on_every_path(name: str, cls: type, kwargs: dict[str, Any], dtype: torch.dtype, path: str) -> None:
    """bf16 and float32 parameters, large ones included (the scratch buffer, LAMB's fused Adam step), stay in their dtype."""
    params = _random_tensors(dtype, shapes=SHAPES)
    before = [p.clone() for p in params]
    opt = cls(params, **kwargs)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    if cls in SCHEDULE_FREE:
        opt.eval()
    for i, p in enumerate(params):
        assert p.dtype == dtype
        assert torch.isfinite(p.float()).all(), f"tensor {i} is not finite"
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == dtype, f"state {key!r} is {value.dtype}, the parameter {dtype}"
    assert not torch.equal(params[-2], before[-2]), "the large tensors did not move"


@pytest.mark.parametrize("cls", SCHEDULE_FREE)
def test_schedulefree_step_in_eval_mode_raises_and_modes_are_idempotent(cls: type) -> None:
    params = _random_tensors()
    opt = cls(params)
    for _ in range(2):  # after one step x = y = z (the first z gets all the weight)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    y = [p.clone() for p in params]
    opt.eval()
    x = [p.clone() for p in params]
    opt.eval()  # a second eval() must not move the parameters again
    _assert_close(params, x, "eval() twice")
    assert not torch.allclose(params[0], y[0])
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        opt.step()
    opt.train()
    opt.train()
    _assert_close(params, y, "train() twice")
    opt.step()  # fine again


def test_schedulefree_fresh_optimizer_is_in_train_mode_and_eval_is_a_no_op() -> None:
    params = _random_tensors()
    before = [p.clone() for p in params]
    opt = ScheduleFreeAdamW(params)
    assert all(group["train_mode"] for group in opt.param_groups)
    opt.eval()  # no z yet: x = y, nothing moves
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_with_every_tensor_excluded_is_torch_momentum_sgd(nesterov: bool) -> None:
    # Excluded tensors get local_lr = 1 and no decay: exactly torch.optim.SGD with momentum.
    params = _random_tensors()
    twins = [p.clone() for p in params]
    lars = LARS([{"params": params, "lars_exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    sgd = torch.optim.SGD(twins, lr=0.1, momentum=0.9, nesterov=nesterov)
    _step_twins(lars, sgd, params, twins, steps=20, seed=3)
    _assert_close(params, twins, "LARS(lars_exclude=True) vs SGD")


def _lars_run(lars_cls: type, lars_exclude: bool | None) -> list[torch.Tensor]:
    params = _random_tensors()
    kwargs = {"lr": 0.5, "weight_decay": 0.05, "trust_coefficient": 0.01}
    # The first group (incl. the 1-D tensor params[1]) sets lars_exclude; the second keeps the default.
    opt = lars_cls([{"params": params[:3], "lars_exclude": lars_exclude}, {"params": params[3:]}], **kwargs)
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return params


@pytest.mark.parametrize("lars_exclude", [None, False, True])
def test_lars_exclude_per_group_matches_reference(lars_exclude: bool | None) -> None:
    _assert_close(_lars_run(LARS, lars_exclude), _lars_run(ref.LARSReference, lars_exclude), f"LARS lars_exclude={lars_exclude}")


def test_lars_exclude_changes_only_what_it_says() -> None:
    default, adapt_all, exclude_all = (_lars_run(LARS, v) for v in (None, False, True))
    assert not torch.allclose(default[1], adapt_all[1])  # 1-D: excluded by default, adapted with False
    assert torch.equal(default[0], adapt_all[0])  # 2-D: adapted either way
    assert not torch.allclose(default[0], exclude_all[0])  # 2-D: excluded with True
    assert all(torch.equal(a, b) for a, b in zip(default[3:], exclude_all[3:]))  # the other group is untouched


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (Lion, {"betas": (0.9, 1.0)}, "betas"),
        (LAMB, {"lr": -1.0}, "lr"),
        (LARS, {"momentum": 1.0}, "momentum"),
        (ScheduleFreeSGD, {"momentum": 0.0}, "momentum"),
        (ScheduleFreeAdamW, {"betas": (0.0, 0.999)}, "beta1"),
        (ScheduleFreeAdamW, {"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_bad_hyperparameters_are_refused(cls: type, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


# ---- Lion's compiled kernel ---------------------------------------------------------------------


def test_lion_kernel_in_float32_follows_the_reference_where_the_sign_is_certain() -> None:
    """float32, the dtype models train in: every element the kernel updates matches the float64
    reference, except where c = lerp(m, g, 1 - beta1) is so close to 0 that float32 rounding may
    flip its sign (a legitimate difference of 2 lr, as between any two float32 implementations).
    The kernel's result does not depend on the number of threads."""
    if native.lion_kernel() is None:
        pytest.skip(f"the kernel is not built here: {native.status()} (the foreach path is tested above)")
    kwargs = {"lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 0.1}
    params = _random_tensors(torch.float32, SHAPES)
    wide = [p.double() for p in params]
    fast, slow = Lion(params, **kwargs), ref.LionReference(wide, **kwargs)
    g = torch.Generator().manual_seed(3)
    for step in range(5):
        for p, q in zip(params, wide):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.double()
        m_before = [slow.state[q]["exp_avg"].clone() if slow.state[q] else torch.zeros_like(q) for q in wide]
        fast.step()
        slow.step()
        for i, (p, q, m) in enumerate(zip(params, wide, m_before, strict=True)):
            c = m + 0.1 * (q.grad - m)
            # float32 lerp: a few ulps of the larger operand; margin x8.
            certain = c.abs() > 8 * torch.finfo(torch.float32).eps * (m.abs() + q.grad.abs())
            err = (p.double() - q).abs()[certain].max().item() if certain.any() else 0.0
            assert err <= 1e-5 * (1 + q.abs().max().item()), f"step {step + 1}, tensor {i}: {err:.3g} from the reference"
            q.copy_(p.double())  # the next step starts from the same float32 state
            slow.state[q]["exp_avg"].copy_(fast.state[p]["exp_avg"].double())
    # The same steps on 2 threads give the same bits (the kernel splits tensors into blocks, never a sum).
    again = _random_tensors(torch.float32, SHAPES)
    threaded = Lion(again, **kwargs)
    one = _random_tensors(torch.float32, SHAPES)
    single = Lion(one, **kwargs)
    before = torch.get_num_threads()
    try:
        for a, b in zip(again, one):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel()))
            b.grad = a.grad.clone()
        torch.set_num_threads(2)
        threaded.step()
        torch.set_num_threads(1)
        single.step()
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(again, one))


def test_lion_kernel_and_foreach_path_agree_in_float64() -> None:
    kwargs = {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}
    params = _random_tensors(torch.float64, SHAPES)
    other = [p.clone() for p in params]
    _step_twins(Lion(params, **kwargs), Lion(other, fused=False, **kwargs), params, other, steps=10, seed=4)
    _assert_close(params, other, "kernel vs foreach")


def test_lion_fused_true_needs_the_kernel_and_none_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """`fused=True` where the kernel cannot be built is a RuntimeError naming why; the default falls back."""
    native.lion_kernel.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("REGIMEN_CACHE", str(tmp_path))
    try:
        assert native.lion_kernel() is None and "no C compiler" in native.status()
        w = torch.zeros(3, requires_grad=True)
        with pytest.raises(RuntimeError, match="no C compiler"):
            Lion([w], fused=True)
        opt = Lion([w], lr=0.1)  # falls back to the foreach path
        w.grad = torch.tensor([1.0, -1.0, 0.0])
        opt.step()
        assert w.tolist() == pytest.approx([-0.1, 0.1, 0.0])
    finally:
        native.lion_kernel.cache_clear()


def test_lion_on_fake_tensors_takes_torchs_ops() -> None:
    """`regimen plan` steps Lion on fake tensors: the kernel must not read their (absent) storage.

    It crashed the process (a segfault in the test suite) before `native.fits` refused fake
    tensors and active dispatch modes; the foreach path gives the fake mode every op to see.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.nn.Parameter(torch.zeros(64, 64))
        w.grad = torch.ones(64, 64)
        assert not native.fits([w, w.grad])
        opt = Lion([w], lr=0.1, weight_decay=0.1)
        opt.step()
        assert w.shape == (64, 64) and opt.state[w]["exp_avg"].shape == (64, 64)
    real = torch.zeros(4)
    assert native.fits([real, real.clone()]), "a plain CPU tensor outside any mode still takes the kernel"
