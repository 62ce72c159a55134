"""Training layers: latent fp weights, quantized in the forward pass with straight-through estimators.

- BitLinear: BitNet b1.58 (https://arxiv.org/abs/2402.17764), W1.58A8 or weight-only.
- BinaryLinear: BitNet b1 (https://arxiv.org/abs/2310.11453), W1A8.
- OneBitLinear: OneBit (https://arxiv.org/abs/2402.11295), W1A16 with value vectors g, h and LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bitllm.quant.primitives import (
    absmean_scale,
    fake_binarize,
    fake_quantize_activations,
    fake_ternarize,
    svid,
)
from bitllm.quant.ste import sign_ste, ste_blend


class BitLinear(nn.Linear):
    """BitNet b1.58 linear layer with fp latent weights.

    forward: [RMSNorm] -> activations fake-quantized to int8 absmax per token (unless weight_only)
    -> weights fake-quantized to {-1,0,1} * mean|W| -> linear. Both with the detach-trick STE,
    blended by `lam` for warm-up. The optional norm is named `rms_norm` (LlamaRMSNorm) so that
    checkpoints match transformers' BitNet `use_rms_norm=True` keys.
    """

    weight_quantizer = staticmethod(fake_ternarize)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_only: bool = False,
        input_norm: bool = False,
        norm_eps: float = 1e-6,
        lam: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_only = weight_only
        self.lam = lam
        self.rms_norm = LlamaRMSNorm(in_features, eps=norm_eps).to(device=device, dtype=dtype) if input_norm else None

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (STE-blended), shape (out, in)."""
        return ste_blend(self.weight, self.weight_quantizer, self.lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        if not self.weight_only:
            x = ste_blend(x, fake_quantize_activations, self.lam)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        mode = "W1.58" + ("A16" if self.weight_only else "A8")
        return f"{super().extra_repr()}, {mode}, input_norm={self.rms_norm is not None}, lam={self.lam}"


class BinaryLinear(BitLinear):
    """BitNet b1: weights sign(W - mean W) * mean|W|, int8 activations."""

    weight_quantizer = staticmethod(fake_binarize)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("W1.58", "W1")


class OneBitLinear(nn.Module):
    """OneBit: y = LayerNorm_noaffine(h * ((g * x) @ sign(W)^T)) (+ bias).

    `weight` is the latent matrix whose sign is used (tanh-surrogate gradient); `input_factor` is g
    (in,), `weight_scale` is h (out,). The names match the packed layer and checkpoint keys.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        ln_eps: float = 1e-5,
        lam: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.ln_eps = ln_eps
        self.lam = lam
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.input_factor = nn.Parameter(torch.ones(in_features, **kw))
        self.weight_scale = nn.Parameter(torch.ones(out_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @torch.no_grad()
    def init_from(self, w: torch.Tensor, use_svid: bool = True) -> "OneBitLinear":
        """Initialise from a full-precision weight (out, in).

        SVID: sign(W) kept in the latent weight (as sign(W) * 0.01, OneBit's start checkpoint) and
        |W| ~ h g^T from its rank-1 factorisation. Without SVID: g = 1, h = mean|W| (sign-only start).
        """
        if use_svid:
            sign, g, h = svid(w)
        else:
            sign = torch.where(w < 0, -1, 1)
            g = torch.ones(w.shape[1])
            h = absmean_scale(w).expand(w.shape[0])
        self.weight.copy_(sign.to(self.weight.dtype) * 0.01)
        self.input_factor.copy_(g)
        self.weight_scale.copy_(h)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = sign_ste(self.weight, self.lam)  # (out, in)
        y = F.linear(x * self.input_factor, s) * self.weight_scale  # (..., out)
        y = F.layer_norm(y, (self.out_features,), eps=self.ln_eps)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, W1A16 onebit, lam={self.lam}"
