"""One config dataclass per quantization scheme; each round-trips to JSON (saved beside the weights)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from bitllm.errors import BitLLMError

DEFAULT_SKIP = ("lm_head",)


class Method(str, Enum):
    """What a quantized linear layer computes (DESIGN.md §2)."""

    TERNARY = "ternary"  # BitNet b1.58: W in {-1,0,1} * mean|W|, int8 absmax activations (W1.58A8)
    TERNARY_WO = "ternary-wo"  # same weights, full-precision activations (seed bitLinear-phi-1.5)
    BINARY = "binary"  # BitNet b1: sign(W - mean W) * mean|W|, int8 activations (W1A8)
    ONEBIT = "onebit"  # OneBit: LN(h * (sign(W) @ (g * x))), full-precision activations


@dataclass
class QuantConfig:
    """Fields every scheme shares. `skip` lists module names (exact, suffix or glob) left unquantized."""

    method: ClassVar[Method]
    skip: tuple[str, ...] = DEFAULT_SKIP
    lam: float = 1.0  # warm-up blend: 0 = full precision, 1 = fully quantized

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["method"] = self.method.value
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "QuantConfig":
        d = dict(d)
        method = d.pop("method", None)
        if method is None:
            raise BitLLMError(f"quantization config has no 'method' field: {d}")
        cls = config_class(method)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise BitLLMError(f"unknown field(s) {sorted(unknown)} for method {method!r}; expected {sorted(names)}")
        if "skip" in d:
            d["skip"] = tuple(d["skip"])
        return cls(**d)


@dataclass
class TernaryConfig(QuantConfig):
    """BitNet b1.58. `input_norm` adds the paper's RMSNorm inside each BitLinear (off for archs with sub-norms)."""

    method: ClassVar[Method] = Method.TERNARY
    input_norm: bool = False
    norm_eps: float = 1e-6


@dataclass
class TernaryWOConfig(QuantConfig):
    """Weight-only ternary (Bitlinear4HF / bitLinear-phi-1.5): no activation quantization, no added norm."""

    method: ClassVar[Method] = Method.TERNARY_WO


@dataclass
class BinaryConfig(QuantConfig):
    """BitNet b1 (binary weights, int8 activations)."""

    method: ClassVar[Method] = Method.BINARY
    input_norm: bool = False
    norm_eps: float = 1e-6


@dataclass
class OneBitConfig(QuantConfig):
    """OneBit. `svid=True` initialises g, h from a rank-1 factorisation of |W| (else g = 1, h = mean|W|)."""

    method: ClassVar[Method] = Method.ONEBIT
    svid: bool = True
    ln_eps: float = 1e-5


_CONFIGS: dict[Method, type[QuantConfig]] = {
    c.method: c for c in (TernaryConfig, TernaryWOConfig, BinaryConfig, OneBitConfig)
}


def config_class(method: str | Method) -> type[QuantConfig]:
    try:
        return _CONFIGS[Method(method)]
    except ValueError:
        raise BitLLMError(
            f"unknown quantization method {method!r}; expected one of {[m.value for m in Method]}"
        ) from None


def config_for(method: str | Method, **kwargs: Any) -> QuantConfig:
    """Build the config of a method by name: config_for("ternary", input_norm=True)."""
    return config_class(method)(**kwargs)
