"""bitllm.nn: training layers (BitLinear, BinaryLinear, OneBitLinear) and the inference PackedLinear."""

from bitllm.nn.layers import BinaryLinear, BitLinear, OneBitLinear
from bitllm.nn.packed import PackedLinear

__all__ = ["BinaryLinear", "BitLinear", "OneBitLinear", "PackedLinear"]
