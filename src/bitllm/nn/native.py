"""Bridge from PackedLinear to the native kernels (bitllm._core). Filled in by the kernel work."""

from __future__ import annotations

import torch


def available() -> bool:
    """True when the native kernels are importable and expose the packed-linear entry points."""
    try:
        from bitllm import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def packed_forward(layer, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - replaced by kernel work
    return layer.forward_reference(x)
