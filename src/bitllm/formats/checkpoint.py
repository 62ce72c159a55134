"""bitllm checkpoints: Hugging Face model directories with packed 1/1.58-bit linear layers.

Two flavours (docs/formats.md, "Checkpoints"):
- ternary W1.58A8 in I2 uses transformers' own BitNet layout and `quant_method: "bitnet"`, so plain
  `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads it without bitllm;
- everything else (T1, B1, weight-only ternary, binary, OneBit) uses `quant_method: "bitllm"` with
  a format name and version in config.json and in the safetensors metadata.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from bitllm.errors import BitLLMError, FormatError, UnsupportedModelError
from bitllm.formats.atomic import atomic_directory
from bitllm.formats.packing import PackFormat, hf_packed_rows, pack_hf_bitnet, packed_shape, unpack_hf_bitnet
from bitllm.formats.safetensors_io import CheckpointReader, write_checkpoint_tensors
from bitllm.nn.layers import BitLinear, OneBitLinear
from bitllm.nn.packed import PackedLinear
from bitllm.quant.config import Method
from bitllm.quant.primitives import ternarize

log = logging.getLogger(__name__)

QUANT_METHOD = "bitllm"
FORMAT_VERSION = 1
HF_FORMAT = "hf-bitnet"  # the safetensors-metadata name of transformers' BitNet layout
DEFAULT_SHARD_BYTES = 4 * 1024**3
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
LINEAR_CLASSES = ("bitlinear", "autobitlinear")  # HF BitNet scale conventions (docs/formats.md §3)


def check_linear_class(linear_class: str) -> None:
    """FormatError (which the CLI reports as one line) unless `linear_class` is a known convention."""
    if linear_class not in LINEAR_CLASSES:
        raise FormatError(f"unknown linear_class {linear_class!r}; expected one of {LINEAR_CLASSES}")


# --- saving ----------------------------------------------------------------------------------------


def _packed_layers(model: nn.Module, fmt: PackFormat) -> dict[str, PackedLinear]:
    """Every bitllm layer of the model in packed form (training layers are frozen, one at a time)."""
    layers: dict[str, PackedLinear] = {}
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            if m.fmt is not fmt:
                m = PackedLinear.from_int(
                    m.int_weight(), m.weight_scale, m.method, fmt, m.bias, m.input_factor,
                    None if m.rms_norm is None else m.rms_norm.weight, ln_eps=m.ln_eps,
                    norm_eps=1e-6 if m.rms_norm is None else m.rms_norm.variance_epsilon,
                )
            layers[name] = m
        elif isinstance(m, (BitLinear, OneBitLinear)):
            layers[name] = PackedLinear.from_training_layer(m, fmt)
    return layers


def _hf_compatible(model: nn.Module, layers: dict[str, PackedLinear], fmt: PackFormat) -> str | None:
    """None if transformers' BitNet loader can read the model as it is, else why not."""
    if fmt is not PackFormat.I2:
        return f"format {fmt.value} is bitllm's own"
    methods = {p.method for p in layers.values()}
    if methods != {Method.TERNARY}:
        return f"method {sorted(m.value for m in methods)} is not W1.58A8 ternary"
    for name, p in layers.items():
        if p.out_features % 4:
            return f"{name} has {p.out_features} outputs, not a multiple of 4 (transformers' BitLinear needs it)"
        if p.weight_scale.numel() != 1:
            return f"{name} has per-row scales"
    norms = {(p.rms_norm is not None, None if p.rms_norm is None else p.rms_norm.variance_epsilon) for p in layers.values()}
    if len(norms) > 1:
        return "layers disagree on the input RMSNorm"
    # transformers swaps only nn.Linear; a layer that replaced e.g. GPT-2's Conv1D would not be rebuilt
    skeleton = _skeleton(model.config)
    for name in layers:
        try:
            if not isinstance(skeleton.get_submodule(name), nn.Linear):
                return f"{name} is not an nn.Linear in {type(skeleton).__name__}"
        except AttributeError:
            return f"{name} does not exist in a fresh {type(skeleton).__name__}"
    return None


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "i2",
    *,
    tokenizer: Any = None,
    linear_class: str = "bitlinear",
    max_shard_size: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Pack every bitllm layer of `model` in `format` and write a checkpoint directory atomically.

    Ternary W1.58A8 in I2 is written in transformers' BitNet layout (`linear_class` "bitlinear" stores
    weight_scale = 1/mean|W| and divides; "autobitlinear" stores mean|W| and multiplies); other
    combinations use bitllm's own quant_method. Returns the directory.
    """
    fmt = PackFormat(format)
    check_linear_class(linear_class)
    layers = _packed_layers(model, fmt)
    if not layers:
        raise BitLLMError(f"{type(model).__name__} has no bitllm layers: call bitllm.quantize_(model, config) first")
    methods = {p.method for p in layers.values()}
    if len(methods) != 1:
        raise BitLLMError(f"mixed quantization methods in one model are not supported: {sorted(m.value for m in methods)}")
    method = methods.pop()
    why_not_hf = _hf_compatible(model, layers, fmt)
    if why_not_hf and method is Method.TERNARY and fmt is PackFormat.I2:
        log.warning("writing bitllm's own quant_method; transformers alone cannot load this checkpoint: %s", why_not_hf)

    # non-quantized tensors: embeddings, norms, lm_head; tied duplicates are written once
    prefixes = tuple(n + "." for n in layers)
    tensors: dict[str, torch.Tensor] = {}
    seen = set()
    for k, v in model.state_dict().items():
        if k.startswith(prefixes):
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ident in seen:
            continue
        seen.add(ident)
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise BitLLMError(f"tensor {k!r} holds NaN/inf; refusing to save a broken model")
        tensors[k] = v.detach().contiguous()

    if why_not_hf is None:
        for name, p in layers.items():
            tensors[f"{name}.weight"] = pack_hf_bitnet(p.int_weight())
            gamma = p.weight_scale.float()
            ws = 1.0 / gamma if linear_class == "bitlinear" else gamma
            tensors[f"{name}.weight_scale"] = ws.to(model.dtype).reshape(1)
            if p.bias is not None:
                tensors[f"{name}.bias"] = p.bias.to(model.dtype)
            if p.rms_norm is not None:
                tensors[f"{name}.rms_norm.weight"] = p.rms_norm.weight.detach().to(model.dtype)
        first = next(iter(layers.values()))
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, BitLinear)]
        qconfig = {
            "quant_method": "bitnet",
            "linear_class": linear_class,
            "quantization_mode": "offline",
            "modules_to_not_convert": sorted(linear_names),
            "use_rms_norm": first.rms_norm is not None,
            "rms_norm_eps": 1e-6 if first.rms_norm is None else first.rms_norm.variance_epsilon,
        }
        fmt_name = HF_FORMAT
    else:
        for name, p in layers.items():
            for k, v in p.state_dict().items():
                tensors[f"{name}.{k}"] = v.detach().contiguous()
        qconfig = {
            "quant_method": QUANT_METHOD,
            "method": method.value,
            "format": fmt.value,
            "format_version": FORMAT_VERSION,
            "modules": sorted(layers),
        }
        cfg = getattr(model, "bitllm_config", None)
        if cfg is not None:
            qconfig["quant_config"] = cfg.to_dict()
        fmt_name = fmt.value
    metadata = {
        "format": "pt",
        "bitllm_format": fmt_name,
        "bitllm_format_version": str(FORMAT_VERSION),
        "bitllm_method": method.value,
    }

    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = qconfig
    _check_replaceable(Path(path))
    with atomic_directory(path) as tmp:
        write_checkpoint_tensors(tmp, tensors, metadata, max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def _check_replaceable(path: Path) -> None:
    """A save replaces the target directory whole, so it must be empty or a model checkpoint: `-o .` or
    `-o ~/models` must not delete unrelated files."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    if (path / "config.json").is_file() and any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        return
    raise BitLLMError(
        f"{path} exists and is not a model checkpoint (no config.json with model.safetensors); a save replaces the "
        "directory whole, so bitllm refuses. Choose a new directory or remove it first."
    )


