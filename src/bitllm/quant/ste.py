"""Straight-through estimators and the lambda warm-up blend.

BitNet's reference uses the detach trick: y = x + (Q(x) - x).detach() -- forward sees Q(x), the
gradient is the identity. The HF 1.58-bit fine-tuning recipe blends with lambda in [0, 1]:
x + lambda * (Q(x) - x), detached, so lambda = 0 is full precision and lambda = 1 is fully quantized.
OneBit's sign uses a smooth surrogate gradient instead of the identity.
"""

from __future__ import annotations

from typing import Callable

import torch


def ste_blend(x: torch.Tensor, quantizer: Callable[[torch.Tensor], torch.Tensor], lam: float = 1.0) -> torch.Tensor:
    """x + lam * (Q(x) - x), with the correction detached (identity gradient)."""
    if lam <= 0.0:
        return x
    if lam >= 1.0:
        # Q(x) + (x - x.detach()): forward is Q(x) bit for bit, which the paper's x + (Q(x) - x).detach() is not
        # in bf16 (Q(x) - x rounds: a weight at 50·mean|W| landed 5 % off its ternary value, so training and the
        # packed model would disagree)
        return quantizer(x).detach() + (x - x.detach())
    return x + (lam * (quantizer(x) - x)).detach()


class SignSTE(torch.autograd.Function):
    """sign(W) in {-1,+1} forward (sign(0) = +1); backward grad * (1.001 - tanh(W)^2) (OneBit)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return torch.where(w < 0, -1.0, 1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        # tanh surrogate: large where the sign may flip (|w| small), a 0.001 floor keeps far weights alive
        return grad * (1.001 - torch.tanh(w) ** 2)


def sign_ste(w: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """OneBit sign with its surrogate gradient, blended with lambda like the other quantizers."""
    if lam >= 1.0:
        return SignSTE.apply(w)
    if lam <= 0.0:
        return w
    return w + lam * (SignSTE.apply(w) - w)
