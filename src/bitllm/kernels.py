"""Thin Python wrapper over the native CPU kernels in ``bitllm._core`` (csrc/kernels.h).

Formats (kernel memory layouts, byte-level spec in docs/formats.md, "Native kernels"):
``i2`` ternary 2 bits/weight, ``t1`` ternary 1.67 bits/weight (5 bits per 3 weights, for table
lookups; the T1 *file* format is 1.6), ``b1`` binary 1 bit/weight. Pack an int8 weight matrix W (N out-features, K in-features) once with :func:`pack`,
then call :func:`linear_a8` (W1.58A8 / W1A8: int8 activations, exact int32 accumulation) or
:func:`linear_f32` (weight-only: fp32 activations, multiplication-free). Every ISA variant returns
bit-identical results; ``isa=`` picks one explicitly (tests), ``BITLLM_ISA`` forces the default.

Tensors and numpy arrays are passed to C++ without copies (DLPack); results are torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from bitllm import _core
from bitllm.errors import FormatError

__all__ = [
    "KernelFormat",
    "PackedWeight",
    "available_isas",
    "compiled_isas",
    "active_isa",
    "set_num_threads",
    "get_num_threads",
    "quantize_activations",
    "pack",
    "unpack",
    "linear_a8",
    "gemm_a8",
    "linear_f32",
    "stream_read_bandwidth",
    "cpu_model",
]


class KernelFormat(str, Enum):
    """Kernel weight layouts (docs/formats.md "Native kernels")."""

    I2 = "i2"  # ternary, rows of 32-byte blocks: byte j bits 2i..2i+1 = w+1 of k = 32i + j (2.0 bpw)
    T1 = "t1"  # ternary, 3-column codes (nibble + high bit), tiles of 16 rows, K chunks (1.67 bpw)
    B1 = "b1"  # binary ±1, byte p bit i = (w == -1) of k = 8p + i, tiles of 64 rows, K chunks (1.0 bpw)


_ALPHABET = {KernelFormat.I2: "{-1, 0, +1}", KernelFormat.T1: "{-1, 0, +1}", KernelFormat.B1: "{-1, +1}"}


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix in a kernel layout: ``data`` is a 1-D uint8 tensor of ``N`` padded rows (T1 and
    T1: rounded up to tiles of 16, then one int32 per stored row, its count of set sign bits; B1: rounded
    up to tiles of 64)."""

    fmt: KernelFormat
    N: int
    K: int
    data: torch.Tensor  # (packed_bytes(fmt, N, K),) uint8

    def __post_init__(self) -> None:
        # The kernels read packed_bytes bytes through a raw pointer: check the buffer once here.
        d = self.data
        if not isinstance(self.fmt, KernelFormat):
            raise FormatError(f"PackedWeight.fmt must be a KernelFormat, got {self.fmt!r}")
        if not (isinstance(d, torch.Tensor) and d.dtype == torch.uint8 and d.dim() == 1 and d.is_contiguous()
                and d.device.type == "cpu"):
            raise FormatError("PackedWeight.data must be a contiguous 1-D uint8 CPU tensor")
        expected = _core.packed_bytes(self.fmt.value, self.N, self.K) if self.N > 0 and self.K > 0 else -1
        if d.numel() != expected:
            raise FormatError(
                f"PackedWeight.data has {d.numel()} bytes; {self.fmt.value} ({self.N}, {self.K}) needs {expected}"
            )

    @property
    def bits_per_weight(self) -> float:
        """Bytes actually stored per logical weight, × 8 (includes the padding to whole blocks and tiles)."""
        return 8.0 * self.data.numel() / (self.N * self.K)

    def unpack(self) -> torch.Tensor:
        return unpack(self)


# ---------------------------------------------------------------------------------------------
# Variants and threads
# ---------------------------------------------------------------------------------------------


def available_isas() -> list[str]:
    """Kernel variants compiled in and runnable on this CPU, e.g. ``['generic', 'avx2']``."""
    return list(_core.available_isas())


def compiled_isas() -> list[str]:
    """Kernel variants compiled into this build (the CPU may lack some)."""
    return list(_core.compiled_isas())


def active_isa() -> str:
    """The variant used when ``isa=None``: the best one, or the one ``BITLLM_ISA`` forces."""
    return _core.active_isa()


