"""Pack a full-precision (latent-weight) checkpoint: load, quantize with a method's rule, save packed."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitllm.formats.checkpoint import check_linear_class, resolve_model_dir, save_pretrained
from bitllm.formats.packing import PackFormat
from bitllm.quant.api import quantize_
from bitllm.quant.config import config_for


def pack_checkpoint(
    model_id: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "ternary",
    format: str = "i2",
    input_norm: bool = False,
    skip: tuple[str, ...] = ("lm_head",),
    linear_class: str = "bitlinear",
) -> Path:
    """Quantize every linear layer but `skip` of a latent-weight checkpoint with `method` and pack it."""
    PackFormat(format)  # bad options fail (FormatError) before the model is loaded and quantized
    check_linear_class(linear_class)
    directory = resolve_model_dir(model_id)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    kwargs = {"skip": skip}
    if method in ("ternary", "binary"):
        kwargs["input_norm"] = input_norm
    quantize_(model, config_for(method, **kwargs))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a checkpoint without tokenizer files still packs
    return save_pretrained(model, output, format, tokenizer=tokenizer, linear_class=linear_class)
