"""Bridge from PackedLinear to the native kernels (bitllm.kernels / bitllm._core).

The layer's file-format bytes are unpacked once, repacked into the kernel's own layout and the
transient int8 copy dropped, so a layer holds only its file bytes and its kernel bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitllm.errors import BitLLMError
from bitllm.quant.config import Method

_AVAILABLE: bool | None = None


def available() -> bool:
    """True when the native kernels import (the extension was built for this machine)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            from bitllm import kernels  # noqa: F401

            _AVAILABLE = True
        except ImportError:
            _AVAILABLE = False
    return _AVAILABLE


def _kernel_state(layer):
    """(PackedWeight, wscale (N,), bias or None), built on first use and cached on the layer."""
    if layer._kernel_weight is None:
        # Repacking is not a graph op and nothing outside the trace can run it (hooks are traced too). Raised
        # in traced code: without fullgraph dynamo breaks the graph and the eager rerun builds the weights;
        # with fullgraph=True it reports this message inside its own "Observed exception" error.
        if torch.compiler.is_compiling():
            raise BitLLMError(
                f"PackedLinear({layer.extra_repr()}) has no kernel-layout weights, which torch.compile needs "
                "built before tracing; call model.apply(lambda m: m.prepare() if isinstance(m, PackedLinear) "
                "else None), or layer.prepare(), before torch.compile (bitllm.from_pretrained prepares its "
                "layers; .to() and load_state_dict keep them prepared)"
            )
        from bitllm import kernels
        from bitllm.formats.packing import unpack

        w_int = layer._int_weight
        if w_int is None:  # unpack transiently: the reference cache is not kept for the native path
            w_int = unpack(layer.fmt, layer.weight, (layer.out_features, layer.in_features))
        packed = kernels.pack(layer.fmt.value, w_int)
        wscale = layer.weight_scale.float().expand(layer.out_features).contiguous()
        bias = None if layer.bias is None else layer.bias.float().contiguous()
        layer._kernel_weight = (packed, wscale, bias)
    return layer._kernel_weight


@torch.library.custom_op("bitllm::packed_linear", mutates_args=())
def packed_linear_op(data: torch.Tensor, fmt: str, n: int, k: int, a8: bool, x: torch.Tensor, wscale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The kernels as a PyTorch operator (what torch.compile / torch.export see): data is a
    PackedWeight's kernel-layout bytes; (M, k) fp32 x -> (M, n) fp32."""
    from bitllm import kernels

    return _linear(kernels.PackedWeight(kernels.KernelFormat(fmt), n, k, data), a8, x, wscale, bias)


@packed_linear_op.register_fake
def _packed_linear_shape(data, fmt, n, k, a8, x, wscale, bias):
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def _linear(packed, a8: bool, x: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.compiler.is_compiling():  # the kernels write through raw pointers: a graph sees them as one op
        return packed_linear_op(packed.data, packed.fmt.value, packed.N, packed.K, a8, x, wscale, bias)
    from bitllm import kernels  # eager: straight to the kernels (no dispatcher hop per layer)

    return (kernels.linear_a8 if a8 else kernels.linear_f32)(packed, x, wscale, bias)


def packed_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """PackedLinear.forward through the kernels; same formulas as forward_reference.

    Int8-activation modes are bit-identical to the reference; weight-only modes differ only in the
    fp32 summation order. Autograd through the input falls back to the reference path.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return layer.forward_reference(x)
    dtype, lead = x.dtype, x.shape[:-1]
    if layer.rms_norm is not None:
        x = layer.rms_norm(x)
    x2 = x.reshape(-1, layer.in_features).float().contiguous()  # (M, K)
    packed, wscale, bias = _kernel_state(layer)
    if layer.int8_activations:
        y = _linear(packed, True, x2, wscale, bias)
    elif layer.method is Method.ONEBIT:
        y = _linear(packed, False, (x2 * layer.input_factor).contiguous(), wscale, None)
        y = F.layer_norm(y, (layer.out_features,), eps=layer.ln_eps)
        if bias is not None:
            y = y + bias
    else:
        y = _linear(packed, False, x2, wscale, bias)
    return y.reshape(*lead, layer.out_features).to(dtype)