def set_num_threads(n: int) -> None:
    """Threads used over output rows by every kernel call."""
    if int(n) < 1:
        raise ValueError(f"set_num_threads: expected n >= 1, got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    return _core.get_num_threads()


def stream_read_bandwidth(nbytes: int = 1 << 30, threads: int | None = None, reps: int = 5) -> float:
    """Best-of-``reps`` read-only streaming bandwidth in bytes/s (the kernels' roofline)."""
    return _core.stream_read_bandwidth(int(nbytes), int(threads or get_num_threads()), int(reps))


def cpu_model() -> str:
    return _core.cpu_model()


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got device {x.device}")
    return x


def _check(x, name: str, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    x = _as_tensor(x, name)
    if x.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {x.dtype} (convert it with .to({dtype}))")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")
    return x


def _fmt(fmt) -> KernelFormat:
    try:
        return KernelFormat(fmt.value if isinstance(fmt, Enum) else str(fmt).lower())
    except ValueError:
        raise FormatError(f"unknown kernel format {fmt!r}; expected one of i2, t1, b1") from None


_ISA_CODES = {"generic": 0, "avx2": 1, "avx512": 2, "neon": 3, "neon_dotprod": 4}  # csrc/kernels.h Isa
_FMT_CODES = {KernelFormat.I2: 0, KernelFormat.T1: 1, KernelFormat.B1: 2}  # csrc/kernels.h Format
_AVAILABLE = tuple(_core.available_isas())


def _isa(isa: str | None) -> str | None:
    if isa is None or isa in _AVAILABLE:
        return isa
    if isa not in available_isas():
        why = "not compiled into this build" if isa not in compiled_isas() else "not supported by this CPU"
        raise ValueError(f"kernel variant {isa!r} is {why}; available here: {available_isas()}")
    return isa


# ---------------------------------------------------------------------------------------------
# Packing and activations
# ---------------------------------------------------------------------------------------------


def pack(fmt: KernelFormat | str, w: torch.Tensor | np.ndarray) -> PackedWeight:
    """Repack an int8 (N, K) matrix with values in the format's alphabet into the kernel layout."""
    f = _fmt(fmt)
    w = _check(w, "w", torch.int8, 2)
    N, K = w.shape
    if N < 1 or K < 1:
        raise FormatError(f"pack: expected a non-empty (N, K) matrix, got shape {tuple(w.shape)}")
    out = torch.empty(_core.packed_bytes(f.value, N, K), dtype=torch.uint8)
    try:
        _core.pack(f.value, w, out)  # the binding checks the alphabet (one pass over w)
    except ValueError:
        bad = _core.find_invalid_weight(f.value, w)  # on the error path only: where, as (row, column)
        if bad < 0:
            raise
        n, k = divmod(bad, K)
        raise FormatError(
            f"pack({f.value}): weight [{n}, {k}] = {int(w[n, k])} is outside the alphabet {_ALPHABET[f]}"
        ) from None
    return PackedWeight(f, int(N), int(K), out)


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The int8 (N, K) matrix back from a PackedWeight (exact inverse of :func:`pack`)."""
    if not isinstance(packed, PackedWeight):
        raise ValueError(f"packed: expected a PackedWeight from bitllm.kernels.pack, got {type(packed).__name__}")
    out = torch.empty(packed.N, packed.K, dtype=torch.int8)
    _core.unpack(packed.fmt.value, packed.data, out)
    return out


def quantize_activations(
    x: torch.Tensor | np.ndarray, isa: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pinned per-row absmax int8 quantizer: returns q (M, K) int8, scale (M,) fp32, Σq (M,) int32.

    s = 127 / max(max|x|, 1e-5); q = clamp(round_half_even(x * s), -128, 127), all in fp32 — bit
    for bit what ``(x * s).round().clamp(-128, 127)`` gives in torch.
    """
    x = _check(x, "x", torch.float32, 2)
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8)
    s = torch.empty(M, dtype=torch.float32)
    sums = torch.empty(M, dtype=torch.int32)
    _core.quantize_activations(x, q, s, sums, _isa(isa))
    return q, s, sums


# ---------------------------------------------------------------------------------------------
# Matmuls
# ---------------------------------------------------------------------------------------------


