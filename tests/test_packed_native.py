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


@pytest.mark.parametrize("method,fmt", [("ternary", "i2"), ("ternary-wo", "t1")])
def test_jit_trace_records_a_working_graph(method, fmt):
    """The kernels write through a raw pointer that tracing cannot see: a trace must use the reference."""
    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.randn(9, 40), method, fmt, bias=torch.randn(9))
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(3, 40))
        x = torch.randn(5, 40)  # new values and a new row count
        torch.testing.assert_close(traced(x), layer.forward_reference(x), rtol=WO_BUDGET, atol=WO_BUDGET)


def test_weights_off_the_cpu_give_a_clear_error():
    layer = PackedLinear.from_float(torch.randn(8, 16), Method.TERNARY, "i2").to("meta")
    with torch.no_grad(), pytest.raises(ValueError, match="BITLLM_KERNEL=reference"):
        layer(torch.randn(2, 16, device="meta"))


def test_two_python_threads_at_once_give_the_reference_results():
    import threading

    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.randn(256, 512), Method.TERNARY, "i2", bias=torch.randn(256))
    xs = [torch.randn(8, 512) for _ in range(2)]
    with torch.no_grad():
        refs = [layer.forward_reference(x) for x in xs]
    bad = []

    def work(k):
        for _ in range(30):
            with torch.no_grad():
                if not torch.equal(layer(xs[k]), refs[k]):
                    bad.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@pytest.mark.parametrize("shape", [(0, 17), (2, 0, 17), (17,)])
def test_empty_and_1d_inputs(shape):
    layer = PackedLinear.from_float(torch.randn(5, 17), Method.TERNARY, "i2", bias=torch.randn(5))
    x = torch.randn(shape).bfloat16()
    with torch.no_grad():
        got = layer(x)
        assert got.shape == (*shape[:-1], 5) and got.dtype == torch.bfloat16
        assert torch.equal(got, layer.forward_reference(x))


def test_dtype_cast_after_a_call_rebuilds_the_kernel_state():
    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.randn(8, 16), Method.TERNARY, "i2", bias=torch.randn(8))
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)  # builds the kernel-layout cache from the fp32 scale and bias
        layer.bfloat16()  # rounds weight_scale and bias
        assert torch.equal(layer(x), layer.forward_reference(x))
