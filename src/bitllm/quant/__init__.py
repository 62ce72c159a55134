"""bitllm.quant: primitives, STE functions, per-scheme configs and the quantize_ entry point.

`quantize_`, `set_lambda_` and `pack_` live in bitllm.quant.api, which imports bitllm.nn; they are
loaded lazily here because bitllm.nn itself imports bitllm.quant.primitives.
"""

from typing import Any

from bitllm.quant.config import (
    BinaryConfig,
    Method,
    OneBitConfig,
    QuantConfig,
    TernaryConfig,
    TernaryWOConfig,
    config_for,
)

__all__ = [
    "BinaryConfig",
    "Method",
    "OneBitConfig",
    "QuantConfig",
    "TernaryConfig",
    "TernaryWOConfig",
    "config_for",
    "pack_",
    "quantize_",
    "set_lambda_",
]


def __getattr__(name: str) -> Any:
    if name in ("pack_", "quantize_", "set_lambda_"):
        from bitllm.quant import api

        return getattr(api, name)
    raise AttributeError(f"module 'bitllm.quant' has no attribute {name!r}")
