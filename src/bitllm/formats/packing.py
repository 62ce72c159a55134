"""Exact pack/unpack pairs for bitllm's weight formats. Byte-level spec: docs/formats.md.

All functions take/return torch tensors on the CPU: ternary/binary values as int8 matrices of shape
(out, in) (an nn.Linear weight's layout) and packed bytes as uint8 matrices.
"""

from __future__ import annotations

import math
from enum import Enum

import torch

from bitllm.errors import FormatError


class PackFormat(str, Enum):
    """Packed weight formats. Each member documents its bytes (docs/formats.md has the full spec)."""

    I2 = "i2"
    """Ternary, 2 bits/weight. Shape (out, ceil(in/4)). Byte j of row r holds columns 4j..4j+3;
    column 4j+i sits at bits 2i..2i+1 (first column in the low bits) as code w+1 in {0,1,2}.
    Padding columns hold code 1 (weight 0). Code 3 is invalid."""

    T1 = "t1"
    """Ternary, base 3, 5 weights per byte = 1.6 bits/weight. Shape (out, ceil(in/5)). Byte j of row r
    is sum_{i<5} (w[r,5j+i]+1) * 3^i (first column is the least significant trit), 0..242.
    Padding trits are 1 (weight 0). Bytes 243..255 are invalid."""

    B1 = "b1"
    """Binary, 1 bit/weight. Shape (out, ceil(in/8)). Bit i of byte j of row r is 1 iff
    w[r,8j+i] = -1 (bit 0 = first column; OneBit's convention). Padding bits are 0 (+1)."""

    @classmethod
    def _missing_(cls, value):  # a FormatError (still a ValueError), so the CLI reports it cleanly
        raise FormatError(f"unknown pack format {value!r}; expected one of {[f.value for f in cls]}")

    @property
    def ternary(self) -> bool:
        return self is not PackFormat.B1

    @property
    def per_byte(self) -> int:
        return {PackFormat.I2: 4, PackFormat.T1: 5, PackFormat.B1: 8}[self]

    @property
    def bits_per_weight(self) -> float:
        return 8 / self.per_byte


def packed_shape(fmt: PackFormat | str, out_features: int, in_features: int) -> tuple[int, int]:
    fmt = PackFormat(fmt)
    return out_features, math.ceil(in_features / fmt.per_byte)


