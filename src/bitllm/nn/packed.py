"""PackedLinear: an inference layer holding packed 1/1.58-bit weights.

Usable inside any Hugging Face model. Its reference computation (pure PyTorch, exact integer
accumulation for the int8-activation modes) is the oracle for the native kernels and engine;
docs/formats.md fixes every formula and the epilogue's op order.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bitllm.errors import FormatError
from bitllm.formats.packing import PackFormat, pack, packed_shape, unpack
from bitllm.quant.config import Method
from bitllm.quant.primitives import binarize, check_finite, quantize_activations, sign_pm1, ternarize


def kernel_mode() -> str:
    """`BITLLM_KERNEL=reference` switches every PackedLinear to the PyTorch reference computation."""
    return os.environ.get("BITLLM_KERNEL", "native").lower()


class PackedLinear(nn.Module):
    """Packed weights + scales; y = f(x) per `method` (docs/formats.md, "Layer semantics").

    Buffers (also the checkpoint keys): `weight` uint8 packed in `fmt`, `weight_scale` fp32 multiplier
    of shape (1,) or (out,), `input_factor` (OneBit's g, (in,)), `bias`, and `rms_norm.weight` when
    the layer normalises its input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        method: Method | str,
        fmt: PackFormat | str,
        *,
        scale_numel: int = 1,
        input_norm: bool = False,
        norm_eps: float = 1e-6,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.method = Method(method)
        self.fmt = PackFormat(fmt)
        if self.method in (Method.BINARY, Method.ONEBIT) and self.fmt.ternary:
            raise FormatError(f"method {self.method.value} has binary weights: use format b1, not {self.fmt.value}")
        if self.method in (Method.TERNARY, Method.TERNARY_WO) and not self.fmt.ternary:
            raise FormatError(f"method {self.method.value} has ternary weights: use format i2 or t1, not {self.fmt.value}")
        if scale_numel not in (1, out_features):
            raise FormatError(f"weight_scale must have 1 or {out_features} elements, got {scale_numel}")
        self.ln_eps = ln_eps
        self.register_buffer("weight", torch.zeros(packed_shape(self.fmt, out_features, in_features), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(scale_numel, dtype=torch.float32))
        if self.method is Method.ONEBIT:
            self.register_buffer("input_factor", torch.ones(in_features, dtype=torch.float32))
        else:
            self.input_factor = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        self.rms_norm = LlamaRMSNorm(in_features, eps=norm_eps) if input_norm else None
        self._int_weight: torch.Tensor | None = None  # unpacked int8 cache for the reference path
        self._kernel_weight = None  # kernel-layout weights, built on first native call

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_int(
        cls,
        w_int: torch.Tensor,
        scale: torch.Tensor,
        method: Method | str,
        fmt: PackFormat | str,
        bias: torch.Tensor | None = None,
        input_factor: torch.Tensor | None = None,
        rms_norm_weight: torch.Tensor | None = None,
        norm_eps: float = 1e-6,
        ln_eps: float = 1e-5,
    ) -> "PackedLinear":
        """Build from an int8 (out, in) matrix of {-1,0,1}/{-1,1} and its multiplier scale(s)."""
        out_f, in_f = w_int.shape
        scale = scale.detach().float().reshape(-1)
        layer = cls(
            in_f, out_f, bias is not None, method, fmt, scale_numel=scale.numel(),
            input_norm=rms_norm_weight is not None, norm_eps=norm_eps, ln_eps=ln_eps,
        )
        layer.weight.copy_(pack(layer.fmt, w_int))
        layer.weight_scale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        if layer.input_factor is not None:
            if input_factor is None:
                raise FormatError("onebit layers need input_factor (g)")
            layer.input_factor.copy_(input_factor.detach().float())
        if rms_norm_weight is not None:
            layer.rms_norm.weight.data.copy_(rms_norm_weight.detach().float())
        return layer

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, method: Method | str, fmt: PackFormat | str, bias: torch.Tensor | None = None
    ) -> "PackedLinear":
        """Quantize a full-precision (out, in) weight with `method`'s rule and pack it."""
        method = Method(method)
        check_finite(weight, "weight")
        if method in (Method.TERNARY, Method.TERNARY_WO):
            w_int, scale = ternarize(weight)
            return cls.from_int(w_int, scale, method, fmt, bias)
        if method is Method.BINARY:
            w_int, scale = binarize(weight)
            return cls.from_int(w_int, scale, method, fmt, bias)
        from bitllm.quant.primitives import svid

        sign, g, h = svid(weight)
        return cls.from_int(sign, h, method, fmt, bias, input_factor=g)

    @classmethod
    def from_training_layer(cls, layer: nn.Module, fmt: PackFormat | str) -> "PackedLinear":
        """Freeze a BitLinear / BinaryLinear / OneBitLinear into packed form (exactly what it computes at lam=1)."""
        from bitllm.nn.layers import BinaryLinear, BitLinear, OneBitLinear

        bias = None if layer.bias is None else layer.bias.detach()
        if isinstance(layer, OneBitLinear):
            check_finite(layer.weight, "weight")
            return cls.from_int(
                sign_pm1(layer.weight.detach()), layer.weight_scale.detach(), Method.ONEBIT, fmt, bias,
                input_factor=layer.input_factor.detach(), ln_eps=layer.ln_eps,
            )
        if isinstance(layer, BitLinear):
            check_finite(layer.weight, "weight")
            binary = isinstance(layer, BinaryLinear)
            w_int, scale = (binarize if binary else ternarize)(layer.weight.detach())
            if binary:
                method = Method.BINARY
            else:
                method = Method.TERNARY_WO if layer.weight_only else Method.TERNARY
            norm = layer.rms_norm
            return cls.from_int(
                w_int, scale, method, fmt, bias,
                rms_norm_weight=None if norm is None else norm.weight.detach(),
                norm_eps=1e-6 if norm is None else norm.variance_epsilon,
            )
        raise TypeError(f"cannot pack a {type(layer).__name__}; expected a bitllm training layer")

    # -- computation --------------------------------------------------------------------------

    def int_weight(self) -> torch.Tensor:
        """The unpacked int8 (out, in) weight matrix (cached; invalidated on load_state_dict and .to())."""
        if torch.jit.is_tracing():  # traced from the buffer each time: a cache would differ between trace runs
            return unpack(self.fmt, self.weight, (self.out_features, self.in_features))
        if self._int_weight is None:
            self._int_weight = unpack(self.fmt, self.weight, (self.out_features, self.in_features))
        return self._int_weight

    def prepare(self) -> "PackedLinear":
        """Build now what the forward pass would build at its first call: the kernel-layout weights
        when the native kernels run it (not in BITLLM_KERNEL=reference mode). torch.compile and
        torch.export need them built beforehand: repacking is not a graph op. For a whole model:
        `model.apply(lambda m: m.prepare() if isinstance(m, PackedLinear) else None)`. Returns self."""
        if kernel_mode() != "reference" and self.weight.device.type == "cpu" and not self.weight.is_meta:
            from bitllm.nn import native

            if native.available():
                native._kernel_state(self)
        return self

    def _with_new_buffers(self, change, *args, **kwargs):
        """Run `change` (which replaces buffers): the caches built from the old ones are dropped; kernel
        weights that were built are rebuilt at once (a prepared layer stays prepared for torch.compile),
        the reference cache at its next use."""
        prepared = self._kernel_weight is not None
        self._int_weight = None
        self._kernel_weight = None
        out = change(*args, **kwargs)
        if prepared:
            self.prepare()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        return self._with_new_buffers(super()._load_from_state_dict, *args, **kwargs)

    def _apply(self, *args, **kwargs):  # .to(), .half(), .cuda() change the buffers the caches were built from
        return self._with_new_buffers(super()._apply, *args, **kwargs)

    @property
    def int8_activations(self) -> bool:
        return self.method in (Method.TERNARY, Method.BINARY)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.jit.trace records torch ops only: the kernels write their output through a raw pointer,
        # unseen, so a traced graph would return an uninitialised tensor. Trace the reference instead.
        if kernel_mode() != "reference" and not torch.jit.is_tracing():
            from bitllm.nn import native

            if native.available():
                if x.device.type != "cpu" or self.weight.device.type != "cpu":
                    raise ValueError(
                        f"PackedLinear: the native kernels run on the CPU, got input on {x.device} and weights on "
                        f"{self.weight.device}; set BITLLM_KERNEL=reference for the PyTorch reference on other devices"
                    )
                return native.packed_forward(self, x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch reference (docs/formats.md): exact int accumulation, then ((acc / s_a) * scale) + bias."""
        dtype = x.dtype
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        w = self.int_weight().float()  # (out, in), exact small integers
        if self.int8_activations:
            q, s = quantize_activations(x)  # (..., in) int8, (..., 1) fp32
            acc = F.linear(q.float(), w)  # exact: every partial sum is an integer < 2^24 for in < 132k
            y = (acc / s) * self.weight_scale
        elif self.method is Method.ONEBIT:
            y = F.linear(x.float() * self.input_factor, w) * self.weight_scale
            y = F.layer_norm(y, (self.out_features,), eps=self.ln_eps)
        else:
            y = F.linear(x.float(), w) * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"method={self.method.value}, format={self.fmt.value}"
        )