# --- loading ---------------------------------------------------------------------------------------


def resolve_model_dir(path_or_id: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """A local directory as is; anything else goes through the Hugging Face hub's snapshot code path
    (which honours HF_HUB_OFFLINE and the local cache)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FormatError(f"{p} is a file, not a model directory (GGUF files go through `bitllm import`)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(
            repo_id=str(path_or_id), revision=revision, token=token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        ))
    except HFValidationError:
        raise BitLLMError(f"{str(path_or_id)!r} is neither an existing directory nor a valid hub id") from None
    except Exception as e:  # hub errors: offline, not found, gated, network
        raise BitLLMError(f"cannot get {str(path_or_id)!r} from the hub or its cache: {e}") from None


def _skeleton(config, where: object = None) -> nn.Module:
    """The model of `config` with parameters on the meta device (no memory, no random init). `where`
    (the config's file) goes into the errors."""
    from accelerate import init_empty_weights

    config = _strip_quant(config)
    name = f"{where}: " if where else ""
    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise UnsupportedModelError(f"{name}{type(config).__name__} ({config.model_type}) is not a causal LM transformers can build: {e}") from None
    except RuntimeError as e:
        # Each parameter is created on the CPU before it moves to the meta device: untouched pages for
        # real sizes, an allocation failure for absurd ones (a corrupt config).
        if "allocate" not in str(e):
            raise
        sizes = {k: getattr(config, k, None) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
        raise FormatError(f"{name}the config describes a model too large to build ({sizes}): {e}") from None


def _strip_quant(config):
    config = type(config).from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def _dims(module: nn.Module, name: str) -> tuple[int, int, bool]:
    """(out, in, has_bias) of the linear layer the checkpoint says was quantized."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, module.bias is not None
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0], module.bias is not None
    raise FormatError(f"config lists {name!r} as quantized, but it is a {type(module).__name__}, not a linear layer")


def _load_bitllm_layer(r: CheckpointReader, name: str, module: nn.Module, method: Method, fmt: PackFormat) -> PackedLinear:
    out_f, in_f, _ = _dims(module, name)
    w = r.get(f"{name}.weight", dtype=(torch.uint8,), shape=packed_shape(fmt, out_f, in_f))
    scale = r.get(f"{name}.weight_scale", dtype=FLOATS)
    if scale.dim() != 1 or scale.numel() not in (1, out_f):
        raise FormatError(f"{r.file_of(name + '.weight_scale')}: tensor {name + '.weight_scale'!r} has shape {tuple(scale.shape)}, expected (1,) or ({out_f},)")
    # ternary/binary scales are mean|W| (> 0 by construction); OneBit's h is learned and may take any sign
    if method is not Method.ONEBIT and not (scale.float() > 0).all():
        bad = scale.float()[~(scale.float() > 0)]
        raise FormatError(
            f"{r.file_of(name + '.weight_scale')}: tensor {name + '.weight_scale'!r} must hold positive numbers for "
            f"{method.value} (it is mean|W|), but {bad.numel()} value(s) are not, e.g. {bad[0].item()}"
        )
    has_bias = f"{name}.bias" in r
    norm_key = f"{name}.rms_norm.weight"
    layer = PackedLinear(in_f, out_f, has_bias, method, fmt, scale_numel=scale.numel(), input_norm=norm_key in r)
    state = {"weight": w, "weight_scale": scale.float()}
    if has_bias:
        state["bias"] = r.get(f"{name}.bias", dtype=FLOATS, shape=(out_f,)).float()
    if method is Method.ONEBIT:
        state["input_factor"] = r.get(f"{name}.input_factor", dtype=FLOATS, shape=(in_f,)).float()
    if norm_key in r:
        state["rms_norm.weight"] = r.get(norm_key, dtype=FLOATS, shape=(in_f,)).float()
    layer.load_state_dict(state, strict=True)
    layer.int_weight()  # validates every code now (FormatError on invalid bytes), not at first forward
    return layer


def _load_hf_bitnet_layer(r: CheckpointReader, name: str, module: nn.Module, qc: dict) -> PackedLinear:
    out_f, in_f, _ = _dims(module, name)
    linear_class = qc.get("linear_class", "bitlinear")
    mode = qc.get("quantization_mode", "offline")
    w = r.get(f"{name}.weight")
    bias = r.get(f"{name}.bias", dtype=FLOATS, shape=(out_f,)) if f"{name}.bias" in r else None
    norm = None
    if qc.get("use_rms_norm", False):
        norm = r.get(f"{name}.rms_norm.weight", dtype=FLOATS, shape=(in_f,))
    where = r.file_of(f"{name}.weight")
    if mode == "online":  # bf16/fp32 master weights: quantize now with the absmean rule
        if w.dtype not in FLOATS or tuple(w.shape) != (out_f, in_f):
            raise FormatError(f"{where}: tensor {name + '.weight'!r} should be float ({out_f}, {in_f}) in online mode, got {w.dtype} {tuple(w.shape)}")
        w_int, gamma = ternarize(w)
    else:
        ws = r.get(f"{name}.weight_scale", dtype=FLOATS)
        if ws.numel() != 1 or not (ws.float() > 0).all():
            raise FormatError(f"{where}: tensor {name + '.weight_scale'!r} must be one positive number, got {ws.tolist()}")
        if w.dtype == torch.uint8:
            if tuple(w.shape) != (hf_packed_rows(out_f), in_f):
                raise FormatError(f"{where}: tensor {name + '.weight'!r} has shape {tuple(w.shape)}, expected ({hf_packed_rows(out_f)}, {in_f}) for {out_f} outputs packed 4 per byte")
            w_int = unpack_hf_bitnet(w, out_f)
        elif w.dtype in FLOATS and tuple(w.shape) == (out_f, in_f) and linear_class == "autobitlinear":
            if not torch.isin(w.float(), torch.tensor([-1.0, 0.0, 1.0])).all():
                raise FormatError(f"{where}: tensor {name + '.weight'!r} is unpacked but not ternary")
            w_int = w.to(torch.int8)
        else:
            raise FormatError(f"{where}: tensor {name + '.weight'!r} has dtype {w.dtype} and shape {tuple(w.shape)}; expected packed uint8 ({hf_packed_rows(out_f)}, {in_f})")
        # scale conventions: bitlinear divides by weight_scale (= 1/mean|W|), autobitlinear multiplies
        gamma = 1.0 / ws.float() if linear_class == "bitlinear" else ws.float()
    return PackedLinear.from_int(
        w_int, gamma.reshape(1), Method.TERNARY, PackFormat.I2, bias, rms_norm_weight=norm,
        norm_eps=qc.get("rms_norm_eps") or 1e-6,
    )


def _bitnet_targets(model: nn.Module, qc: dict) -> list[str]:
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = qc.get("modules_to_not_convert")
    if skip is None:
        skip = get_keys_to_not_convert(model)
    skip = list(skip) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and should_convert_module(n, skip)]


def read_config(directory: Path):
    """(transformers config, quantization_config dict or None, raw config dict) of a model directory."""
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.exists():
        raise FormatError(f"{directory}: no config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("quantization_config", {}), (dict, type(None))):
        raise FormatError(f"{cfg_path}: expected a JSON object with an object (or no) quantization_config")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{cfg_path}: unsupported architecture {raw.get('model_type')!r} ({e})") from None
    return config, raw.get("quantization_config"), raw


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Load a bitllm or Hugging Face BitNet checkpoint as an HF model with bitllm PackedLinear layers.

    This is the reference path: PackedLinear's PyTorch computation (or its native kernels) inside
    the transformers model. A checkpoint without quantization_config loads as the plain HF model.
    """
    directory = resolve_model_dir(path_or_id, revision, token)
    cfg_path = directory / "config.json"
    config, qc, _ = read_config(directory)
    if qc is None:
        log.info("%s has no quantization_config: loading the full-precision model", directory)
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    qm = qc.get("quant_method")
    reader = CheckpointReader(directory)
    model = _skeleton(config, where=cfg_path)
    if qm == QUANT_METHOD:
        version = qc.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(f"{cfg_path}: bitllm format_version {version!r} is not supported (this bitllm reads {FORMAT_VERSION})")
        for f, meta in reader.all_metadata().items():
            if meta.get("bitllm_format_version") != str(FORMAT_VERSION) or meta.get("bitllm_format") != qc.get("format"):
                raise FormatError(f"{f}: metadata says format {meta.get('bitllm_format')!r} v{meta.get('bitllm_format_version')}, config.json says {qc.get('format')!r} v{FORMAT_VERSION}")
        try:
            method, fmt = Method(qc["method"]), PackFormat(qc["format"])
        except (KeyError, ValueError) as e:
            raise FormatError(f"{cfg_path}: bad bitllm quantization_config ({e})") from None
        targets = list(qc.get("modules") or [])
        load_layer = lambda n, m: _load_bitllm_layer(reader, n, m, method, fmt)  # noqa: E731
    elif qm == "bitnet":
        for key, allowed in (("linear_class", LINEAR_CLASSES), ("quantization_mode", ("offline", "online"))):
            if qc.get(key, allowed[0]) not in allowed:  # the scale convention depends on it: never guess
                raise FormatError(f"{cfg_path}: quantization_config {key} {qc[key]!r} is not one of {allowed}")
        targets = _bitnet_targets(model, qc)
        load_layer = lambda n, m: _load_hf_bitnet_layer(reader, n, m, qc)  # noqa: E731
    else:
        raise UnsupportedModelError(f"{cfg_path}: quant_method {qm!r} is not one bitllm reads ('bitllm', 'bitnet')")
    if not targets:
        raise FormatError(f"{cfg_path}: the quantization config names no quantized layer")

    for name in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{cfg_path}: quantized module {name!r} does not exist in {type(model).__name__}") from None
        model.set_submodule(name, load_layer(name, module))

    prefixes = tuple(n + "." for n in targets)
    expected = set(model.state_dict().keys())
    state = {}
    for k in reader.keys():
        if k not in expected:  # also a stray tensor inside a quantized layer (the layer loaders read only theirs)
            raise FormatError(f"{reader.file_of(k)}: unexpected tensor {k!r} for {type(model).__name__}")
        if k.startswith(prefixes):
            continue
        t = reader.get(k)
        state[k] = t.to(dtype) if t.is_floating_point() else t
    for k, v in model.state_dict().items():
        if k in state and not k.startswith(prefixes) and tuple(v.shape) != tuple(state[k].shape):
            raise FormatError(f"{reader.file_of(k)}: tensor {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise FormatError(f"{directory}: tensors missing from the checkpoint: {missing[:5]}")
    model.bitllm_source = {"path": str(directory), "quantization_config": qc}
    for m in model.modules():  # the kernels' own layout now, not at the first forward (torch.compile needs it)
        if isinstance(m, PackedLinear):
            m.prepare()
    return model.eval()
