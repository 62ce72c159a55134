"""Checkpoint -> native engine: config translation, tensor naming, repack (docs/engine.md).

A bitllm or Hugging Face BitNet checkpoint is read tensor by tensor (safetensors memory-maps the
file) and handed to the C++ engine, which unpacks the file layout and repacks it into the kernel
layout; no fp32 copy of the model is ever built. The same tensor plan also writes *engine files*
(a safetensors file with canonical names and the engine config as metadata) that the standalone
C++ test loads without Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from bitllm.errors import BitLLMError, FormatError, UnsupportedModelError
from bitllm.formats.checkpoint import read_config  # noqa: F401  (re-exported: engine code and tests use it here)

FAMILIES = ("llama", "bitnet", "phi")
ACTS = ("silu", "swish", "relu2", "relu", "gelu_new", "gelu_python_tanh", "gelu", "gelu_python", "gelu_pytorch_tanh")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# PackedLinear buffer -> engine suffix
_LINEAR_PARTS = {"weight": "weight", "weight_scale": "scale", "bias": "bias", "input_factor": "g", "rms_norm.weight": "norm"}


@dataclass
class EngineSpec:
    """What the engine needs to know: its config (str -> str) and a map engine name -> checkpoint key."""

    config: dict[str, str]
    linears: dict[str, str]  # engine linear prefix "L.0.q" -> HF module name "model.layers.0.self_attn.q_proj"
    plain: dict[str, str]  # engine tensor name -> checkpoint key (norms, embeddings, head)
    scale_is_inverse: bool  # HF "bitlinear": weight_scale = 1/mean|W|
    online: bool  # HF BitNet quantization_mode "online": float master weights, ternarized here


def _get(cfg, name, default=None):
    return getattr(cfg, name, default)


def _rope(cfg) -> tuple[float, float]:
    """(theta, partial_rotary_factor), refusing RoPE variants the engine does not implement."""
    rp = _get(cfg, "rope_parameters") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(f"config field rope_parameters.rope_type = {rope_type!r}: the engine implements only 'default' RoPE")
    rs = _get(cfg, "rope_scaling") or {}  # transformers 5 aliases this to rope_parameters
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type", "default")) != "default":
        raise UnsupportedModelError(f"config field rope_scaling = {rs!r} is not supported by the engine")
    theta = rp.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    return float(theta), float(rp.get("partial_rotary_factor", _get(cfg, "partial_rotary_factor", 1.0)) or 1.0)


def _architecture(cfg) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Engine config, linear map and plain-tensor map of a transformers config."""
    fam = cfg.model_type
    if fam not in FAMILIES:
        raise UnsupportedModelError(f"config field model_type = {fam!r}: the native engine runs {', '.join(FAMILIES)}")
    act = _get(cfg, "hidden_act")
    if act not in ACTS:
        raise UnsupportedModelError(f"config field hidden_act = {act!r} is not supported by the engine (supported: {', '.join(ACTS)})")
    for field in ("sliding_window", "layer_types"):
        v = _get(cfg, field)
        if v and field == "sliding_window":
            raise UnsupportedModelError(f"config field sliding_window = {v!r} is not supported by the engine")
    if fam == "phi" and _get(cfg, "qk_layernorm"):
        raise UnsupportedModelError("config field qk_layernorm = True (phi) is not supported by the engine")
    if fam == "llama" and (_get(cfg, "pretraining_tp", 1) or 1) != 1:
        raise UnsupportedModelError(f"config field pretraining_tp = {cfg.pretraining_tp} is not supported by the engine")
    theta, partial = _rope(cfg)
    heads = cfg.num_attention_heads
    kv_heads = _get(cfg, "num_key_value_heads") or heads
    head_dim = _get(cfg, "head_dim") or cfg.hidden_size // heads
    rotary = int(head_dim * partial)
    eps = cfg.layer_norm_eps if fam == "phi" else cfg.rms_norm_eps
    config = {
        "family": fam, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
        "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "ffn": cfg.intermediate_size,
        "max_pos": cfg.max_position_embeddings, "norm_eps": repr(float(eps)), "rope_theta": repr(theta),
        "rotary_dim": rotary, "act": act, "tied": int(bool(_get(cfg, "tie_word_embeddings", False))),
    }
    linears: dict[str, str] = {}
    plain = {"embed": "model.embed_tokens.weight"}
    for i in range(cfg.num_hidden_layers):
        p, e = f"model.layers.{i}.", f"L.{i}."
        if fam == "phi":
            names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.dense",
                     "up": "mlp.fc1", "down": "mlp.fc2"}
            plain[e + "attn_norm.w"] = p + "input_layernorm.weight"
            plain[e + "attn_norm.b"] = p + "input_layernorm.bias"
        else:
            names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                     "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
            plain[e + "attn_norm.w"] = p + "input_layernorm.weight"
            plain[e + "ffn_norm.w"] = p + "post_attention_layernorm.weight"
            if fam == "bitnet":
                plain[e + "attn_sub_norm.w"] = p + "self_attn.attn_sub_norm.weight"
                plain[e + "ffn_sub_norm.w"] = p + "mlp.ffn_sub_norm.weight"
        for short, hf in names.items():
            linears[e + short] = p + hf
    if fam == "phi":
        plain["norm.w"], plain["norm.b"] = "model.final_layernorm.weight", "model.final_layernorm.bias"
        plain["head.b"] = "lm_head.bias"
    else:
        plain["norm.w"] = "model.norm.weight"
    plain["head.w"] = "lm_head.weight"
    return {k: str(v) for k, v in config.items()}, linears, plain


