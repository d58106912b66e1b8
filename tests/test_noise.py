"""The gradient noise scale estimator (regimen.noise) against a problem solved in closed form.

The problem: linear regression with x ~ N(0, I_d), y = x.w* + eps, eps ~ N(0, sigma^2), and the
per-example loss l = 0.5 (x.w - y)^2 at a fixed w != w*. With delta = w - w*, the per-example
gradient is g = x (x.delta - eps), so

    G = E[g] = E[x x^T] delta = delta
    E[g g^T] = E[x x^T (x.delta)^2] + sigma^2 I = |delta|^2 I + 2 delta delta^T + sigma^2 I

(Isserlis: E[x_i x_j x_k x_l] = d_ij d_kl + d_ik d_jl + d_il d_jk, and eps is independent of x
with mean 0, so the cross term vanishes). Hence

    tr(S) = tr(E[g g^T]) - |G|^2 = (d + 1) |delta|^2 + d sigma^2
    B_noise = tr(S) / |G|^2 = (d + 1) + d sigma^2 / |delta|^2.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from regimen.noise import ConsecutiveGradients, GradientPair, NoiseScaleEstimator, grad_sqnorm

F64 = torch.float64


def _delta(d: int, norm: float) -> torch.Tensor:
    """A fixed w - w* with the given norm, not aligned with any axis."""
    v = torch.linspace(-1.0, 2.0, d, dtype=F64)
    return v * (norm / v.norm())


def _analytic(d: int, sigma: float, delta: torch.Tensor) -> tuple[float, float]:
    """(|G|^2, tr S) of the module docstring's problem."""
    dn2 = delta.square().sum().item()
    return dn2, (d + 1) * dn2 + d * sigma**2


