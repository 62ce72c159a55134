"""bitllm: train, convert, pack, run and measure 1-bit and 1.58-bit LLMs.

Public API (imported lazily so that `import bitllm` stays cheap):
    bitllm.quantize_(model, config)            swap linear layers for bitllm's training layers
    bitllm.TernaryConfig / TernaryWOConfig / BinaryConfig / OneBitConfig / config_for(method)
    bitllm.save_pretrained(model, dir, format)  pack and write a checkpoint atomically
    bitllm.from_pretrained(path_or_hub_id)      load it back as an HF model with PackedLinear layers
"""

from __future__ import annotations

from typing import Any

from bitllm.errors import BitLLMError, FormatError, QuantizationError, UnsupportedModelError

__version__ = "0.1.0"

_LAZY = {
    "quantize_": "bitllm.quant.api",
    "set_lambda_": "bitllm.quant.api",
    "pack_": "bitllm.quant.api",
    "QuantConfig": "bitllm.quant.config",
    "TernaryConfig": "bitllm.quant.config",
    "TernaryWOConfig": "bitllm.quant.config",
    "BinaryConfig": "bitllm.quant.config",
    "OneBitConfig": "bitllm.quant.config",
    "Method": "bitllm.quant.config",
    "config_for": "bitllm.quant.config",
    "PackFormat": "bitllm.formats.packing",
    "save_pretrained": "bitllm.formats.checkpoint",
    "from_pretrained": "bitllm.formats.checkpoint",
    "LLM": "bitllm.engine",
}

__all__ = ["BitLLMError", "FormatError", "QuantizationError", "UnsupportedModelError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bitllm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