def _check_values(w: torch.Tensor, fmt: PackFormat) -> torch.Tensor:
    if w.dim() != 2:
        raise FormatError(f"{fmt.value}: expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    w = w.to(torch.int8)
    lo = -1
    hi = 1
    if w.numel() and (w.min() < lo or w.max() > hi):
        raise FormatError(f"{fmt.value}: weights must be in [-1, 1], found range [{w.min()}, {w.max()}]")
    if not fmt.ternary and w.numel() and (w == 0).any():
        raise FormatError("b1: binary weights must be -1 or +1, found 0")
    return w


def _pad_cols(codes: torch.Tensor, per_byte: int, fill: int) -> torch.Tensor:
    """(out, in) -> (out, nbytes, per_byte) with trailing columns set to `fill`."""
    out_f, in_f = codes.shape
    nbytes = math.ceil(in_f / per_byte)
    padded = torch.full((out_f, nbytes * per_byte), fill, dtype=torch.int32)
    padded[:, :in_f] = codes
    return padded.view(out_f, nbytes, per_byte)  # (out, nbytes, per_byte)


def pack(fmt: PackFormat | str, w: torch.Tensor) -> torch.Tensor:
    """Pack an int8 (out, in) matrix of {-1,0,1} (I2, T1) or {-1,1} (B1) into uint8 bytes."""
    fmt = PackFormat(fmt)
    w = _check_values(w, fmt)
    if fmt is PackFormat.I2:
        g = _pad_cols(w.to(torch.int32) + 1, 4, 1)  # codes 0..2, (out, nbytes, 4)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32)
        return (g << shifts).sum(-1).to(torch.uint8)
    if fmt is PackFormat.T1:
        g = _pad_cols(w.to(torch.int32) + 1, 5, 1)  # trits 0..2, (out, nbytes, 5)
        powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
        return (g * powers).sum(-1).to(torch.uint8)
    g = _pad_cols((w < 0).to(torch.int32), 8, 0)  # 1 where -1, (out, nbytes, 8)
    shifts = torch.arange(8, dtype=torch.int32)
    return (g << shifts).sum(-1).to(torch.uint8)


def unpack(fmt: PackFormat | str, packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of pack(): uint8 bytes -> int8 (out, in). Raises FormatError on invalid bytes."""
    fmt = PackFormat(fmt)
    out_f, in_f = shape
    want = packed_shape(fmt, out_f, in_f)
    if packed.dtype != torch.uint8:
        raise FormatError(f"{fmt.value}: packed weights must be uint8, got {packed.dtype}")
    if tuple(packed.shape) != want:
        raise FormatError(f"{fmt.value}: packed shape {tuple(packed.shape)} does not match {want} for ({out_f}, {in_f})")
    b = packed.to(torch.int32).unsqueeze(-1)  # (out, nbytes, 1)
    if fmt is PackFormat.I2:
        codes = (b >> torch.tensor([0, 2, 4, 6], dtype=torch.int32)) & 3  # (out, nbytes, 4)
        if (codes == 3).any():
            raise FormatError("i2: found invalid 2-bit code 3 (codes are w+1 in {0,1,2})")
        vals = codes - 1
    elif fmt is PackFormat.T1:
        if (b > 242).any():
            raise FormatError("t1: found byte > 242 (5 base-3 digits hold at most 242)")
        vals = (b // torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)) % 3 - 1  # (out, nbytes, 5)
    else:
        bits = (b >> torch.arange(8, dtype=torch.int32)) & 1  # (out, nbytes, 8)
        vals = 1 - 2 * bits
    return vals.reshape(out_f, -1)[:, :in_f].to(torch.int8).contiguous()


# --- Hugging Face BitNet layout (transformers integrations/bitnet.py) -------------------------------


def hf_packed_rows(out_features: int) -> int:
    return math.ceil(out_features / 4)


def pack_hf_bitnet(w: torch.Tensor) -> torch.Tensor:
    """HF BitNet layout: 4 values per byte along the *output* axis, in 4 row blocks.

    P[r, c] = sum_i (T[i*R' + r, c] + 1) << 2i with R' = ceil(out/4): block 0 (rows 0..R'-1) in the
    low bits. Rows past `out` are code 0 (transformers' convention; sliced off on unpack).
    Unlike transformers' pack_weights, this never mutates its argument.
    """
    w = _check_values(w, PackFormat.I2)
    out_f, in_f = w.shape
    rp = hf_packed_rows(out_f)
    codes = torch.zeros((4 * rp, in_f), dtype=torch.int32)
    codes[:out_f] = w.to(torch.int32) + 1
    blocks = codes.view(4, rp, in_f)  # (block i, r, c) = row i*R' + r
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(4, 1, 1)
    return (blocks << shifts).sum(0).to(torch.uint8)


def unpack_hf_bitnet(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of pack_hf_bitnet: uint8 (ceil(out/4), in) -> int8 (out, in)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"hf-bitnet: expected a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rp = hf_packed_rows(out_features)
    if packed.shape[0] != rp:
        raise FormatError(f"hf-bitnet: {packed.shape[0]} packed rows cannot hold {out_features} output rows (need {rp})")
    b = packed.to(torch.int32).unsqueeze(0)  # (1, R', in)
    codes = (b >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(4, 1, 1)) & 3  # (4, R', in)
    codes = codes.reshape(4 * rp, -1)[:out_features]
    if (codes == 3).any():
        raise FormatError("hf-bitnet: found invalid 2-bit code 3 (codes are w+1 in {0,1,2})")
    return (codes - 1).to(torch.int8).contiguous()
