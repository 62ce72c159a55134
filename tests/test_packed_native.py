"""PackedLinear through the native kernels against its PyTorch reference path."""

import pytest
import torch

from bitllm.nn import PackedLinear, native
from bitllm.quant import config_for, pack_, quantize_
from bitllm.quant.config import Method
from bitllm.tiny import FAMILIES, tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")

CASES = [("ternary", "i2"), ("ternary", "t1"), ("binary", "b1"), ("ternary-wo", "i2"), ("ternary-wo", "t1"), ("onebit", "b1")]
EXACT = {"ternary", "binary"}  # int8-activation modes: exact integer accumulation, same epilogue
WO_BUDGET = 1e-4  # weight-only modes: fp32 sums in the kernel's canonical order vs BLAS order


@pytest.mark.parametrize("method,fmt", CASES)
@pytest.mark.parametrize("out_f,in_f", [(1, 1), (37, 301), (64, 1000), (5, 17)])
def test_layer_native_matches_reference(method, fmt, out_f, in_f):
    torch.manual_seed(out_f * in_f)
    layer = PackedLinear.from_float(torch.randn(out_f, in_f), method, fmt, bias=torch.randn(out_f))
    x = torch.randn(2, 3, in_f)
    with torch.no_grad():
        got, ref = layer(x), layer.forward_reference(x)
    if method in EXACT:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=WO_BUDGET, atol=WO_BUDGET)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,fmt", CASES)
def test_model_native_matches_reference(monkeypatch, family, method, fmt):
    model = tiny_model(family, embed_std=1.0)
    quantize_(model, config_for(method))
    pack_(model, fmt)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).logits
        monkeypatch.setenv("BITLLM_KERNEL", "reference")
        ref = model(ids).logits
    if method in EXACT:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=WO_BUDGET, atol=WO_BUDGET)


def test_autograd_input_falls_back_to_reference():
    layer = PackedLinear.from_float(torch.randn(8, 16), Method.TERNARY, "i2")
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