def _per_example_grads(gen: torch.Generator, delta: torch.Tensor, sigma: float, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-example gradients g = x (x.delta - eps), shape (*shape, d)."""
    x = torch.randn(*shape, delta.numel(), generator=gen, dtype=F64)
    eps = sigma * torch.randn(*shape, generator=gen, dtype=F64)
    return x * (x @ delta - eps).unsqueeze(-1)


def test_monte_carlo_confirms_the_closed_form_covariance():
    gen = torch.Generator().manual_seed(0)
    d, sigma, n = 10, 1.0, 400_000
    delta = _delta(d, 2.0)
    g = _per_example_grads(gen, delta, sigma, (n,))

    second_moment = g.T @ g / n
    eye = torch.eye(d, dtype=F64)
    expected = delta.square().sum() * eye + 2 * torch.outer(delta, delta) + sigma**2 * eye
    # Entries of E[gg^T] are O(5) here with Monte Carlo error ~0.03; dropping the 2 delta delta^T
    # term would be off by up to 2 * max(delta_i)^2 ~ 1.8.
    assert torch.allclose(second_moment, expected, atol=0.25)

    grad_sqnorm_true, trace_cov_true = _analytic(d, sigma, delta)
    assert (g.mean(0) - delta).abs().max().item() < 0.05
    # 3% is loose (measured error ~0.3%) yet fails for d |delta|^2 instead of (d + 1) |delta|^2 (8% off).
    assert g.var(0).sum().item() == pytest.approx(trace_cov_true, rel=0.03)
    assert grad_sqnorm_true == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("d", "sigma", "delta_norm", "small", "big", "steps"),
    [
        (10, 1.0, 1.0, 16, 256, 4000),  # B_noise = 11 + 10 = 21, between b and B
        (4, 2.0, 0.5, 8, 512, 3000),  # B_noise = 5 + 4 * 4 / 0.25 = 69, noise-dominated
    ],
)
def test_estimator_recovers_the_analytic_noise_scale(d, sigma, delta_norm, small, big, steps):
    gen = torch.Generator().manual_seed(1)
    delta = _delta(d, delta_norm)
    grad_sqnorm_true, trace_cov_true = _analytic(d, sigma, delta)
    expected = trace_cov_true / grad_sqnorm_true

    # ema 0.9995 averages about 2000 pairs: measured over 30 seeds the relative spread is 2-3%
    # (worst 5%), so 15% is a >5-sigma bound. An average of per-step ratios instead of a ratio of
    # averages is heavy-tailed here (its median is 25-35% low), and a swapped b/B or a missing
    # bias correction is off by far more.
    est = NoiseScaleEstimator(ema=0.9995)
    for start in range(0, steps, 500):
        g = _per_example_grads(gen, delta, sigma, (min(500, steps - start), big))
        # The small batch is the first `small` samples of the big one, as a micro-batch is.
        small_sq = g[:, :small].mean(1).square().sum(-1)
        big_sq = g.mean(1).square().sum(-1)
        for s, b in zip(small_sq.tolist(), big_sq.tolist()):  # floats: faster than 0-dim tensors
            est.update(s, small, b, big)

    assert est.num_updates == steps
    assert est.noise_scale == pytest.approx(expected, rel=0.15)
    assert est.grad_sqnorm == pytest.approx(grad_sqnorm_true, rel=0.15)
    assert est.trace_cov == pytest.approx(trace_cov_true, rel=0.15)


def test_bias_corrected_ema_by_hand():
    # With b = 2, B = 4: |G|^2 ~ 2 |G_B|^2 - |G_b|^2 and tr(S) ~ 4 (|G_b|^2 - |G_B|^2).
    #   pair (2, 1.5) -> |G|^2 1, tr 2;  (5, 3) -> 1, 8;  (4, 3.5) -> 3, 2.
    # ema 0.9, uncorrected m_n = 0.9 m_{n-1} + 0.1 x_n, corrected m_n / (1 - 0.9^n):
    #   |G|^2: m = 0.1, 0.19, 0.471   -> 1, 1, 0.471 / 0.271
    #   tr S:  m = 0.2, 0.98, 1.082   -> 2, 0.98 / 0.19, 1.082 / 0.271
    #   B_noise = m_tr / m_G (the corrections cancel): 2, 0.98 / 0.19, 1.082 / 0.471
    expected = [(1.0, 2.0, 2.0), (1.0, 0.98 / 0.19, 0.98 / 0.19), (0.471 / 0.271, 1.082 / 0.271, 1.082 / 0.471)]
    est = NoiseScaleEstimator(ema=0.9)
    for (small_sq, big_sq), (g2, tr, noise) in zip([(2.0, 1.5), (5.0, 3.0), (4.0, 3.5)], expected):
        est.update(small_sq, 2, big_sq, 4)
        assert est.grad_sqnorm == pytest.approx(g2, rel=1e-12)
        assert est.trace_cov == pytest.approx(tr, rel=1e-12)
        assert est.noise_scale == pytest.approx(noise, rel=1e-12)


def test_noise_scale_is_none_without_a_positive_grad_sqnorm_average():
    est = NoiseScaleEstimator()
    assert (est.noise_scale, est.grad_sqnorm, est.trace_cov) == (None, None, None)
    est.update(2.0, 2, 0.5, 4)  # |G|^2 ~ 2 * 0.5 - 2 = -1: noise not resolved yet
    assert est.noise_scale is None
    assert est.grad_sqnorm == pytest.approx(-1.0)
    assert est.trace_cov == pytest.approx(6.0)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="ema"):
        NoiseScaleEstimator(ema=1.0)
    est = NoiseScaleEstimator()
    for small_batch, big_batch in [(4, 4), (8, 4), (0, 4)]:
        with pytest.raises(ValueError, match="small_batch"):
            est.update(1.0, small_batch, 1.0, big_batch)
    with pytest.raises(ValueError, match="batch"):
        ConsecutiveGradients().pair([], batch=0)


def test_tensor_inputs_match_floats_and_never_sync(monkeypatch):
    pairs = [(2.0, 1.5), (5.0, 3.0), (4.0, 3.5)]
    from_floats, from_tensors = NoiseScaleEstimator(ema=0.8), NoiseScaleEstimator(ema=0.8)
    for s, b in pairs:
        from_floats.update(s, 2, b, 4)

    def no_sync(*args, **kwargs):
        raise AssertionError("host-device synchronisation on the hot path")

    w = torch.nn.Parameter(torch.zeros(3))
    consecutive = ConsecutiveGradients()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            m.setattr(torch.Tensor, name, no_sync)
        for s, b in pairs:
            from_tensors.update(torch.tensor(s), 2, torch.tensor(b), 4)
            w.grad = torch.full((3,), s)
            grad_sqnorm([w])
            consecutive.pair([w], batch=4)
    assert from_tensors.noise_scale == pytest.approx(from_floats.noise_scale, rel=1e-12)
    assert from_tensors.grad_sqnorm == pytest.approx(from_floats.grad_sqnorm, rel=1e-12)


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(2)
    sq = torch.rand(20, 2, generator=gen, dtype=F64)
    pairs = [(s + b, b) for s, b in sq]  # tensors, small > big as on average in practice

    uninterrupted = NoiseScaleEstimator(ema=0.9)
    for s, b in pairs:
        uninterrupted.update(s, 3, b, 24)

    first = NoiseScaleEstimator(ema=0.9)
    for s, b in pairs[:11]:
        first.update(s, 3, b, 24)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = NoiseScaleEstimator(ema=0.9)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for s, b in pairs[11:]:
        resumed.update(s, 3, b, 24)

    assert resumed.state_dict() == uninterrupted.state_dict()  # bit-identical, not approx
    assert resumed.noise_scale == uninterrupted.noise_scale
    assert resumed.num_updates == 20


def test_load_state_dict_keeps_the_checkpoint_ema_and_warns():
    est = NoiseScaleEstimator(ema=0.5)
    est.update(2.0, 2, 1.5, 4)
    other = NoiseScaleEstimator(ema=0.9)
    with pytest.warns(UserWarning, match="ema 0.9 ignored"):
        other.load_state_dict(est.state_dict())
    assert other.ema == 0.5
    assert other.state_dict() == est.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NoiseScaleEstimator(ema=0.5).load_state_dict(est.state_dict())


def test_grad_sqnorm_equals_the_naive_sum():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model(torch.randn(7, 5)).square().sum().backward()
    unused = torch.nn.Parameter(torch.randn(3))  # grad None: skipped
    half = torch.nn.Parameter(torch.randn(6, dtype=torch.bfloat16))
    half.grad = torch.randn(6, dtype=torch.bfloat16)
    double = torch.nn.Parameter(torch.randn(2, 2, dtype=F64))
    double.grad = torch.randn(2, 2, dtype=F64)
    params = [*model.parameters(), unused, half, double]

    naive = sum(p.grad.double().square().sum().item() for p in params if p.grad is not None)
    got = grad_sqnorm(p for p in params)  # any iterable, e.g. model.parameters()
    assert got.dim() == 0 and got.dtype == F64  # widened by the float64 gradient
    assert got.item() == pytest.approx(naive, rel=1e-6)
    assert grad_sqnorm(model.parameters()).dtype == torch.float32
    assert grad_sqnorm(model.parameters()).item() == pytest.approx(
        sum(p.grad.double().square().sum().item() for p in model.parameters()), rel=1e-6
    )
    assert grad_sqnorm([unused]).item() == 0.0


def test_consecutive_gradients_pairs_hand_made_gradients():
    a = torch.nn.Parameter(torch.zeros(2))
    c = torch.nn.Parameter(torch.zeros(1))
    pairs = ConsecutiveGradients()

    a.grad, c.grad = torch.tensor([1.0, 2.0]), torch.tensor([3.0])  # |g1|^2 = 14
    assert pairs.pair([a, c], batch=4) is None

    a.grad, c.grad = torch.tensor([3.0, 0.0]), torch.tensor([1.0])  # |g2|^2 = 10
    p = pairs.pair([a, c], batch=4)
    assert isinstance(p, GradientPair)
    # small = (14 + 10) / 2 at batch 4; big = |(g1 + g2) / 2|^2 = |[2, 1, 2]|^2 = 9 at batch 8.
    assert (p.small_sqnorm.item(), p.small_batch, p.big_sqnorm.item(), p.big_batch) == pytest.approx((12.0, 4.0, 9.0, 8.0))

    a.grad, c.grad = torch.tensor([0.0, 3.0]), torch.tensor([5.0])  # |g3|^2 = 34, batch 12
    p = pairs.pair([a, c], batch=12)
    # Sample-weighted mean (4 g2 + 12 g3) / 16 = [0.75, 2.25, 4]; small at 2 / (1/4 + 1/12) = 6.
    assert p.small_sqnorm.item() == pytest.approx((10.0 + 34.0) / 2)
    assert p.small_batch == pytest.approx(6.0)
    assert p.big_sqnorm.item() == pytest.approx(0.75**2 + 2.25**2 + 16.0)
    assert p.big_batch == 16.0

    pairs.reset()
    assert pairs.pair([a, c], batch=4) is None


def test_consecutive_gradients_feed_the_estimator_at_fixed_parameters():
    # At fixed parameters consecutive batches are independent draws, so the pairing is exact and
    # the estimate must match the closed form. The gradient is split over two parameters.
    gen = torch.Generator().manual_seed(4)
    d, sigma, batch, steps = 6, 1.0, 8, 3000
    delta = _delta(d, 1.0)
    grad_sqnorm_true, trace_cov_true = _analytic(d, sigma, delta)  # B_noise = 7 + 6 = 13
    head, tail = torch.nn.Parameter(torch.zeros(2, dtype=F64)), torch.nn.Parameter(torch.zeros(d - 2, dtype=F64))

    # ema 0.999: measured over 12 seeds the relative spread is 2.6%, so 15% is a >5-sigma bound.
    est, pairs = NoiseScaleEstimator(ema=0.999), ConsecutiveGradients()
    for _ in range(steps // 500):
        for g in _per_example_grads(gen, delta, sigma, (500, batch)).mean(1):
            head.grad, tail.grad = g[:2], g[2:]
            p = pairs.pair([head, tail], batch)
            if p is not None:
                est.update(*p)
    assert est.num_updates == steps - 1
    assert est.noise_scale == pytest.approx(trace_cov_true / grad_sqnorm_true, rel=0.15)


def _pair_values(p: GradientPair | None) -> tuple[float, float, float, float]:
    assert p is not None
    return (p.small_sqnorm.item(), p.small_batch, p.big_sqnorm.item(), p.big_batch)


def test_consecutive_gradients_drop_a_pair_whose_kept_gradient_was_written_in_place():
    # The gradient is kept by reference; a loop that zeroes .grad in place (instead of setting it
    # to None) destroys it. That pair is dropped, and from then on the gradient is copied.
    a = torch.nn.Parameter(torch.zeros(3))
    pairs = ConsecutiveGradients()
    a.grad = torch.tensor([1.0, 2.0, 3.0])
    pairs.pair([a], batch=4)
    a.grad.zero_()  # what zero_grad(set_to_none=False) does
    a.grad.add_(torch.tensor([3.0, 0.0, 1.0]))
    assert pairs.pair([a], batch=4) is None, "the kept gradient was overwritten: no pair may use it"
    a.grad.zero_()
    a.grad.add_(torch.tensor([1.0, 0.0, 3.0]))
    # Copied this time: the pair is of [3, 0, 1] and [1, 0, 3], not of [1, 0, 3] with itself.
    assert _pair_values(pairs.pair([a], batch=4)) == pytest.approx((10.0, 4.0, 8.0, 8.0))
    assert pairs.state_dict()["by_reference"] is False


def test_consecutive_gradients_undo_a_declared_in_place_scale():
    # Clipping multiplies the kept gradient in place; `scaled` says by how much, and the next pair
    # is the one of the unclipped gradients (to float32 rounding: the dot product is divided back).
    torch.manual_seed(5)
    g1, g2 = torch.randn(1000), torch.randn(1000) + 0.5
    w = torch.nn.Parameter(torch.zeros(1000))
    plain, clipped = ConsecutiveGradients(), ConsecutiveGradients()
    w.grad = g1.clone()
    plain.pair([w], batch=8)
    w.grad = g1.clone()
    clipped.pair([w], batch=8)
    w.grad.mul_(0.3)
    clipped.scaled(0.3)
    w.grad = g2.clone()
    want = _pair_values(plain.pair([w], batch=16))
    w.grad = g2.clone()
    got = _pair_values(clipped.pair([w], batch=16))
    assert got == pytest.approx(want, rel=1e-5)
    # Without `scaled` the in-place multiply is caught, not silently paired.
    w.grad.mul_(0.5)
    w.grad = g1.clone()
    assert clipped.pair([w], batch=8) is None


def test_consecutive_gradients_take_the_callers_squared_norm():
    torch.manual_seed(6)
    w = torch.nn.Parameter(torch.zeros(50))
    own, given = ConsecutiveGradients(), ConsecutiveGradients()
    results = []
    for pairs in (own, given):
        torch.manual_seed(6)
        out = None
        for _ in range(2):
            w.grad = torch.randn(50)
            out = pairs.pair([w], batch=4, sqnorm=w.grad.square().sum() if pairs is given else None)
        results.append(_pair_values(out))
    assert results[0] == pytest.approx(results[1], rel=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_consecutive_gradients_state_round_trip_pairs_bit_for_bit(scale):
    torch.manual_seed(7)
    w = torch.nn.Parameter(torch.zeros(64))
    pairs = ConsecutiveGradients()
    w.grad = torch.randn(64)
    pairs.pair([w], batch=4)
    w.grad.mul_(scale)
    pairs.scaled(scale)
    buffer = io.BytesIO()
    torch.save(pairs.state_dict(), buffer)
    resumed = ConsecutiveGradients()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    g = torch.randn(64)
    w.grad = g.clone()
    want = pairs.pair([w], batch=4)
    w.grad = g.clone()
    got = resumed.pair([w], batch=4)
    assert _pair_values(got) == _pair_values(want)


def test_consecutive_gradients_pair_bf16_and_float64_gradients_in_wide_arithmetic():
    # bf16 gradients are widened to float32 for the dot product, float64 ones stay float64, and the
    # pair is reported in the widest: the same as the pair of the gradients taken in float64.
    torch.manual_seed(8)
    w = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    d = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    (w1, d1), (w2, d2) = [(torch.randn(4096).bfloat16(), torch.randn(3, dtype=F64)) for _ in range(2)]
    pairs = ConsecutiveGradients()
    w.grad, d.grad = w1, d1
    assert pairs.pair([w, d], batch=4) is None
    w.grad, d.grad = w2, d2
    p = pairs.pair([w, d], batch=4)
    assert p is not None and p.big_sqnorm.dtype == F64
    a, b = torch.cat([w2.double(), d2]), torch.cat([w1.double(), d1])
    want = (((a + b) / 2).square().sum().item(), ((a.square().sum() + b.square().sum()) / 2).item())
    # float32 sums of 4096 terms (vectorised, blocked: ~eps32 log2(n) ~ 1e-6 relative; 1e-4 is far
    # below what bf16 arithmetic would lose, eps_bf16 = 4e-3).
    assert (p.big_sqnorm.item(), p.small_sqnorm.item()) == pytest.approx(want, rel=1e-4)