def engine_spec(cfg, qc: dict | None, where: str = "config.json") -> EngineSpec:
    """Translate a transformers config + quantization_config; UnsupportedModelError names the field."""
    config, linears, plain = _architecture(cfg)
    if not qc:
        raise UnsupportedModelError(f"{where}: no quantization_config: the native engine runs packed 1/1.58-bit models only")
    qm = qc.get("quant_method")
    modules = set(linears.values())
    if qm == "bitllm":
        from bitllm.formats.checkpoint import FORMAT_VERSION

        if qc.get("format_version") != FORMAT_VERSION:
            raise FormatError(f"{where}: bitllm format_version {qc.get('format_version')!r} is not supported")
        method, fmt = qc.get("method"), qc.get("format")
        if method not in ("ternary", "ternary-wo", "binary", "onebit"):
            raise UnsupportedModelError(f"{where}: quantization_config.method = {method!r} is not supported by the engine")
        if fmt not in ("i2", "t1", "b1"):
            raise UnsupportedModelError(f"{where}: quantization_config.format = {fmt!r} is not supported by the engine")
        quantized = set(qc.get("modules") or [])
        config.update(method=method, layout=fmt)
        inverse, online = False, False
        ln_eps = (qc.get("quant_config") or {}).get("ln_eps")
        if ln_eps is not None:
            config["onebit_ln_eps"] = repr(float(ln_eps))
        norm_eps = (qc.get("quant_config") or {}).get("norm_eps")
        if norm_eps is not None:
            config["linear_norm_eps"] = repr(float(norm_eps))
    elif qm == "bitnet":
        lc = qc.get("linear_class", "bitlinear")
        if lc not in ("bitlinear", "autobitlinear"):
            raise UnsupportedModelError(f"{where}: quantization_config.linear_class = {lc!r} is not supported")
        mode = qc.get("quantization_mode", "offline")
        if mode not in ("offline", "online"):
            raise UnsupportedModelError(f"{where}: quantization_config.quantization_mode = {mode!r} is not supported")
        skip = list(qc.get("modules_to_not_convert") or ["lm_head"])
        quantized = {m for m in modules if not any(m == s or m.endswith("." + s) or s.endswith(m) for s in skip)}
        config.update(method="ternary", layout="hf")
        if qc.get("use_rms_norm"):
            config["linear_norm_eps"] = repr(float(qc.get("rms_norm_eps") or 1e-6))
        inverse, online = lc == "bitlinear", mode == "online"
    else:
        raise UnsupportedModelError(f"{where}: quantization_config.quant_method = {qm!r} is not one the engine reads ('bitllm', 'bitnet')")
    missing = sorted(modules - quantized)
    if missing:
        raise UnsupportedModelError(f"{where}: module {missing[0]!r} is not quantized ({len(missing)} such); the engine needs every decoder linear layer packed")
    return EngineSpec(config, linears, plain, inverse, online)


