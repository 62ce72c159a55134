"""Load a teacher (HF directory, hub id or GGUF file) and build its quantized student layer by layer.

The student is never a second full-precision copy of the teacher: its skeleton lives on the meta device, each
linear layer is quantized straight from the teacher's weight (one layer's fp32 copy alive at a time), and only
the remaining small tensors (embeddings, norms, lm_head) are copied in fp32.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from torch import nn

from bitllm.errors import BitLLMError, UnsupportedModelError
from bitllm.quant.config import QuantConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs on which PyTorch's bf16 matmul is not a slow emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_teacher_dtype(dtype: str) -> str:
    """`auto` -> bf16 on a GPU or a CPU with native bf16, fp32 elsewhere. On a CPU without it (Zen 3,
    most laptops) PyTorch runs bf16 matmuls through a scalar fallback: the gemma-3-270m teacher's
    forward took minutes per batch in bf16 against seconds in fp32."""
    if dtype != "auto":
        return dtype
    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "fp32"


def load_teacher(spec: str, dtype: str = "auto"):
    """(model, tokenizer) of `spec`: a local directory, a hub id (through resolve_model_dir), or a .gguf file
    (transformers dequantizes it; needs the `gguf` package). A GGUF transformers cannot load as the model it
    holds (a ternary file with llama.cpp's per-tensor scales, as bitllm exports, or a `bitnet` one) is refused
    before loading. The model is in eval mode with no gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitllm.formats.checkpoint import resolve_model_dir

    torch_dtype = DTYPES[resolve_teacher_dtype(dtype)]
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise BitLLMError(f"{p} is a file but not a .gguf; pass a model directory, a hub id or a GGUF file")
        from transformers import GgufConfig

        from bitllm.formats.gguf_io import transformers_gguf_problem

        if why := transformers_gguf_problem(p):  # e.g. bitllm's own export: transformers would load it unscaled
            raise UnsupportedModelError(
                f"{spec}: transformers cannot load this GGUF as a teacher: {why}. It is an already-quantized "
                f"ternary model: convert its full-precision original instead (`bitllm import {p.name} -o DIR` "
                "makes it a bitllm checkpoint to run or evaluate)"
            )

        # transformers 5 keeps GGUF weights packed (its own matmul kernels) unless told to dequantize; the student
        # is built from dense nn.Linear weights
        kw = {"gguf_file": p.name, "quantization_config": GgufConfig(dequantize=True)}
        where = p.parent
    else:
        kw = {}
        where = resolve_model_dir(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kw)
    except ValueError as e:
        raise UnsupportedModelError(f"{spec}: transformers cannot load it as a causal LM: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": kw["gguf_file"]} if kw else {}))
    if kw:  # dequantized: a dense model now, whatever the config remembers of the file
        model.config.quantization_config = None
        delattr(model.config, "quantization_config")
        model.hf_quantizer = None
    if tokenizer.eos_token_id is None:
        raise BitLLMError(f"{spec}: the tokenizer has no EOS token; conversion needs one to separate documents")
    if getattr(model.config, "quantization_config", None) is not None:
        raise UnsupportedModelError(f"{spec} is already quantized ({model.config.quantization_config}); convert "
                                    "its full-precision original")
    model.eval().requires_grad_(False)
    return model, tokenizer


def _skeleton(config) -> nn.Module:
    """The model of `config` with parameters on the meta device (no memory, no random init)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = type(config).from_dict(config.to_dict())  # a copy without any quantization_config of the teacher
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def build_student(teacher: nn.Module, qconfig: QuantConfig, init: bool = True) -> nn.Module:
    """An fp32 student: `teacher`'s architecture with every linear (but qconfig.skip) swapped for bitllm's layer of
    `qconfig`, initialised from the teacher's weights (SVID for OneBit). init=False skips the (slow) SVID, for a
    student whose weights a checkpoint will overwrite."""
    from bitllm.quant.api import HANDLERS, quantizable_modules
    from bitllm.quant.primitives import check_finite
    from transformers.pytorch_utils import Conv1D

    handler = HANDLERS[type(qconfig)]
    saved = _with_lam(qconfig, 1.0)  # what the checkpoint records: the fully quantized layer
    if not init and hasattr(qconfig, "svid"):
        qconfig = _without_svid(qconfig)
    targets = quantizable_modules(teacher, qconfig.skip)
    if not targets:
        raise UnsupportedModelError(f"{type(teacher).__name__}: no nn.Linear or Conv1D layer to quantize")
    student = _skeleton(teacher.config)
    device = next(teacher.parameters()).device
    for name, module in targets:
        w = module.weight.detach()
        w = (w.t() if isinstance(module, Conv1D) else w).to(torch.float32, copy=True)  # (out, in) fp32
        check_finite(w, f"{name}.weight")
        b = None if module.bias is None else module.bias.detach().to(torch.float32, copy=True)
        # the handler sees an nn.Linear-shaped view in fp32, so the new layer is fp32 whatever the teacher's dtype
        student.set_submodule(name, handler(types.SimpleNamespace(weight=w, bias=b), qconfig).to(device))
        del w, b
    _materialise(student, teacher)
    student.bitllm_config = saved
    student.generation_config = teacher.generation_config
    student.config.dtype = torch.float32
    return student.train()


def _without_svid(qconfig: QuantConfig) -> QuantConfig:
    import dataclasses

    return dataclasses.replace(qconfig, svid=False)


def _with_lam(qconfig: QuantConfig, lam: float) -> QuantConfig:
    import dataclasses

    return dataclasses.replace(qconfig, lam=lam)


@torch.no_grad()
def _materialise(student: nn.Module, teacher: nn.Module) -> None:
    """Give every parameter/buffer still on the meta device an fp32 copy of the teacher's tensor of the same name.
    Tied tensors (one meta Parameter under two names) stay tied: they map to one new Parameter."""
    t_params = dict(teacher.named_parameters(remove_duplicate=False))
    t_bufs = dict(teacher.named_buffers(remove_duplicate=False))
    new: dict[int, nn.Parameter] = {}
    for mod_name, mod in student.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            src = t_params.get(prefix + pname)
            if src is None:
                raise UnsupportedModelError(f"student parameter {prefix + pname} has no teacher tensor of that name")
            if id(p) not in new:
                new[id(p)] = nn.Parameter(src.detach().to(torch.float32, copy=True), requires_grad=p.requires_grad)
            mod._parameters[pname] = new[id(p)]
        for bname, buf in list(mod._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            src = t_bufs.get(prefix + bname)
            if src is None:
                raise UnsupportedModelError(f"student buffer {prefix + bname} has no teacher tensor of that name")
            mod._buffers[bname] = src.detach().to(torch.float32 if src.is_floating_point() else src.dtype, copy=True)
    t_in, t_out = teacher.get_input_embeddings(), teacher.get_output_embeddings()
    if t_out is not None and t_out.weight is t_in.weight:  # tied in the teacher: tie in the student too
        student.get_output_embeddings().weight = student.get_input_embeddings().weight
    student.to(next(teacher.parameters()).device)
