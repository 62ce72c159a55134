"""Quantization primitives as small pure functions.

Papers:
- BitNet b1.58 (ternary, absmean weights, absmax int8 activations): https://arxiv.org/abs/2402.17764
- BitNet b1 (binary, centred sign): https://arxiv.org/abs/2310.11453
- OneBit (sign matrix plus rank-1 value vectors g, h): https://arxiv.org/abs/2402.11295

Every function computes in fp32, whatever the input dtype, so that torch, the C++ kernels and
transformers agree bit for bit (docs/formats.md, "Activation quantization").
"""

from __future__ import annotations

import torch

from bitllm.errors import QuantizationError

EPS = 1e-5  # floor of every absmean/absmax scale, as in the paper's reference code
QMAX = 127  # int8 absmax activations map max|x| to 127
QMIN = -128


def check_finite(t: torch.Tensor, what: str = "tensor") -> None:
    """Raise QuantizationError when `t` holds NaN or inf (quantizing them gives silent garbage)."""
    if t.numel() == 0:
        raise QuantizationError(f"{what}: cannot quantize an empty tensor")
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise QuantizationError(f"{what}: {bad} NaN/inf value(s) of {t.numel()}; refusing to quantize")


def absmean_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale gamma = max(mean|W|, 1e-5), fp32 scalar tensor."""
    return w.float().abs().mean().clamp(min=EPS)


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean rule: T = clip(round(W / gamma), -1, 1), returned as int8, with gamma.

    Dequantized weight = T * gamma (gamma is the *multiplier*; HF `bitlinear` stores 1/gamma).
    """
    scale = absmean_scale(w)
    t = (w.float() / scale).round().clamp(-1, 1).to(torch.int8)
    return t, scale


def binarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1 rule: B = sign(W - mean W) in {-1,+1} (sign(0) = +1), scale beta = mean|W|."""
    wf = w.float()
    centred = wf - wf.mean()
    b = torch.where(centred < 0, -1, 1).to(torch.int8)
    return b, absmean_scale(wf)


def sign_pm1(w: torch.Tensor) -> torch.Tensor:
    """sign(W) in {-1,+1} as int8, with sign(0) = +1 (OneBit's packed convention: bit set = -1)."""
    return torch.where(w < 0, -1, 1).to(torch.int8)


def act_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax scale s = 127 / max(max|x|, 1e-5) over the last dim, fp32, keepdim."""
    return QMAX / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinned int8 activation quantizer: q = clamp(round_half_even(x*s), -128, 127), s per token.

    Returns (q as int8, s as fp32 with a trailing singleton dim). torch.round rounds half to even.
    """
    s = act_scale(x)
    q = (x.float() * s).round().clamp(QMIN, QMAX).to(torch.int8)
    return q, s


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """q / s in the input dtype: what a W*A8 layer sees during training."""
    q, s = quantize_activations(x)
    return (q.float() / s).to(x.dtype)


def fake_ternarize(w: torch.Tensor) -> torch.Tensor:
    t, scale = ternarize(w)
    return (t.float() * scale).to(w.dtype)


def fake_binarize(w: torch.Tensor) -> torch.Tensor:
    b, scale = binarize(w)
    return (b.float() * scale).to(w.dtype)


def rank1_factors(a: torch.Tensor, iters: int = 100, tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 approximation a ~ h g^T of a non-negative matrix (out, in), h >= 0, g >= 0.

    For a non-negative matrix the leading singular pair can be taken non-negative (Perron-Frobenius),
    so this power iteration is the exact rank-1 NMF optimum in Frobenius norm -- what OneBit's SVID
    asks scikit-learn's NMF to approximate. Returns (h of shape (out,), g of shape (in,)).
    """
    a = a.float()
    if (a < 0).any():
        raise QuantizationError("rank1_factors expects a non-negative matrix (pass |W|)")
    g = a.mean(dim=0) + EPS  # (in,) start: column means, strictly positive
    for _ in range(iters):
        h = a @ g  # (out,)
        g_new = a.t() @ (h / h.norm().clamp(min=1e-30))  # (in,)
        done = (g_new - g).norm() <= tol * g_new.norm().clamp(min=1e-30)
        g = g_new
        if done:
            break
    g = g / g.norm().clamp(min=1e-30)  # unit right vector
    h = a @ g  # projection of a onto it: the optimal left factor
    # split the magnitude evenly so neither factor under/overflows in fp16 storage
    r = h.norm().sqrt().clamp(min=1e-30)
    return h / r, g * r


def svid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OneBit's sign-value-independent decomposition: W ~ sign(W) * (h g^T) with h, g from |W|.

    Returns (sign int8 (out,in) in {-1,+1}, g (in,), h (out,)).
    """
    check_finite(w, "weight")
    h, g = rank1_factors(w.float().abs())
    return sign_pm1(w), g, h