# --- tensor sources ------------------------------------------------------------------------------


class _Source:
    """Uniform read access to a checkpoint directory (validated, memory-mapped) or an in-memory model."""

    def __init__(self, keys: set[str], get: Callable[[str], torch.Tensor], where: Callable[[str], str]):
        self.keys, self._get, self.where = keys, get, where
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def get(self, key: str) -> torch.Tensor:
        if key not in self.keys:
            raise FormatError(f"tensor {key!r} is missing")
        self.used.add(key)
        return self._get(key)


def _dir_source(directory: Path) -> _Source:
    from bitllm.formats.safetensors_io import CheckpointReader

    r = CheckpointReader(directory)
    return _Source(set(r.keys()), lambda k: r.get(k, finite=False), lambda k: str(r.file_of(k)))  # C++ checks NaN/inf


def _model_source(model: nn.Module) -> _Source:
    sd = model.state_dict()
    return _Source(set(sd), lambda k: sd[k].detach(), lambda k: "model")


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(dtype).cpu().numpy())


def iter_tensors(spec: EngineSpec, src: _Source, config: dict[str, str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """(engine name, array, checkpoint key) for every tensor the engine needs, one at a time."""
    tied = config["tied"] == "1"
    for name, key in spec.plain.items():
        if name == "head.w":
            if key not in src:
                if not tied:
                    raise FormatError(f"tensor {key!r} is missing and the config does not tie the head to the embeddings")
                continue
            if tied:  # a tied checkpoint may still store the head: the engine uses the embedding
                src.used.add(key)
                continue
        elif key not in src:
            raise FormatError(f"tensor {key!r} is missing from the checkpoint")
        t = src.get(key)
        if t.dtype not in FLOATS:
            raise FormatError(f"{src.where(key)}: tensor {key!r} has dtype {t.dtype}, expected a float type")
        yield name, _np(t, torch.float16 if name in ("embed", "head.w") else torch.float32), key
    for eng, mod in spec.linears.items():
        for part, suffix in _LINEAR_PARTS.items():
            key = f"{mod}.{part}"
            if key not in src:
                continue
            t = src.get(key)
            if part == "weight":
                if spec.online or t.dtype in FLOATS:
                    from bitllm.quant.primitives import ternarize

                    if spec.online:
                        w_int, gamma = ternarize(t)
                        yield f"{eng}.scale", _np(gamma.reshape(1), torch.float32), key
                    else:  # autobitlinear may store unpacked ternary floats
                        if not torch.isin(t.float(), torch.tensor([-1.0, 0.0, 1.0])).all():
                            raise FormatError(f"{src.where(key)}: tensor {key!r} is unpacked but not ternary")
                        w_int = t.to(torch.int8)
                    yield f"{eng}.weight", _np(w_int, torch.int8), key
                elif t.dtype == torch.uint8:
                    yield f"{eng}.weight", t.numpy() if t.is_contiguous() else _np(t, torch.uint8), key
                else:
                    raise FormatError(f"{src.where(key)}: tensor {key!r} has dtype {t.dtype}, expected uint8")
            elif part == "weight_scale":
                if spec.online:
                    continue
                s = t.float()
                if spec.scale_is_inverse:
                    s = 1.0 / s  # transformers' "bitlinear" stores 1/mean|W| and divides
                yield f"{eng}.scale", _np(s.reshape(-1), torch.float32), key
            else:
                yield f"{eng}.{suffix}", _np(t.reshape(-1), torch.float32), key
    ignorable = ("rotary_emb.inv_freq",)
    extra = sorted(k for k in src.keys - src.used if not k.endswith(ignorable))
    if extra:
        raise FormatError(f"{src.where(extra[0])}: unexpected tensor {extra[0]!r} ({len(extra)} unused by the {config['family']} engine)")


# --- entry points ----------------------------------------------------------------------------------


def check_options(head: str, kv_dtype: str) -> None:
    """The native engine's run-time options: BitLLMError naming a bad value."""
    if head not in ("f16", "i8"):
        raise BitLLMError(f"head must be 'f16' or 'i8', got {head!r}")
    if kv_dtype not in ("f32", "f16"):
        raise BitLLMError(f"kv_dtype must be 'f32' or 'f16', got {kv_dtype!r}")


def _options(config: dict[str, str], head: str, kernel_format: str | None, kv_dtype: str = "f32") -> dict[str, str]:
    check_options(head, kv_dtype)
    config = dict(config, head=head)
    if kv_dtype != "f32":  # a runtime choice: engine files keep the default unless asked
        config["kv_dtype"] = kv_dtype
    if kernel_format is not None:
        config["kernel_format"] = kernel_format
    return config


def load_engine(directory: Path, *, head: str = "f16", kernel_format: str | None = None, kv_dtype: str = "f32"):
    """Build a native engine from a checkpoint directory. Returns (engine, spec, info dict)."""
    from bitllm import _engine

    t0 = time.perf_counter()
    cfg, qc, _ = read_config(directory)
    spec = engine_spec(cfg, qc, str(directory / "config.json"))
    config = _options(spec.config, head, kernel_format, kv_dtype)
    src = _dir_source(directory)
    eng = _build(config, spec, src)
    info = {"load_s": time.perf_counter() - t0, "weight_bytes": eng.weight_bytes(), "config": config}
    return eng, spec, info


def engine_from_model(model: nn.Module, *, head: str = "f16", kernel_format: str | None = None, kv_dtype: str = "f32"):
    """Build a native engine from an in-memory HF model with PackedLinear layers (bitllm.from_pretrained)."""
    qc = (getattr(model, "bitllm_source", None) or {}).get("quantization_config")
    if qc is None:
        raise UnsupportedModelError("this model has no bitllm_source.quantization_config; load it with bitllm.from_pretrained")
    from bitllm.nn.packed import PackedLinear

    # a model loaded by from_pretrained holds PackedLinear buffers (bitllm layout, multiplier scales)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not layers:
        raise UnsupportedModelError("the model has no PackedLinear layers")
    first = next(iter(layers.values()))
    fmt = {"i2": "i2", "t1": "t1", "b1": "b1"}[first.fmt.value]
    qc2 = {"quant_method": "bitllm", "format_version": 1, "method": first.method.value, "format": fmt, "modules": sorted(layers)}
    spec = engine_spec(model.config, qc2, "model")
    if first.rms_norm is not None:
        spec.config["linear_norm_eps"] = repr(float(first.rms_norm.variance_epsilon))
    spec.config["onebit_ln_eps"] = repr(float(first.ln_eps))
    config = _options(spec.config, head, kernel_format, kv_dtype)
    from bitllm import _engine  # noqa: F401

    return _build(config, spec, _model_source(model)), spec


def _build(config: dict[str, str], spec: EngineSpec, src: _Source):
    from bitllm import _engine

    try:
        eng = _engine.Engine(config)
    except _engine.EngineError as e:
        raise UnsupportedModelError(str(e)) from None
    for name, arr, key in iter_tensors(spec, src, config):
        try:
            eng.set_tensor(name, arr)
        except _engine.EngineError as e:
            raise FormatError(f"{src.where(key)}: tensor {key!r}: {e}") from None
    try:
        eng.finalize()
    except _engine.EngineError as e:
        raise FormatError(str(e)) from None
    _release_free_memory()
    return eng


def _release_free_memory() -> None:
    """Hand the loader's freed temporaries (file views, unpacked int8 rows) back to the OS (glibc)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def export_engine_file(source, path: str | Path, *, head: str = "f16", kernel_format: str | None = None,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write an engine file (safetensors: canonical tensor names, engine config as metadata) for the
    standalone C++ engine. `source` is a checkpoint directory or a model from bitllm.from_pretrained."""
    from safetensors.numpy import save_file

    if isinstance(source, nn.Module):
        eng_spec = None
        qc = (getattr(source, "bitllm_source", None) or {}).get("quantization_config")
        if qc is None:
            raise UnsupportedModelError("export_engine_file needs a model from bitllm.from_pretrained or a directory")
        source = Path(source.bitllm_source["path"])
    directory = Path(source)
    cfg, qc, _ = read_config(directory)
    eng_spec = engine_spec(cfg, qc, str(directory / "config.json"))
    config = _options(eng_spec.config, head, kernel_format)
    tensors = {name: arr for name, arr, _ in iter_tensors(eng_spec, _dir_source(directory), config)}
    meta = dict(config)
    meta.update(metadata or {})
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path
