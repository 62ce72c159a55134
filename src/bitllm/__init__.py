"""bitllm: train, convert, pack, run and measure 1-bit and 1.58-bit LLMs."""

from __future__ import annotations

from bitllm.errors import BitLLMError, FormatError, QuantizationError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "BitLLMError",
    "FormatError",
    "QuantizationError",
    "UnsupportedModelError",
    "__version__",
]
