"""`quantize_(model, config)`: swap every linear layer (but lm_head and a skip list) for bitllm's.

One entry point with a registry of handlers, one per config class (torchao's `quantize_` design).
Works on any Hugging Face causal LM: `nn.Linear` and GPT-2's `Conv1D` (whose weight is (in, out)).
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bitllm.errors import QuantizationError, UnsupportedModelError
from bitllm.formats.packing import PackFormat
from bitllm.nn.layers import BinaryLinear, BitLinear, OneBitLinear
from bitllm.nn.packed import PackedLinear
from bitllm.quant.config import (
    DEFAULT_SKIP,
    BinaryConfig,
    OneBitConfig,
    QuantConfig,
    TernaryConfig,
    TernaryWOConfig,
)
from bitllm.quant.primitives import check_finite

BITLLM_LAYERS = (BitLinear, OneBitLinear, PackedLinear)


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of an nn.Linear or a transformers Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.detach().t(), module.bias  # Conv1D stores (in, out)
    return module.weight.detach(), module.bias


def _make_bitlinear(cls: type[BitLinear], module: nn.Module, weight_only: bool, config) -> BitLinear:
    w, b = _linear_weight(module)
    layer = cls(
        w.shape[1], w.shape[0], b is not None,
        weight_only=weight_only,
        input_norm=getattr(config, "input_norm", False),
        norm_eps=getattr(config, "norm_eps", 1e-6),
        lam=config.lam, device=w.device, dtype=w.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b.detach())
    return layer


def _ternary(module: nn.Module, config: TernaryConfig) -> nn.Module:
    return _make_bitlinear(BitLinear, module, False, config)


def _ternary_wo(module: nn.Module, config: TernaryWOConfig) -> nn.Module:
    return _make_bitlinear(BitLinear, module, True, config)


def _binary(module: nn.Module, config: BinaryConfig) -> nn.Module:
    return _make_bitlinear(BinaryLinear, module, False, config)


def _onebit(module: nn.Module, config: OneBitConfig) -> nn.Module:
    w, b = _linear_weight(module)
    layer = OneBitLinear(
        w.shape[1], w.shape[0], b is not None, ln_eps=config.ln_eps, lam=config.lam, device=w.device, dtype=w.dtype
    )
    layer.init_from(w.float(), use_svid=config.svid)
    if b is not None:
        with torch.no_grad():
            layer.bias.copy_(b.detach())
    return layer


HANDLERS: dict[type[QuantConfig], Callable[[nn.Module, QuantConfig], nn.Module]] = {
    TernaryConfig: _ternary,
    TernaryWOConfig: _ternary_wo,
    BinaryConfig: _binary,
    OneBitConfig: _onebit,
}


def matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """A module name matches a pattern exactly, as a dotted suffix, or as a glob."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _tied_to_embeddings(model: nn.Module, module: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    return emb is not None and getattr(module, "weight", None) is getattr(emb, "weight", object())


def quantizable_modules(model: nn.Module, skip: tuple[str, ...] | list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear/Conv1D that quantize_ would swap."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, BITLLM_LAYERS) or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if matches(name, skip) or _tied_to_embeddings(model, module):
            continue
        found.append((name, module))
    return found


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap every linear layer except lm_head/`config.skip` for the layer of `config`'s scheme, in place.

    Weights are copied, so a pretrained model starts from its own values (QAT); the model remembers
    the config as `model.bitllm_config` (saved beside the weights by `bitllm.save_pretrained`).
    """
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no quantize_ handler for {type(config).__name__}")
    done = [name for name, m in model.named_modules() if isinstance(m, BITLLM_LAYERS)]
    if done:  # a second call would mix schemes under one recorded config (and save them in the wrong format)
        raise QuantizationError(
            f"{type(model).__name__} is already quantized ({len(done)} bitllm layer(s), e.g. {done[0]!r}); "
            "call quantize_ once per model, on its full-precision original"
        )
    names = [n for n, _ in model.named_modules()]
    unused = [p for p in config.skip if p not in DEFAULT_SKIP and not any(matches(n, (p,)) for n in names)]
    if unused:
        warnings.warn(f"quantize_: skip pattern(s) {unused} match no module of {type(model).__name__}; "
                      "every other linear layer is quantized", stacklevel=2)
    targets = quantizable_modules(model, config.skip)
    if not targets:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no nn.Linear or Conv1D layer to quantize outside {list(config.skip)}"
        )
    for name, module in targets:  # check every weight before swapping any: an error leaves the model untouched
        check_finite(_linear_weight(module)[0], f"{name}.weight")
    for name, module in targets:
        model.set_submodule(name, handler(module, config))
    model.bitllm_config = config
    return model


def set_lambda_(model: nn.Module, lam: float) -> None:
    """Set the warm-up blend of every bitllm training layer (0 = full precision, 1 = quantized)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    for m in model.modules():
        if isinstance(m, (BitLinear, OneBitLinear)):
            m.lam = lam


def pack_(model: nn.Module, fmt: PackFormat | str) -> nn.Module:
    """Replace every training layer by a PackedLinear in `fmt` (in place): the inference form."""
    fmt = PackFormat(fmt)
    for name, module in list(model.named_modules()):
        if isinstance(module, (BitLinear, OneBitLinear)):
            model.set_submodule(name, PackedLinear.from_training_layer(module, fmt))
    return model
