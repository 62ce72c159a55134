"""Training layers against the papers' reference code written inline (STYLE.md "Tests")."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitllm.nn import BinaryLinear, BitLinear, OneBitLinear, PackedLinear
from bitllm.quant.config import Method


# --- the BitNet b1.58 paper's reference BitLinear ("Training Tips, Code and FAQ", Figures 3-5) ------
class PaperRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def paper_activation_quant(x):
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


def paper_weight_quant(w):
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp_(-1, 1) / scale


class PaperBitLinear(nn.Linear):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.norm = PaperRMSNorm(self.in_features)

    def forward(self, x):
        w = self.weight
        x_norm = self.norm(x)
        x_quant = x_norm + (paper_activation_quant(x_norm) - x_norm).detach()
        w_quant = w + (paper_weight_quant(w) - w).detach()
        return F.linear(x_quant, w_quant, self.bias)


def paper_b1_weight_quant(w):  # BitNet b1: sign(W - mean W) * mean|W|
    alpha = w.mean()
    return torch.where(w - alpha < 0, -1.0, 1.0) * w.abs().mean()


@pytest.mark.parametrize("shape", [(7, 5, 13), (2, 1, 64), (3, 9, 31)])
def test_bitlinear_matches_paper_reference_forward_and_grads(shape):
    b, t, k = shape
    torch.manual_seed(0)
    ref = PaperBitLinear(k, 11, bias=False)
    ours = BitLinear(k, 11, bias=False, input_norm=True)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        ref.norm.weight.uniform_(0.5, 1.5)
        ours.rms_norm.weight.copy_(ref.norm.weight)
    x1 = torch.randn(b, t, k, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_ref, y = ref(x1), ours(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.rms_norm.weight.grad, ref.norm.weight.grad, rtol=1e-5, atol=1e-6)


def test_bitlinear_trains_like_the_reference():
    torch.manual_seed(3)
    ref = PaperBitLinear(16, 8, bias=False)
    ours = BitLinear(16, 8, bias=False, input_norm=True)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    for _ in range(5):
        for m, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            F.mse_loss(m(x), target).backward()
            opt.step()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)


def test_binary_linear_matches_b1_reference():
    torch.manual_seed(4)
    ours = BinaryLinear(12, 6, bias=True)
    x = torch.randn(3, 12)
    w_ref = paper_b1_weight_quant(ours.weight.detach())
    y_ref = F.linear(paper_activation_quant(x), w_ref, ours.bias)
    torch.testing.assert_close(ours(x), y_ref, rtol=1e-6, atol=1e-6)


def test_weight_only_bitlinear_keeps_activations():
    torch.manual_seed(5)
    layer = BitLinear(10, 4, weight_only=True)
    x = torch.randn(2, 10)
    y_ref = F.linear(x, paper_weight_quant(layer.weight.detach()), layer.bias)
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-6, atol=1e-6)


def test_lambda_zero_is_full_precision():
    torch.manual_seed(6)
    layer = BitLinear(10, 4, lam=0.0)
    x = torch.randn(2, 10)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_onebit_forward_formula_and_surrogate_grad():
    torch.manual_seed(7)
    w = torch.randn(6, 9)
    layer = OneBitLinear(9, 6, bias=True).init_from(w)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
    x = torch.randn(4, 9)
    sign = torch.where(w < 0, -1.0, 1.0)
    y_ref = F.layer_norm((x * layer.input_factor) @ sign.t() * layer.weight_scale, (6,), eps=1e-5) + layer.bias
    torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.input_factor.grad is not None and layer.weight_scale.grad is not None


@pytest.mark.parametrize(
    "make,fmt",
    [
        (lambda: BitLinear(37, 13, input_norm=True), "i2"),
        (lambda: BitLinear(37, 13), "t1"),
        (lambda: BitLinear(37, 13, weight_only=True), "i2"),
        (lambda: BinaryLinear(37, 13), "b1"),
        (lambda: OneBitLinear(37, 13).init_from(torch.randn(13, 37)), "b1"),
    ],
)
def test_packed_linear_computes_what_the_training_layer_computes(make, fmt):
    torch.manual_seed(8)
    layer = make()
    packed = PackedLinear.from_training_layer(layer, fmt)
    x = torch.randn(2, 5, 37)
    with torch.no_grad():
        torch.testing.assert_close(packed.forward_reference(x), layer(x), rtol=1e-5, atol=1e-5)


def test_packed_linear_int8_path_is_exact_integer_arithmetic():
    torch.manual_seed(9)
    layer = PackedLinear.from_float(torch.randn(7, 300), Method.TERNARY, "i2", bias=torch.randn(7))
    x = torch.randn(3, 300)
    s = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    q = (x * s).round().clamp(-128, 127).to(torch.int64)
    acc = q @ layer.int_weight().to(torch.int64).t()  # exact int64 reference
    y = (acc.float() / s) * layer.weight_scale + layer.bias
    assert torch.equal(layer.forward_reference(x), y)


def test_packed_linear_rejects_format_method_mismatch():
    from bitllm.errors import FormatError

    with pytest.raises(FormatError, match="binary weights"):
        PackedLinear(8, 8, False, Method.BINARY, "i2")
    with pytest.raises(FormatError, match="ternary weights"):
        PackedLinear(8, 8, False, Method.TERNARY, "b1")
