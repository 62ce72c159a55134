"""GGUF interop: export ternary models as TQ2_0 / TQ1_0 / F16 files that llama.cpp runs, and import
them back as bitllm checkpoints. Byte layouts: docs/formats.md, "GGUF".

llama.cpp's ternary types hold 256-weight blocks with an fp16 block scale `d`. bitllm writes the
ternary codes themselves (d = 1 for a block with any nonzero weight, 0 for an all-zero block, which
is exactly what llama.cpp's own quantizer does with such data) and puts the per-tensor scale
mean|W| in the optional `blk.N.<proj>.scale` tensor that llama.cpp multiplies after the matmul, so
no scale is ever rounded to fp16 and export -> import is exact.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitllm.errors import BitLLMError, FormatError, UnsupportedModelError
from bitllm.formats.atomic import fsync_path
from bitllm.formats.packing import PackFormat
from bitllm.quant.config import Method

log = logging.getLogger(__name__)

QK_K = 256  # weights per TQ block
TQ2_0_BYTES = 66  # 64 bytes of 2-bit codes + fp16 d: 2.0625 bits per weight
TQ1_0_BYTES = 54  # 48 bytes of 5-trit groups + 4 bytes of 4-trit groups + fp16 d: 1.6875 bpw
QTYPES = ("tq2_0", "tq1_0", "f16")
FLOAT_TYPES = ("f16", "f32", "q8_0")

# llama.cpp names of the projections, per HF module suffix
_PROJ = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}
# llama-3's pre-tokenizer regex, as tokenizer.json stores it
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# --- TQ2_0 / TQ1_0 blocks (bitllm's own packers, checked against the gguf package in tests) ----------


def _blocks(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=np.int8).reshape(-1)
    if t.size % QK_K:
        raise FormatError(f"TQ blocks hold {QK_K} weights; got {t.size} values")
    return t.reshape(-1, QK_K)  # (nblocks, 256)


def block_absmax(t: np.ndarray) -> np.ndarray:
    """d per block for ternary codes: 1.0 if the block holds a nonzero, else 0.0 (fp16)."""
    return np.abs(_blocks(t)).max(axis=1).astype(np.float16)


def pack_tq2_0(t: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
    """Ternary values (multiple of 256, row-major) -> TQ2_0 bytes (nblocks * 66).

    Per 128-weight half: byte m holds weights m + 32n at bits 2n..2n+1 (n = 0..3) as code w+1,
    first group in the low bits; then the fp16 d.
    """
    b = _blocks(t)
    d = block_absmax(t) if d is None else np.asarray(d, dtype=np.float16).reshape(-1)
    codes = (b + 1).astype(np.uint8).reshape(-1, 2, 4, 32)  # (block, half, n, m)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qs = np.bitwise_or.reduce(codes << shifts, axis=2).reshape(-1, 64)  # (block, 64)
    return np.concatenate([qs, d.view(np.uint8).reshape(-1, 2)], axis=1).reshape(-1)


def unpack_tq2_0(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ2_0 bytes -> (codes-1 in {-1,0,1} as int8 (n,), d per block fp16). Code 3 is invalid."""
    blk = _raw_blocks(raw, n, TQ2_0_BYTES)
    qs = blk[:, :64].reshape(-1, 2, 1, 32)
    codes = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3  # (block, half, n, m)
    if (codes == 3).any():
        raise FormatError("TQ2_0: found invalid 2-bit code 3")
    d = blk[:, 64:66].copy().view(np.float16).reshape(-1)
    return (codes.reshape(-1).astype(np.int8) - 1), d


_POW5 = np.array([81, 27, 9, 3, 1], dtype=np.int32)