def _linear_fast(a8: bool, packed: PackedWeight, x, wscale, bias, isa: str | None) -> torch.Tensor | None:
    """The common case (contiguous fp32 CPU torch tensors, right shapes) through raw pointers.

    Returns None when anything is unusual, so the caller falls back to the checked path with its
    error messages. Crossing nanobind with torch tensors costs ~3 us each; this costs ~1 us total.
    """
    if not (type(packed) is PackedWeight and type(x) is torch.Tensor and type(wscale) is torch.Tensor):
        return None
    ok = (x.dtype is torch.float32 and x.dim() == 2 and x.device.type == "cpu" and x.shape[1] == packed.K
          and x.is_contiguous() and wscale.dtype is torch.float32 and wscale.shape == (packed.N,)
          and wscale.device.type == "cpu" and wscale.is_contiguous())
    if ok and bias is not None:
        ok = (type(bias) is torch.Tensor and bias.dtype is torch.float32 and bias.shape == (packed.N,)
              and bias.device.type == "cpu" and bias.is_contiguous())
    if not ok or (isa is not None and isa not in _AVAILABLE):
        return None
    M = x.shape[0]
    out = torch.empty(M, packed.N, dtype=torch.float32)
    if M:
        _core.linear_ptr(a8, _FMT_CODES[packed.fmt], packed.data.data_ptr(), packed.N, packed.K, x.data_ptr(), M,
                         wscale.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
                         -1 if isa is None else _ISA_CODES[isa])
    return out


def _linear_args(packed: PackedWeight, x, wscale, bias):
    if not isinstance(packed, PackedWeight):
        raise ValueError(f"packed: expected a PackedWeight from bitllm.kernels.pack, got {type(packed).__name__}")
    x = _check(x, "x", torch.float32, 2)
    if x.shape[1] != packed.K:
        raise ValueError(f"x: expected (M, {packed.K}) for a weight of shape ({packed.N}, {packed.K}), got {tuple(x.shape)}")
    wscale = _check(wscale, "wscale", torch.float32, 1)
    if wscale.shape[0] != packed.N:
        raise ValueError(f"wscale: expected ({packed.N},), got {tuple(wscale.shape)} (broadcast a per-tensor scale)")
    if bias is not None:
        bias = _check(bias, "bias", torch.float32, 1)
        if bias.shape[0] != packed.N:
            raise ValueError(f"bias: expected ({packed.N},), got {tuple(bias.shape)}")
    out = torch.empty(x.shape[0], packed.N, dtype=torch.float32)
    return x, wscale, bias, out


def linear_a8(packed: PackedWeight, x, wscale, bias=None, isa: str | None = None) -> torch.Tensor:
    """y = ((Σ_k W·q) / s_x) * wscale + bias with q, s_x from :func:`quantize_activations` (M, N)."""
    fast = _linear_fast(True, packed, x, wscale, bias, isa)
    if fast is not None:
        return fast
    x, wscale, bias, out = _linear_args(packed, x, wscale, bias)
    _core.linear_a8(packed.fmt.value, packed.data, packed.N, packed.K, x, wscale, bias, out, _isa(isa))
    return out


def gemm_a8(packed: PackedWeight, q, xscale, qsum, wscale, bias=None, isa: str | None = None) -> torch.Tensor:
    """The A8 kernel on already-quantized activations (q (M, K) int8, xscale (M,), qsum (M,))."""
    if not isinstance(packed, PackedWeight):
        raise ValueError("packed: expected a PackedWeight")
    q = _check(q, "q", torch.int8, 2)
    if q.shape[1] != packed.K:
        raise ValueError(f"q: expected (M, {packed.K}), got {tuple(q.shape)}")
    xscale = _check(xscale, "xscale", torch.float32, 1)
    qsum = _check(qsum, "qsum", torch.int32, 1)
    wscale = _check(wscale, "wscale", torch.float32, 1)
    if bias is not None:
        bias = _check(bias, "bias", torch.float32, 1)
    out = torch.empty(q.shape[0], packed.N, dtype=torch.float32)
    _core.gemm_a8(packed.fmt.value, packed.data, packed.N, packed.K, q, xscale, qsum, wscale, bias, out, _isa(isa))
    return out


def linear_f32(packed: PackedWeight, x, wscale, bias=None, isa: str | None = None) -> torch.Tensor:
    """Weight-only y = (Σ_k W·x) * wscale + bias, multiplication-free, canonical fp32 order (M, N)."""
    fast = _linear_fast(False, packed, x, wscale, bias, isa)
    if fast is not None:
        return fast
    x, wscale, bias, out = _linear_args(packed, x, wscale, bias)
    _core.linear_f32(packed.fmt.value, packed.data, packed.N, packed.K, x, wscale, bias, out, _isa(isa))
    return out
