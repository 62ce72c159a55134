"""Quantization primitives: the formulas of DESIGN.md §2, pinned bit for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitllm.errors import QuantizationError
from bitllm.quant.primitives import (
    absmean_scale,
    binarize,
    check_finite,
    fake_quantize_activations,
    quantize_activations,
    rank1_factors,
    sign_pm1,
    svid,
    ternarize,
)
from bitllm.quant.ste import SignSTE, sign_ste, ste_blend


def test_ternarize_is_absmean_round_clip():
    w = torch.tensor([[0.0, 0.1, -0.2, 0.5], [1.0, -3.0, 0.3, -0.04]])
    gamma = w.abs().mean()
    t, scale = ternarize(w)
    assert scale.item() == pytest.approx(gamma.item())
    expected = (w / gamma).round().clamp(-1, 1).to(torch.int8)
    assert torch.equal(t, expected)
    assert t.dtype == torch.int8 and set(t.unique().tolist()) <= {-1, 0, 1}


def test_absmean_scale_floor():
    assert absmean_scale(torch.zeros(3, 3)).item() == pytest.approx(1e-5)


def test_binarize_centres_and_maps_zero_to_plus_one():
    w = torch.tensor([[1.0, 2.0, 3.0]])  # mean 2 -> centred (-1, 0, 1)
    b, scale = binarize(w)
    assert b.tolist() == [[-1, 1, 1]]
    assert scale.item() == pytest.approx(2.0)
    assert sign_pm1(torch.tensor([0.0, -0.0, -1e-9])).tolist() == [1, 1, -1]


def test_activation_quant_is_pinned():
    # s = 127 / 2 = 63.5; x*s = 0.5 * 63.5 ... choose values landing exactly on .5 to check half-to-even
    x = torch.tensor([[2.0, 1.0 / 63.5 * 0.5, 1.0 / 63.5 * 1.5, 1.0 / 63.5 * 2.5, -2.0]])
    q, s = quantize_activations(x)
    assert s.item() == pytest.approx(63.5)
    ref = torch.round(x * s).clamp(-128, 127)
    assert torch.equal(q.float(), ref)
    assert q[0, 0] == 127 and q[0, -1] == -127
    assert q[0, 1] == 0 and q[0, 2] == 2 and q[0, 3] == 2  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2


def test_activation_quant_computes_in_fp32_for_half_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 33).to(torch.bfloat16)
    q, s = quantize_activations(x)
    q32, s32 = quantize_activations(x.float())
    assert torch.equal(q, q32) and torch.equal(s, s32)


def test_activation_quant_zero_row_uses_floor():
    q, s = quantize_activations(torch.zeros(1, 8))
    assert s.item() == pytest.approx(127 / 1e-5)
    assert (q == 0).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 70), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_activation_quant_range_and_error(m, k, mag, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * mag  # seeded: hypothesis can replay it
    q, s = quantize_activations(x)
    assert q.dtype == torch.int8
    # the absmax element maps to +-127 — unless the row's absmax is below the 1e-5 floor of the scale
    # (a short row at mag 1e-3 can be: it then maps to round(absmax * 127 / 1e-5) < 127)
    big = x.abs().amax(-1) >= 1e-5
    assert (q.abs().amax(-1)[big] == 127).all()
    assert ((fake_quantize_activations(x) - x).abs() <= 0.5 / s + 1e-6 * mag).all()


def test_check_finite_rejects_nan_inf_and_empty():
    with pytest.raises(QuantizationError, match="NaN/inf"):
        check_finite(torch.tensor([1.0, float("nan")]), "w")
    with pytest.raises(QuantizationError, match="NaN/inf"):
        ternarize_checked = torch.tensor([float("inf")])
        check_finite(ternarize_checked, "w")
    with pytest.raises(QuantizationError, match="empty"):
        check_finite(torch.empty(0), "w")


def test_rank1_factors_are_the_optimal_nonnegative_rank1():
    torch.manual_seed(1)
    a = torch.randn(40, 24).abs()
    h, g = rank1_factors(a)
    assert (h >= 0).all() and (g >= 0).all()
    u, s, v = torch.linalg.svd(a)
    best = s[0] * torch.outer(u[:, 0], v[0])
    assert torch.allclose(torch.outer(h, g), best.abs(), atol=1e-4)


def test_svid_beats_sign_times_absmean():
    """OneBit's SVID reconstructs |W| better than the plain sign x mean|W| (random and structured W)."""
    torch.manual_seed(2)
    structured = torch.randn(64, 1) * torch.randn(1, 48) + 0.1 * torch.randn(64, 48)
    for w in (torch.randn(64, 48), structured):
        sign, g, h = svid(w)
        err_svid = (w - sign * torch.outer(h, g)).norm()
        err_sign = (w - sign * w.abs().mean()).norm()
        assert err_svid < err_sign


def test_ste_blend_identity_gradient_and_lambda():
    x = torch.randn(5, requires_grad=True)
    q = lambda t: t.round()  # noqa: E731
    y = ste_blend(x, q, 1.0)
    assert torch.allclose(y, x.round())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))
    assert torch.equal(ste_blend(x, q, 0.0), x)
    half = ste_blend(x, q, 0.5)
    assert torch.allclose(half, x + 0.5 * (x.round() - x))


def test_sign_ste_surrogate_gradient():
    w = torch.tensor([-2.0, -0.1, 0.0, 0.3], requires_grad=True)
    y = SignSTE.apply(w)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0]
    y.sum().backward()
    assert torch.allclose(w.grad, 1.001 - torch.tanh(w.detach()) ** 2)
    assert torch.equal(sign_ste(w, 0.0), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ste_forward_is_the_quantized_value_bit_for_bit(dtype):
    # x + (Q(x) - x).detach() rounds Q(x) - x: in bf16 a weight at 50·mean|W| came out 5 % off its ternary value
    from bitllm.quant.primitives import fake_ternarize

    w = torch.randn(16, 64).to(dtype)
    w[0, :4] = torch.tensor([50.0, -7.3, 13.1, 101.0]) * w.float().abs().mean()
    w.requires_grad_(True)
    y = ste_blend(w, fake_ternarize, 1.0)
    assert torch.equal(y, fake_ternarize(w.detach()))
    y.float().sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # still the identity gradient
    x = (torch.randn(3, 64) * 40).to(dtype)
    assert torch.equal(ste_blend(x, fake_quantize_activations, 1.0), fake_quantize_activations(x))