def pack_tq1_0(t: np.ndarray, d: np.ndarray | None = None) -> np.ndarray:
    """Ternary values -> TQ1_0 bytes (nblocks * 54).

    Weights 0..159: byte m (of 32) holds m + 32n, n = 0..4; 160..239: byte m (of 16) holds
    160 + m + 16n; 240..255: byte j (of 4) holds 240 + j + 4n, n = 0..3, with a zero fifth trit.
    The first weight is the most significant trit; a byte stores ceil(v * 256 / 243).
    """
    b = _blocks(t).astype(np.int32) + 1  # trits 0..2, (block, 256)
    d = block_absmax(t) if d is None else np.asarray(d, dtype=np.float16).reshape(-1)
    v0 = (b[:, :160].reshape(-1, 5, 32) * _POW5.reshape(1, 5, 1)).sum(1)  # (block, 32)
    v1 = (b[:, 160:240].reshape(-1, 5, 16) * _POW5.reshape(1, 5, 1)).sum(1)  # (block, 16)
    v2 = (b[:, 240:].reshape(-1, 4, 4) * _POW5[:4].reshape(1, 4, 1)).sum(1)  # (block, 4)
    v = np.concatenate([v0, v1, v2], axis=1)  # (block, 52), each < 243
    q = ((v * 256 + 242) // 243).astype(np.uint8)  # fixed point: digits come out by multiplying
    return np.concatenate([q, d.view(np.uint8).reshape(-1, 2)], axis=1).reshape(-1)


def unpack_tq1_0(raw: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 bytes -> (ternary int8 (n,), d per block fp16)."""
    blk = _raw_blocks(raw, n, TQ1_0_BYTES)
    q = blk[:, :52].astype(np.uint32)

    def digits(x: np.ndarray, k: int) -> np.ndarray:  # (block, bytes) -> (block, k, bytes)
        pw = np.array([1, 3, 9, 27, 81][:k], dtype=np.uint32).reshape(1, k, 1)
        return (((x[:, None, :] * pw) & 0xFF) * 3) >> 8

    parts = [digits(q[:, :32], 5).reshape(-1, 160), digits(q[:, 32:48], 5).reshape(-1, 80),
             digits(q[:, 48:52], 4).reshape(-1, 16)]
    trits = np.concatenate(parts, axis=1)
    if (trits > 2).any():
        raise FormatError("TQ1_0: found an invalid base-3 digit")
    d = blk[:, 52:54].copy().view(np.float16).reshape(-1)
    return trits.reshape(-1).astype(np.int8) - 1, d


def _raw_blocks(raw: np.ndarray, n: int, block_bytes: int) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if n % QK_K or raw.size != n // QK_K * block_bytes:
        raise FormatError(f"expected {n // QK_K} blocks of {block_bytes} bytes for {n} weights, got {raw.size} bytes")
    return raw.reshape(-1, block_bytes)


# --- export --------------------------------------------------------------------------------------


@dataclass
class _Arch:
    name: str  # llama.cpp architecture
    permute_qk: bool  # llama.cpp's llama uses interleaved RoPE pairs: HF's q/k rows are permuted


def _arch_of(model: nn.Module) -> _Arch:
    cfg = model.config
    cls = type(model).__name__
    if cls == "LlamaForCausalLM":
        arch = _Arch("llama", True)
    elif cls == "BitNetForCausalLM":
        act = getattr(cfg, "hidden_act", None)
        if act != "silu":
            raise UnsupportedModelError(
                f"this BitNet model's FFN uses {act!r} (ReLU² is BitNetConfig's default), but llama.cpp's 'bitnet' "
                "architecture hard-codes a SiLU-gated FFN: the file would load and run wrong, so bitllm refuses. "
                "Train or convert with hidden_act='silu', or use the 'llama' layout."
            )
        if not getattr(cfg, "tie_word_embeddings", False):
            raise UnsupportedModelError(
                "llama.cpp's 'bitnet' architecture always uses the token embedding as the LM head; this model's head "
                "is untied, so it cannot be expressed. Use the 'llama' layout (with sub-norms removed) instead."
            )
        if cfg.num_attention_heads * _head_dim(cfg) != cfg.hidden_size:
            raise UnsupportedModelError("llama.cpp's 'bitnet' architecture needs num_attention_heads * head_dim == hidden_size")
        arch = _Arch("bitnet", False)
    else:
        raise UnsupportedModelError(
            f"{cls} has no llama.cpp ternary equivalent bitllm can export; supported: LlamaForCausalLM, "
            "BitNetForCausalLM (SiLU-gated FFN)"
        )
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise UnsupportedModelError(f"RoPE scaling {rope.get('rope_type')!r} is not exported; only plain RoPE")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UnsupportedModelError("linear biases are not exported to GGUF ternary files")
    return arch


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs, per head: (h, 2, d/2) -> (h, d/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """GGUF tokenizer fields for a byte-level BPE tokenizer, with the pre-tokenizer named."""
    if tokenizer is None:
        raise UnsupportedModelError("the model directory has no tokenizer; llama.cpp needs one in the GGUF file")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; cannot export it")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model.get('type')!r} is not exported (byte-level BPE only)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED for padding rows of the embedding
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 3 if i in special else 1  # CONTROL, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"pre": pre, "tokens": tokens, "types": types, "merges": merges}
    for name in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            meta[name] = int(tid)
    meta["add_bos"], meta["add_eos"] = _added_specials(backend, meta.get("bos"), meta.get("eos"))
    meta["chat_template"] = getattr(tokenizer, "chat_template", None)
    return meta


def _added_specials(backend, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) as the tokenizer's post-processor really does it. Llama 3's tokenizer.json
    adds BOS through its template while transformers' `add_bos_token` attribute says False."""
    enc = backend.encode("a")  # add_special_tokens=True; "a" itself holds no special token
    ids, added = enc.ids, enc.special_tokens_mask
    if 0 not in added:
        raise UnsupportedModelError("cannot tell which special tokens this tokenizer adds: 'a' encodes to special tokens only")
    first = added.index(0)  # the text's first token: everything before it was added in front
    last = len(added) - 1 - added[::-1].index(0)
    return bos is not None and bos in ids[:first], eos is not None and eos in ids[last + 1:]


def _pre_tokenizer_name(pre: dict | None) -> str:
    """The llama.cpp name of a byte-level pre-tokenizer, or UnsupportedModelError (never a guess:
    a wrong or missing pre-tokenizer is how bitnet.cpp's converter produced garbage output)."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split"
                and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
            return "llama3"
    raise UnsupportedModelError(
        f"cannot name this tokenizer's pre-tokenizer for llama.cpp ({json.dumps(pre)[:200]}); "
        "supported: GPT-2 byte-level, llama-3"
    )


def _float_tensor(arr: np.ndarray, kind: str) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for a float tensor in `kind` = f32 | f16 | q8_0."""
    import gguf

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if kind == "f32":
        return arr, None
    if kind == "f16":
        return arr.astype(np.float16), None
    if kind == "q8_0":
        if arr.shape[-1] % 32:
            raise FormatError(f"q8_0 needs rows that are a multiple of 32, got {arr.shape[-1]}")
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    raise FormatError(f"unknown float type {kind!r}; expected one of {FLOAT_TYPES}")


def export_gguf(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    qtype: str = "tq2_0",
    *,
    embed_type: str = "f16",
    head_type: str | None = None,
) -> Path:
    """Write a bitllm ternary checkpoint as a GGUF file llama.cpp runs (atomically).

    qtype: tq2_0 (2.06 bpw), tq1_0 (1.69 bpw) or f16 (the ternary codes in f16, a reference file for
    llama.cpp's own quantizer). embed_type / head_type: f16 | f32 | q8_0 for the token embedding and
    the LM head (head defaults to embed_type).
    """
    import gguf
    from transformers import AutoTokenizer

    from bitllm.formats.checkpoint import from_pretrained, resolve_model_dir
    from bitllm.nn.packed import PackedLinear

    qtype = qtype.lower()
    head_type = head_type or embed_type
    for what, value, allowed in (("GGUF type", qtype, QTYPES), ("embedding type", embed_type, FLOAT_TYPES),
                                 ("head type", head_type, FLOAT_TYPES)):
        if value not in allowed:  # checked before the model is loaded (FormatError is also a ValueError)
            raise FormatError(f"unknown {what} {value!r}; expected one of {allowed}")
    if Path(output).is_dir():
        raise BitLLMError(f"{output} is a directory; give the .gguf file to write")
    directory = resolve_model_dir(model_path)
    # what the file says it came from: the hub id, or only the local directory's name (a full path
    # would publish the exporter's filesystem layout in a file meant to be shared)
    local = Path(model_path).expanduser()
    source = local.resolve().name if local.is_dir() else str(model_path)
    model = from_pretrained(directory)
    arch = _arch_of(model)
    cfg = model.config
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    tok = _tokenizer_metadata(tokenizer, cfg.vocab_size)

    # every projection must be a ternary PackedLinear with a per-tensor scale and no extra norm
    layers: dict[str, PackedLinear] = {}
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            if m.method not in (Method.TERNARY, Method.TERNARY_WO):
                raise UnsupportedModelError(f"{name} is {m.method.value}; GGUF TQ types hold ternary weights only")
            if m.rms_norm is not None:
                raise UnsupportedModelError(f"{name} has an input RMSNorm inside the layer, which llama.cpp's {arch.name} graph lacks")
            if m.weight_scale.numel() != 1:
                raise UnsupportedModelError(f"{name} has per-row scales; llama.cpp reads one scale per tensor")
            if m.bias is not None:
                raise UnsupportedModelError(f"{name} has a bias; not exported")
            if qtype != "f16" and m.in_features % QK_K:
                raise UnsupportedModelError(
                    f"{name}: rows of {m.in_features} weights are not a multiple of {QK_K}, the {qtype.upper()} block "
                    f"size; llama.cpp cannot hold this tensor in {qtype.upper()} (bitllm never falls back to another type). "
                    "Use a 256-aligned shape or --gguf f16."
                )
            layers[name] = m
    if not layers:
        raise UnsupportedModelError(f"{directory} holds no ternary bitllm layers")
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = _head_dim(cfg)

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    try:
        writer.add_name(source.rsplit("/", 1)[-1])  # not the snapshot hash of a hub download
        writer.add_context_length(int(cfg.max_position_embeddings))
        writer.add_embedding_length(int(cfg.hidden_size))
        writer.add_block_count(int(cfg.num_hidden_layers))
        writer.add_feed_forward_length(int(cfg.intermediate_size))
        writer.add_head_count(int(n_head))
        writer.add_head_count_kv(int(n_kv))
        writer.add_key_length(int(hd))
        writer.add_value_length(int(hd))
        writer.add_rope_dimension_count(int(hd))
        writer.add_rope_freq_base(_rope_theta(cfg))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(len(tok["tokens"]))
        writer.add_file_type({"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                              "f16": gguf.LlamaFileType.MOSTLY_F16}[qtype])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        for key, fn in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                        ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
            if key in tok:
                fn(tok[key])
        writer.add_add_bos_token(tok["add_bos"])
        writer.add_add_eos_token(tok["add_eos"])
        if tok["chat_template"]:
            writer.add_chat_template(tok["chat_template"])
        writer.add_string("bitllm.source", source)
        writer.add_uint32("bitllm.format_version", 1)

        emb = model.get_input_embeddings().weight.detach().float().numpy()
        emb = np.pad(emb, ((0, len(tok["tokens"]) - emb.shape[0]), (0, 0)))  # vocab rows for padded tokens
        data, raw = _float_tensor(emb, embed_type)
        writer.add_tensor("token_embd.weight", data, raw_dtype=raw)
        writer.add_tensor("output_norm.weight", model.model.norm.weight.detach().float().numpy())
        if arch.name == "llama" and not getattr(cfg, "tie_word_embeddings", False):
            head = model.lm_head.weight.detach().float().numpy()
            head = np.pad(head, ((0, len(tok["tokens"]) - head.shape[0]), (0, 0)))
            data, raw = _float_tensor(head, head_type)
            writer.add_tensor("output.weight", data, raw_dtype=raw)
        for i, block in enumerate(model.model.layers):
            for hf_name, gg in _NORMS.items():
                try:
                    norm = block.get_submodule(hf_name)
                except AttributeError:
                    continue
                writer.add_tensor(f"blk.{i}.{gg}.weight", norm.weight.detach().float().numpy())
            for hf_name, gg in _PROJ.items():
                full = f"model.layers.{i}.{hf_name}"
                if full not in layers:
                    raise UnsupportedModelError(f"{full} is not a ternary bitllm layer; every projection must be")
                m = layers[full]
                t = m.int_weight().numpy()  # (out, in) int8
                if arch.permute_qk and hf_name.endswith(("q_proj", "k_proj")):
                    t = _permute_rows(t, n_head if hf_name.endswith("q_proj") else n_kv)
                if qtype == "tq2_0":
                    data, raw = pack_tq2_0(t).reshape(t.shape[0], -1), gguf.GGMLQuantizationType.TQ2_0
                elif qtype == "tq1_0":
                    data, raw = pack_tq1_0(t).reshape(t.shape[0], -1), gguf.GGMLQuantizationType.TQ1_0
                else:
                    data, raw = t.astype(np.float16), None
                writer.add_tensor(f"blk.{i}.{gg}.weight", data, raw_dtype=raw)
                writer.add_tensor(f"blk.{i}.{gg}.scale", m.weight_scale.detach().float().numpy().reshape(1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        fsync_path(tmp)
        os.replace(tmp, output)
        fsync_path(output.parent)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return output


# --- import --------------------------------------------------------------------------------------


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:  # e.g. a string that is not UTF-8
        raise FormatError(f"{getattr(reader.data, 'filename', 'GGUF file')}: metadata {key} cannot be read ({e})") from None


# llama.cpp's names (src/llama-vocab.cpp) for the two byte-level pre-tokenizers bitllm rebuilds
_PRE_GPT2 = ("gpt-2",)
_PRE_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")


def import_gguf(path: str | os.PathLike, output: str | os.PathLike, format: str = "i2") -> Path:
    """Read a llama/bitnet GGUF file with ternary weights (TQ1_0, TQ2_0, or F16/F32 holding ternary
    values) and write a bitllm checkpoint. Exact for ternary data."""
    import gguf
    from transformers import BitNetConfig, LlamaConfig

    from bitllm.formats.checkpoint import _skeleton, save_pretrained
    from bitllm.nn.packed import PackedLinear

    PackFormat(format)  # an unknown format fails before the file is read
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError on bad bytes
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "bitnet"):
        raise UnsupportedModelError(f"{path}: architecture {arch!r} is not imported (llama, bitnet)")
    tensors = {t.name: t for t in reader.tensors}

    def need(key, default=None, kind=int):
        """A positive int (or float) metadata value; FormatError if missing (without a default) or malformed."""
        v = _field(reader, f"{arch}.{key}", default)
        if v is None:
            raise FormatError(f"{path}: metadata {arch}.{key} is missing")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0 or (kind is int and v != int(v)):
            raise FormatError(f"{path}: metadata {arch}.{key} = {v!r} is not a positive {'integer' if kind is int else 'number'}")
        return kind(v)

    hidden, n_layer, n_head = need("embedding_length"), need("block_count"), need("attention.head_count")
    n_kv = need("attention.head_count_kv", n_head)
    ffn = need("feed_forward_length")
    # llama.cpp's head size is attention.key_length (default hidden / heads); rope.dimension_count is
    # the number of rotated dims, which may be smaller (partial rotary), and defaults to the head size
    head_dim = need("attention.key_length", hidden // n_head)
    for key in ("attention.value_length", "rope.dimension_count"):
        if (dims := need(key, head_dim)) != head_dim:
            raise UnsupportedModelError(
                f"{path}: metadata {arch}.{key} = {dims} differs from the head size {head_dim}; "
                + ("partial rotary embeddings are not imported" if key.startswith("rope") else
                   "value heads of another size than key heads are not imported")
            )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if "token_embd.weight" not in tensors:
        raise FormatError(f"{path}: tensor 'token_embd.weight' is missing")
    if f"blk.{n_layer - 1}.attn_norm.weight" not in tensors:  # checked before building n_layer empty layers
        raise FormatError(f"{path}: metadata {arch}.block_count = {n_layer}, but tensor 'blk.{n_layer - 1}.attn_norm.weight' is missing")
    if arch == "bitnet" and "output.weight" in tensors:  # never tie silently: the head would be dropped
        raise UnsupportedModelError(
            f"{path}: tensor 'output.weight' (an untied LM head) is not part of llama.cpp's 'bitnet' architecture, "
            "which uses token_embd as the head; bitllm does not import it. Export such a model with the 'llama' layout."
        )
    used: set[str] = set()

    def tensor(name: str, shape: tuple[int, ...]):
        """The reader tensor `name`, checked to have the (row-major) shape; GGUF lists dims fastest first."""
        if name not in tensors:
            raise FormatError(f"{path}: tensor {name!r} is missing")
        t = tensors[name]
        found = tuple(int(x) for x in reversed(list(t.shape)))
        if found != tuple(shape):
            raise FormatError(f"{path}: tensor {name!r} has shape {found}, expected {tuple(shape)}")
        used.add(name)
        return t

    vocab = int(tensors["token_embd.weight"].shape[-1])
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
        max_position_embeddings=need("context_length", 2048),
        rms_norm_eps=need("attention.layer_norm_rms_epsilon", kind=float),
        rope_parameters={"rope_type": "default", "rope_theta": need("rope.freq_base", 10000.0, float)},
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    try:
        if arch == "llama":
            config = LlamaConfig(tie_word_embeddings="output.weight" not in tensors, **common)
            config.architectures = ["LlamaForCausalLM"]
        else:
            config = BitNetConfig(hidden_act="silu", tie_word_embeddings=True, **common)
            config.architectures = ["BitNetForCausalLM"]
    except (ValueError, TypeError) as e:  # transformers validates e.g. hidden_size % num_attention_heads
        raise FormatError(f"{path}: the {arch}.* metadata does not describe a valid model ({e})") from None
    # The metadata's sizes must be those of the tensors before a model of that size is built: a corrupt
    # embedding_length or feed_forward_length would otherwise allocate tens of GB for the skeleton.
    for name, shape in (("token_embd.weight", (vocab, hidden)), ("blk.0.attn_q.weight", (n_head * head_dim, hidden)),
                        ("blk.0.attn_k.weight", (n_kv * head_dim, hidden)), ("blk.0.ffn_up.weight", (ffn, hidden))):
        tensor(name, shape)
    model = _skeleton(config)

    def dense(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensor(name, shape)
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except (NotImplementedError, ValueError) as e:
            raise UnsupportedModelError(f"{path}: tensor {name!r} of type {t.tensor_type.name} cannot be read ({e})") from None
        if not np.isfinite(arr).all():
            raise FormatError(f"{path}: tensor {name!r} holds NaN/inf")
        return torch.from_numpy(np.array(arr, dtype=np.float32))

    def ternary(name: str, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = tensor(name, (out_f, in_f))
        kind = t.tensor_type
        n = out_f * in_f
        if kind in (gguf.GGMLQuantizationType.TQ2_0, gguf.GGMLQuantizationType.TQ1_0):
            unpack = unpack_tq2_0 if kind == gguf.GGMLQuantizationType.TQ2_0 else unpack_tq1_0
            codes, d = unpack(t.data, n)
            codes.reshape(-1, QK_K)[d == 0] = 0  # a block with d = 0 is all zeros whatever its codes (as llama.cpp reads it)
        elif kind in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            vals = np.asarray(t.data, dtype=np.float32).reshape(-1)
            mag = np.unique(np.abs(vals[vals != 0]))
            if mag.size > 1:
                raise UnsupportedModelError(f"{path}: tensor {name!r} is not ternary (it holds {mag.size} distinct magnitudes)")
            codes = np.sign(vals).astype(np.int8)
            d = np.array([mag[0] if mag.size else 1.0], dtype=np.float32)
        else:
            raise UnsupportedModelError(f"{path}: tensor {name!r} has type {kind.name}; ternary imports read TQ1_0, TQ2_0, F16, F32")
        live = np.unique(np.asarray(d, dtype=np.float32)[np.asarray(d) != 0])
        if live.size > 1:
            raise UnsupportedModelError(
                f"{path}: tensor {name!r} has {live.size} different block scales; a ternary model has one scale per tensor"
            )
        gamma = float(live[0]) if live.size else 1.0
        scale_name = name.replace(".weight", ".scale")
        if scale_name in tensors:
            gamma *= float(dense(scale_name, (1,))[0])
        if not np.isfinite(gamma) or gamma <= 0:
            raise FormatError(f"{path}: tensor {name!r} has a non-positive or non-finite scale {gamma}")
        w = codes.reshape(out_f, in_f)
        return torch.from_numpy(np.ascontiguousarray(w)), torch.tensor([gamma], dtype=torch.float32)

    state: dict[str, torch.Tensor] = {}
    state["model.embed_tokens.weight"] = dense("token_embd.weight", (vocab, hidden))
    state["model.norm.weight"] = dense("output_norm.weight", (hidden,))
    if "output.weight" in tensors:
        state["lm_head.weight"] = dense("output.weight", (vocab, hidden))
    for i in range(n_layer):
        block = model.model.layers[i]
        for hf_name, gg in _NORMS.items():
            try:
                norm = block.get_submodule(hf_name)
            except AttributeError:
                continue
            state[f"model.layers.{i}.{hf_name}.weight"] = dense(f"blk.{i}.{gg}.weight", tuple(norm.weight.shape))
        for hf_name, gg in _PROJ.items():
            lin = block.get_submodule(hf_name)
            w, gamma = ternary(f"blk.{i}.{gg}.weight", lin.out_features, lin.in_features)
            if arch == "llama" and hf_name.endswith(("q_proj", "k_proj")):
                w = torch.from_numpy(np.ascontiguousarray(
                    _unpermute_rows(w.numpy(), n_head if hf_name.endswith("q_proj") else n_kv)))
            model.set_submodule(f"model.layers.{i}.{hf_name}", PackedLinear.from_int(w, gamma, Method.TERNARY, "i2"))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise FormatError(f"{path}: tensors missing for {missing[:5]}")
    unused = sorted(set(tensors) - used)
    if unused:  # e.g. rope_freqs.weight (RoPE scaling): dropping it would change the model
        raise UnsupportedModelError(f"{path}: tensors bitllm does not import for {arch!r}: {unused[:5]}")
    tokenizer = _tokenizer_from_gguf(reader, tokens, path) if tokens else None
    return save_pretrained(model, output, format, tokenizer=tokenizer)


def _tokenizer_from_gguf(reader, tokens: list[str], path: Path | None = None):
    """A PreTrainedTokenizerFast rebuilt from GGUF byte-level BPE metadata (gpt-2 / llama3 pre)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        log.warning("GGUF tokenizer model %r is not rebuilt; the checkpoint has no tokenizer", _field(reader, "tokenizer.ggml.model"))
        return None
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in _PRE_GPT2 + _PRE_LLAMA3:  # never guess: a wrong pre-tokenizer silently changes every token id
        log.warning("GGUF pre-tokenizer %r is not rebuilt (known: %s); the checkpoint has no tokenizer", pre,
                    ", ".join(_PRE_GPT2 + _PRE_LLAMA3))
        return None
    raw_merges = _field(reader, "tokenizer.ggml.merges") or []
    merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    bad = next((m for m in raw_merges if len(m.split(" ", 1)) != 2), None)
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if bad is not None or len(types) != len(tokens):
        why = f"merge {bad!r} is not two tokens" if bad is not None else f"{len(types)} token types for {len(tokens)} tokens"
        raise FormatError(f"{path}: tokenizer metadata is inconsistent ({why})")
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != 5}
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _PRE_LLAMA3))
    except Exception as e:  # tokenizers raises a bare Exception for e.g. a merge of unknown tokens
        raise FormatError(f"{path}: tokenizer metadata cannot be rebuilt as a BPE tokenizer ({e})") from None
    if pre in _PRE_LLAMA3:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, ty in enumerate(types) if ty == 3]
    kwargs = {}
    for name in ("bos", "eos", "pad", "unk"):
        tid = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if tid is not None and tid < len(tokens):
            kwargs[f"{name}_token"] = tokens[tid]
    # llama.cpp adds BOS/EOS per these keys; without add_bos_token it adds BOS for the llama-3 group only
    adds = {}
    for name, default in (("bos", pre in _PRE_LLAMA3), ("eos", False)):
        add = _field(reader, f"tokenizer.ggml.add_{name}_token", default)
        if not isinstance(add, bool):
            raise FormatError(f"{path}: metadata tokenizer.ggml.add_{name}_token = {add!r} is not a boolean")
        if add and f"{name}_token" not in kwargs:
            log.warning("%s: the GGUF adds a %s token but names none; the rebuilt tokenizer adds none", path, name)
            add = False
        adds[f"add_{name}_token"] = add  # transformers turns these into the post-processor's template
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs, **adds)
    fast.add_special_tokens({"additional_special_tokens": [s for s in special if s not in kwargs.values()]})
    template = _field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


# --- transformers' GGUF loader -------------------------------------------------------------------


def transformers_gguf_problem(path: str | os.PathLike) -> str | None:
    """Why transformers' `from_pretrained(dir, gguf_file=name)` cannot load this file as the model it holds, or None.

    transformers (5.x, `modeling_gguf_pytorch_utils.load_gguf_checkpoint`) maps each GGUF tensor onto a parameter
    of the HF model by name and skips every tensor without one. llama.cpp's per-tensor scales
    `blk.N.<proj>.scale` (shape {1}), which bitllm's export writes, have no such parameter in an HF model, so
    the projections would load unscaled (for attn_q/attn_k its q/k un-permutation first fails on the 1-element
    tensor: "cannot reshape array of size 1"). Its GGUF architectures also lack `bitnet`. A file the `gguf`
    package cannot parse is left to transformers' own error (it parses with the same reader).
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = _field(reader, "general.architecture")
        scaled = [t.name for t in reader.tensors if t.name.endswith(".scale")]
    except Exception:  # the reader raises ValueError/struct.error/IndexError on bad bytes
        return None
    if scaled:
        return (f"it holds {len(scaled)} per-tensor weight scales ({scaled[0]}, ...: llama.cpp's convention for "
                "ternary weights, which bitllm exports), and transformers' GGUF loader has no place for them "
                "(it drops them, or fails on attn_q/attn_k)")
    if arch == "bitnet":
        return "transformers' GGUF loader has no 'bitnet' architecture"
    return None
