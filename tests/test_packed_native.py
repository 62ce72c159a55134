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


@pytest.mark.parametrize("method,fmt", [("ternary", "i2"), ("ternary-wo", "t1"), ("onebit", "b1")])
def test_torch_compile_fullgraph_runs_the_kernels(tmp_path, method, fmt):
    """torch.compile(fullgraph=True) captures a model of PackedLinear layers whole: the kernels are one
    operator (bitllm::packed_linear) in the graph, the kernel-layout weights were built at load
    (from_pretrained calls prepare()), and a dtype cast keeps them built. Same logits as eager."""
    import bitllm
    from bitllm.formats.checkpoint import from_pretrained

    model = tiny_model("llama", embed_std=1.0)
    quantize_(model, config_for(method))
    bitllm.save_pretrained(model, tmp_path / "m", fmt)
    loaded = from_pretrained(tmp_path / "m")
    layers = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m._kernel_weight is not None for m in layers)  # prepared at load, not at first call
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        eager = loaded(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(loaded, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(ids).logits, eager)
        loaded.float()  # _apply: the caches are rebuilt at once, so the next trace finds them
        assert all(m._kernel_weight is not None for m in layers)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(loaded, fullgraph=True, backend="eager")(ids).logits, eager)



def test_torch_compile_fullgraph_of_unprepared_layers_names_the_fix():
    """Layers converted by hand (pack_) and never run have no kernel-layout weights, and repacking cannot
    be traced: fullgraph=True must fail with bitllm's message naming the fix, and the fix must work."""
    import re

    from bitllm.errors import BitLLMError

    model = tiny_model("llama", embed_std=1.0)
    quantize_(model, config_for("ternary"))
    pack_(model, "i2")
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    fix = "model.apply(lambda m: m.prepare() if isinstance(m, PackedLinear) else None)"
    with torch.inference_mode():
        torch._dynamo.reset()
        # dynamo reports an exception raised in traced code as its own error, with bitllm's message inside
        with pytest.raises((BitLLMError, torch._dynamo.exc.TorchDynamoException), match=re.escape(fix)):
            torch.compile(model, fullgraph=True, backend="eager")(ids)
        model.apply(lambda m: m.prepare() if isinstance(m, PackedLinear) else None)
        eager = model(ids).logits
        torch._dynamo.reset()
        assert torch.equal(torch.compile(model, fullgraph=True, backend="eager")(ids).logits, eager)

def test_packed_linear_operator_passes_opcheck():
    """The custom operator's registration (schema, fake tensor shape, no hidden mutation) as PyTorch checks it."""
    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.randn(9, 40), Method.TERNARY, "i2", bias=torch.randn(9)).prepare()
    packed, wscale, bias = layer._kernel_weight
    args = (packed.data, packed.fmt.value, packed.N, packed.K, True, torch.randn(3, 40), wscale, bias)
    torch.library.opcheck(native.packed_linear_op, args)
    assert torch.equal(native.packed_linear_op(*args), layer(args[5]))


def test_prepare_does_nothing_in_reference_mode(monkeypatch):
    monkeypatch.setenv("BITLLM_KERNEL", "reference")
    layer = PackedLinear.from_float(torch.randn(8, 16), Method.TERNARY, "i2").prepare()
    assert layer._kernel_weight is None
