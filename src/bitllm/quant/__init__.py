"""bitllm.quant: primitives, STE functions, per-scheme configs and the quantize_ entry point."""

from bitllm.quant.api import pack_, quantize_, set_lambda_
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
