"""One exception family for everything bitllm raises on bad input (STYLE.md "Errors")."""

from __future__ import annotations


class BitLLMError(Exception):
    """Base class of every error bitllm raises on purpose."""


class FormatError(BitLLMError, ValueError):
    """A file or tensor is not what its format promises: truncated, corrupt, wrong shape/dtype/version."""


class UnsupportedModelError(BitLLMError, ValueError):
    """The model's architecture or a config field is not supported by this code path."""


class QuantizationError(BitLLMError, ValueError):
    """Bad numbers handed to a quantizer: NaN/inf weights, empty tensors."""
