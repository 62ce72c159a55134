"""Bridge from PackedLinear to the native kernels (bitllm.kernels / bitllm._core).

The layer's file-format bytes are unpacked once, repacked into the kernel's own layout and the
transient int8 copy dropped, so a layer holds only its file bytes and its kernel bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def packed_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """PackedLinear.forward through the kernels; same formulas as forward_reference.

    Int8-activation modes are bit-identical to the reference; weight-only modes differ only in the
    fp32 summation order. Autograd through the input falls back to the reference path.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return layer.forward_reference(x)
    from bitllm import kernels

    dtype, lead = x.dtype, x.shape[:-1]
    if layer.rms_norm is not None:
        x = layer.rms_norm(x)
    x2 = x.reshape(-1, layer.in_features).float().contiguous()  # (M, K)
    packed, wscale, bias = _kernel_state(layer)
    if layer.int8_activations:
        y = kernels.linear_a8(packed, x2, wscale, bias)
    elif layer.method is Method.ONEBIT:
        y = kernels.linear_f32(packed, (x2 * layer.input_factor).contiguous(), wscale, None)
        y = F.layer_norm(y, (layer.out_features,), eps=layer.ln_eps)
        if bias is not None:
            y = y + bias
    else:
        y = kernels.linear_f32(packed, x2, wscale, bias)
    return y.reshape(*lead, layer.out_features).to(dtype)
