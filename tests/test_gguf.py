"""GGUF interop: TQ1_0/TQ2_0 byte layouts, exact round trips, refusals, and llama.cpp itself."""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitllm.errors import BitLLMError, FormatError, UnsupportedModelError
from bitllm.formats.checkpoint import from_pretrained, save_pretrained
from bitllm.formats.gguf_io import (
    export_gguf,
    import_gguf,
    pack_tq1_0,
    pack_tq2_0,
    unpack_tq1_0,
    unpack_tq2_0,
)
from bitllm.quant import config_for, quantize_
from bitllm.tiny import tiny_model, tiny_tokenizer
from fuzz_helpers import draw_damaged

gguf = pytest.importorskip("gguf")
QT = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}
PACK = {"tq2_0": (pack_tq2_0, unpack_tq2_0), "tq1_0": (pack_tq1_0, unpack_tq1_0)}
SHAPE = dict(hidden=256, layers=2, vocab_size=320, intermediate_size=512, embed_std=1.0)


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tq_bytes_agree_with_the_gguf_package(qtype, seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(-1, 2, (3, 768)).astype(np.int8)
    t[1, 256:512] = 0  # an all-zero block (d = 0)
    pack, unpack = PACK[qtype]
    ours = pack(t)
    assert np.array_equal(ours, gguf.quants.quantize(t.astype(np.float32), QT[qtype]).reshape(-1))
    assert np.array_equal(gguf.quants.dequantize(ours.reshape(3, -1), QT[qtype]), t.astype(np.float32))
    back, d = unpack(ours, t.size)
    assert np.array_equal(back.reshape(t.shape), t) and d.tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 1]


def test_tq_rejects_bad_sizes_and_codes():
    with pytest.raises(FormatError, match="256"):
        pack_tq2_0(np.zeros(100, dtype=np.int8))
    raw = pack_tq2_0(np.zeros(256, dtype=np.int8))
    raw[0] = 0xFF
    with pytest.raises(FormatError, match="code 3"):
        unpack_tq2_0(raw, 256)
    with pytest.raises(FormatError, match="blocks"):
        unpack_tq1_0(np.zeros(10, dtype=np.uint8), 256)


def _ternary_checkpoint(tmp_path, family="llama", name="ck", **kw):
    model = tiny_model(family, **{**SHAPE, **kw})
    quantize_(model, config_for("ternary"))
    save_pretrained(model, tmp_path / name, "i2", tokenizer=tiny_tokenizer())
    return tmp_path / name


@pytest.mark.parametrize("family,kw", [("llama", {}), ("bitnet", {"hidden_act": "silu"})])
@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0", "f16"])
def test_round_trip_is_exact(tmp_path, family, kw, qtype):
    ck = _ternary_checkpoint(tmp_path, family, **kw)
    f = export_gguf(ck, tmp_path / "m.gguf", qtype, embed_type="f32")
    import_gguf(f, tmp_path / "back")
    a, b = from_pretrained(ck), from_pretrained(tmp_path / "back")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("Shall I compare thee to a summer's day?").input_ids])
    assert torch.equal(a(ids).logits, b(ids).logits)
    # the tokenizer survives the trip
    from transformers import AutoTokenizer

    back_tok = AutoTokenizer.from_pretrained(tmp_path / "back")
    text = "The quick brown fox, 42!"
    assert back_tok(text).input_ids == tok(text).input_ids


def test_export_writes_what_llama_cpp_reads(tmp_path):
    ck = _ternary_checkpoint(tmp_path, "bitnet", hidden_act="silu")
    f = export_gguf(ck, tmp_path / "m.gguf", "tq1_0", embed_type="q8_0")
    r = gguf.GGUFReader(str(f))
    fields = {k: r.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.pre", "tokenizer.ggml.model")}
    assert fields == {"general.architecture": "bitnet", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.model": "gpt2"}
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "TQ1_0" and types["blk.0.ffn_down.scale"] == "F32"
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # bitnet: tied head


def test_refuses_relu2_bitnet(tmp_path):
    ck = _ternary_checkpoint(tmp_path, "bitnet")  # BitNetConfig's default FFN is ReLU²
    with pytest.raises(UnsupportedModelError, match="hard-codes a SiLU-gated FFN"):
        export_gguf(ck, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_rows_not_multiple_of_256(tmp_path):
    ck = _ternary_checkpoint(tmp_path, "llama", intermediate_size=320)
    with pytest.raises(UnsupportedModelError, match=r"mlp\.down_proj: rows of 320 weights are not a multiple of 256"):
        export_gguf(ck, tmp_path / "m.gguf", "tq2_0")
    export_gguf(ck, tmp_path / "m16.gguf", "f16")  # f16 has no block rule


def test_refuses_what_llama_cpp_cannot_express(tmp_path):
    model = tiny_model("llama", **SHAPE)
    quantize_(model, config_for("binary"))
    save_pretrained(model, tmp_path / "bin", "b1", tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match="ternary weights only"):
        export_gguf(tmp_path / "bin", tmp_path / "m.gguf")
    model = tiny_model("llama", **SHAPE)
    quantize_(model, config_for("ternary", input_norm=True))
    save_pretrained(model, tmp_path / "norm", "i2", tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match="input RMSNorm"):
        export_gguf(tmp_path / "norm", tmp_path / "m.gguf")
    model = tiny_model("phi", hidden=256, layers=1, vocab_size=320)
    quantize_(model, config_for("ternary"))
    save_pretrained(model, tmp_path / "phi", "i2", tokenizer=tiny_tokenizer())
    with pytest.raises(UnsupportedModelError, match="PhiForCausalLM"):
        export_gguf(tmp_path / "phi", tmp_path / "m.gguf")


def test_import_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(FormatError, match="not a readable GGUF"):
        import_gguf(bad, tmp_path / "out")
    ck = _ternary_checkpoint(tmp_path, "llama")
    f = export_gguf(ck, tmp_path / "m.gguf", "tq2_0")
    data = f.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="trunc.gguf"):
        import_gguf(tmp_path / "trunc.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- llama.cpp itself -------------------------------------------------------------------------------

CLEAR_GOAL = 0.9  # share of teacher-forced positions whose top-2 margin is clear of the difference
# llama.cpp quantizes activations per 256-block (Q8_K), bitllm per token (absmax int8): the two
# round differently, so logits differ by a few per cent of their spread, not bitwise.
LOGIT_BUDGET = 0.05  # max |llama.cpp - bitllm| / (max - min of bitllm's logits), per position
ENGINE_BUDGET = 0.01  # the same for bitllm's engine against its HF packed path (measured ~0.0015)


def _trained_checkpoint(tmp_path, family, **kw):
    """A tiny ternary model trained for a few dozen steps on a short text, so that its predictions
    are peaked the way a real model's are (random weights give near-ties that any two kernels break
    differently)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model(family, **{**SHAPE, **kw}).train()
    quantize_(model, config_for("ternary"))
    text = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
            "The quick brown fox jumps over the lazy dog. ") * 8
    ids = torch.tensor(tok(text).input_ids)
    windows = ids.unfold(0, 65, 16)  # (n, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = windows[torch.randint(0, windows.shape[0], (8,), generator=g), :-1]  # (8, 64)
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_pretrained(model, tmp_path / "trained", "i2", tokenizer=tok)
    return tmp_path / "trained", tok, text


def _assert_same_clear_top1(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same top-1 wherever `ref`'s top-2 margin exceeds twice the position's max |ours - ref| (a trained tiny
    model has near-ties, which either side may break), and most positions are that clear."""
    diff = (ours - ref).abs().amax(-1)  # (T,)
    top2 = ref.topk(2, -1).values  # (T, 2)
    clear = top2[:, 0] - top2[:, 1] > 2 * diff
    assert clear.float().mean() >= CLEAR_GOAL, clear.float().mean()
    assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("family,kw", [("llama", {}), ("bitnet", {"hidden_act": "silu"})])
def test_llama_cpp_runs_the_export_and_agrees(tmp_path, family, kw):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    ck, tok, text = _trained_checkpoint(tmp_path, family, **kw)
    ids = tok(text).input_ids[:64]
    model = from_pretrained(ck)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]  # (64, vocab), the HF path with PackedLinear
    from bitllm.engine import LLM

    engine = LLM(ck, backend="native")
    slot = engine.backend.open(len(ids))
    ours = torch.from_numpy(engine.backend.forward([slot], [ids], all_logits=True))  # (64, vocab), native engine
    engine.backend.close(slot)
    spread = (ours.amax(-1) - ours.amin(-1)).clamp(min=1e-6)
    # engine vs HF packed path: the same quantization, so only fp32 order and int8 rounding ties differ;
    # the top-1 must agree wherever the reference's top-2 margin is clear of that difference (a trained
    # tiny model can have near-ties, which either side may break)
    assert ((ours - reference).abs().amax(-1) / spread).max() <= ENGINE_BUDGET
    _assert_same_clear_top1(ours, reference)
    for qtype in ("tq2_0", "tq1_0"):
        f = export_gguf(ck, tmp_path / f"m-{qtype}.gguf", qtype, embed_type="f32")
        llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, n_threads=2, n_threads_batch=2, logits_all=True,
                              flash_attn=True, verbose=False)
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[:64], dtype=np.float32))  # (64, vocab)
        llm.close()
        agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
        err = ((theirs - ours).abs().amax(-1) / spread).max().item()
        print(f"llama.cpp {family} {qtype}: top-1 agreement {agree:.3f}, max logit error {err:.4f} of the spread")
        assert err <= LOGIT_BUDGET, qtype
        _assert_same_clear_top1(theirs, ours)


# --- import: unusual-but-valid and corrupt files -------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A llama TQ2_0 export of a tiny ternary checkpoint (shared: export takes a second)."""
    d = tmp_path_factory.mktemp("exported")
    ck = _ternary_checkpoint(d, "llama")
    return export_gguf(ck, d / "m.gguf", "tq2_0", embed_type="f32")


def _rewrite(src, dst, fields=None, tensors=None):
    """Copy a GGUF file with edits: fields {key: (value, GGUFValueType, sub type) or None to drop},
    tensors {name: (array, raw GGML type or None) or None to drop}; new names are appended."""
    fields, tensors = fields or {}, tensors or {}
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or (k in fields and fields[k] is None):
            continue
        vt = f.types[0]
        w.add_key_value(k, *(fields.get(k) or (f.contents(), vt, f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)))
    for k, v in fields.items():
        if k not in r.fields and v is not None:
            w.add_key_value(k, *v)
    for t in r.tensors:
        if t.name not in tensors:
            raw = None if t.tensor_type.name in ("F32", "F16") else t.tensor_type
            w.add_tensor(t.name, np.array(t.data), raw_dtype=raw)
    for name, v in tensors.items():
        if v is not None:
            w.add_tensor(name, v[0], raw_dtype=v[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return dst


def test_import_reads_zero_d_blocks_as_zeros(exported, tmp_path):
    """A block's weights are (code - 1) * d: with d = 0 they are zero whatever the codes, as llama.cpp reads them."""
    r = gguf.GGUFReader(str(exported))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_v.weight")  # (128, 256): one block per row
    data = bytearray(exported.read_bytes())
    data[t.data_offset + 64: t.data_offset + 66] = b"\x00\x00"  # row 0: d = 0, codes untouched
    (tmp_path / "z.gguf").write_bytes(bytes(data))
    expect = gguf.quants.dequantize(np.frombuffer(bytes(data[t.data_offset: t.data_offset + t.n_bytes]), np.uint8)
                                    .reshape(128, -1), t.tensor_type)  # what llama.cpp computes
    assert (expect[0] == 0).all() and (expect[1:] != 0).any()
    import_gguf(tmp_path / "z.gguf", tmp_path / "out")
    w = from_pretrained(tmp_path / "out").model.layers[0].self_attn.v_proj.int_weight()
    assert torch.equal(w, torch.from_numpy(expect).to(torch.int8))


@pytest.mark.parametrize("case,error,match", [
    ("string_int", FormatError, r"llama\.embedding_length = '256x' is not a positive integer"),
    ("zero_heads", FormatError, r"head_count = 0 is not a positive integer"),
    ("block_count", FormatError, r"block_count = 3, but tensor 'blk\.2\.attn_norm\.weight' is missing"),
    # sizes that disagree with the tensors are refused before a skeleton of that size (86 GB, 1 TB) is built
    ("huge_hidden", FormatError, r"'token_embd\.weight' has shape \(320, 256\), expected \(320, 67108864\)"),
    ("huge_ffn", FormatError, r"'blk\.0\.ffn_up\.weight' has shape \(\d+, 256\), expected \(1073741824, 256\)"),
    ("transposed", FormatError, r"'blk\.0\.attn_k\.weight' has shape \(256, 128\), expected \(128, 256\)"),
    ("norm_shape", FormatError, r"'output_norm\.weight' has shape \(128,\), expected \(256,\)"),
    ("scale_shape", FormatError, r"'blk\.0\.attn_q\.scale' has shape \(2,\), expected \(1,\)"),
    ("extra_tensor", UnsupportedModelError, r"does not import for 'llama': \['rope_freqs\.weight'\]"),
    ("bad_merge", FormatError, r"merge 'abc' is not two tokens"),
    ("short_types", FormatError, r"3 token types for 320 tokens"),
])
def test_import_rejects_malformed_metadata_and_tensors(exported, tmp_path, case, error, match):
    VT = gguf.GGUFValueType
    k = gguf.quants.dequantize(np.array(next(t for t in gguf.GGUFReader(str(exported)).tensors
                                              if t.name == "blk.0.attn_k.weight").data), QT["tq2_0"])  # (128, 256)
    edits = {
        "string_int": dict(fields={"llama.embedding_length": ("256x", VT.STRING, None)}),
        "zero_heads": dict(fields={"llama.attention.head_count": (0, VT.UINT32, None)}),
        "block_count": dict(fields={"llama.block_count": (3, VT.UINT32, None)}),
        "huge_hidden": dict(fields={"llama.embedding_length": (1 << 26, VT.UINT32, None)}),
        "huge_ffn": dict(fields={"llama.feed_forward_length": (1 << 30, VT.UINT32, None)}),
        "transposed": dict(tensors={"blk.0.attn_k.weight": (np.ascontiguousarray(k.reshape(256, 128)), None)}),
        "norm_shape": dict(tensors={"output_norm.weight": (np.ones(128, np.float32), None)}),
        "scale_shape": dict(tensors={"blk.0.attn_q.scale": (np.ones(2, np.float32), None)}),
        "extra_tensor": dict(tensors={"rope_freqs.weight": (np.ones(4, np.float32), None)}),
        "bad_merge": dict(fields={"tokenizer.ggml.merges": (["a b", "abc"], VT.ARRAY, VT.STRING)}),
        "short_types": dict(fields={"tokenizer.ggml.token_type": ([1, 1, 1], VT.ARRAY, VT.INT32)}),
    }[case]
    f = _rewrite(exported, tmp_path / f"{case}.gguf", **edits)
    with pytest.raises(error, match=match) as e:
        import_gguf(f, tmp_path / "out")
    assert f"{case}.gguf" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_import_rejects_a_string_that_is_not_utf8(exported, tmp_path):
    data = exported.read_bytes()
    at = data.index(b"gpt-2")  # the value of tokenizer.ggml.pre
    bad = tmp_path / "u.gguf"
    bad.write_bytes(data[:at] + b"\xc3\x28" + data[at + 2:])
    with pytest.raises(FormatError, match=r"u\.gguf: metadata tokenizer\.ggml\.\w+ cannot be read"):
        import_gguf(bad, tmp_path / "out")


@pytest.mark.parametrize("pre,rebuilt", [("llama-bpe", "llama3"), ("falcon3", "llama3"), ("gpt-2", "gpt-2"),
                                         ("qwen2", None)])
def test_import_names_pre_tokenizers_as_llama_cpp_does(exported, tmp_path, pre, rebuilt):
    """llama.cpp's convert writes 'llama-bpe' (Llama 3) and 'falcon3' for the llama-3 regex; an unknown name
    is not guessed (no tokenizer is written) rather than read as GPT-2's."""
    f = _rewrite(exported, tmp_path / "p.gguf", fields={"tokenizer.ggml.pre": (pre, gguf.GGUFValueType.STRING, None)})
    import_gguf(f, tmp_path / "out")
    tok = tmp_path / "out" / "tokenizer.json"
    if rebuilt is None:
        assert not tok.exists()
        return
    spec = json.loads(tok.read_text())["pre_tokenizer"]
    assert spec["type"] == ("Sequence" if rebuilt == "llama3" else "ByteLevel")


@pytest.fixture(scope="module")
def exported_header(exported):
    return exported, gguf.GGUFReader(str(exported)).data_offset  # (file, end of the header)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_import_of_truncated_or_corrupted_files_raises_only_bitllm_errors(exported_header, tmp_path, data):
    """Any prefix of a file, or its header with bytes overwritten, imports or raises a BitLLMError that names
    the file, and never leaves an output directory behind."""
    f = tmp_path / "fz.gguf"
    f.write_bytes(draw_damaged(data, exported_header[0].read_bytes(), header_end=exported_header[1]))
    out = tmp_path / "fz-out"
    shutil.rmtree(out, ignore_errors=True)
    try:
        import_gguf(f, out)
    except BitLLMError as e:
        assert "fz.gguf" in str(e)
        assert not out.exists()


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["tq2_0", "tq1_0"]), st.integers(1, 4), st.integers(0, 2**31))
def test_tq_round_trip_property(qtype, nblocks, seed):
    t = np.random.default_rng(seed).integers(-1, 2, nblocks * 256).astype(np.int8)
    pack, unpack = PACK[qtype]
    back, d = unpack(pack(t), t.size)
    assert np.array_equal(back, t) and d.tolist() == [float(np.abs(b).max()) for b in t.reshape(-1, 256)]


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["tq2_0", "tq1_0"]), st.binary(min_size=0, max_size=200), st.integers(0, 600))
def test_tq_unpack_of_arbitrary_bytes(qtype, raw, n):
    """Any bytes unpack to ternary values or raise FormatError (wrong size, TQ2_0 code 3), like llama.cpp's reader."""
    pack, unpack = PACK[qtype]
    try:
        vals, d = unpack(np.frombuffer(raw, dtype=np.uint8), n)
    except FormatError:
        return
    assert vals.size == n and set(np.unique(vals).tolist()) <= {-1, 0, 1}
    if qtype == "tq1_0":  # every TQ1_0 byte decodes; re-packing the digits gives a canonical byte
        assert np.array_equal(unpack(pack(vals), n)[0], vals)


def test_bad_options_are_bitllm_errors(exported, tmp_path):
    """The CLI reports BitLLMErrors as one line; unknown types, formats and a directory as output must be ones."""
    ck = exported.parent / "ck"
    with pytest.raises(FormatError, match="unknown GGUF type 'q4_0'"):
        export_gguf(ck, tmp_path / "m.gguf", "q4_0")
    with pytest.raises(FormatError, match="unknown embedding type 'q4_k'"):
        export_gguf(ck, tmp_path / "m.gguf", "tq2_0", embed_type="q4_k")
    with pytest.raises(BitLLMError, match="is a directory"):
        export_gguf(ck, tmp_path, "tq2_0")
    with pytest.raises(FormatError, match="unknown pack format 'i3'"):
        import_gguf(exported, tmp_path / "out", "i3")
    assert not list(tmp_path.iterdir())


def test_export_names_its_source_without_the_local_path(exported, tmp_path, monkeypatch):
    """The file is meant to be shared: it names the checkpoint directory or hub id, never a local path."""
    ck = exported.parent / "ck"
    r = gguf.GGUFReader(str(exported))
    assert r.fields["bitllm.source"].contents() == "ck" and r.fields["general.name"].contents() == "ck"
    assert str(ck.parent.resolve()).encode() not in exported.read_bytes()
    import bitllm.formats.checkpoint as checkpoint

    real = checkpoint.resolve_model_dir
    monkeypatch.setattr(checkpoint, "resolve_model_dir", lambda p, *a, **k: ck if p == "org/tiny" else real(p, *a, **k))
    r = gguf.GGUFReader(str(export_gguf("org/tiny", tmp_path / "hub.gguf", "tq2_0")))
    assert r.fields["bitllm.source"].contents() == "org/tiny" and r.fields["general.name"].contents() == "tiny"


def test_import_takes_the_head_size_from_key_length(tmp_path):
    """llama.cpp's head size is attention.key_length; rope.dimension_count is the rotated part of it."""
    ck = _ternary_checkpoint(tmp_path, "llama", head_dim=16)  # 32 heads of 16 on a hidden size of 256
    f = export_gguf(ck, tmp_path / "m.gguf", "tq2_0", embed_type="f32")
    assert gguf.GGUFReader(str(f)).fields["llama.attention.key_length"].contents() == 16
    VT = gguf.GGUFValueType
    no_rope = _rewrite(f, tmp_path / "no_rope.gguf", fields={"llama.rope.dimension_count": None})
    import_gguf(no_rope, tmp_path / "back")  # head size 16 from key_length, not 256 / 32 = 8
    assert from_pretrained(tmp_path / "back").config.head_dim == 16
    partial = _rewrite(f, tmp_path / "partial.gguf", fields={"llama.rope.dimension_count": (8, VT.UINT32, None)})
    with pytest.raises(UnsupportedModelError, match=r"partial\.gguf: metadata llama\.rope\.dimension_count = 8 differs "
                                                    r"from the head size 16.*partial rotary"):
        import_gguf(partial, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pre,add_bos,add_eos,bos_first,eos_last", [
    ("gpt-2", True, None, True, False), ("gpt-2", False, None, False, False), ("gpt-2", None, None, False, False),
    ("llama-bpe", None, None, True, False), ("llama-bpe", False, True, False, True),
])
def test_import_adds_bos_exactly_when_the_gguf_says_so(exported, tmp_path, pre, add_bos, add_eos, bos_first, eos_last):
    """llama.cpp adds BOS per tokenizer.ggml.add_bos_token (absent: true for the llama-3 group, false for gpt-2)."""
    VT = gguf.GGUFValueType
    fields = {"tokenizer.ggml.pre": (pre, VT.STRING, None)}
    for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        fields[f"tokenizer.ggml.{key}"] = None if value is None else (value, VT.BOOL, None)
    import_gguf(_rewrite(exported, tmp_path / "b.gguf", fields=fields), tmp_path / "out")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tmp_path / "out")("hi").input_ids  # as saved and reloaded
    assert (ids[0] == 1) is bos_first and (ids[-1] == 2) is eos_last, ids  # <s> = 1, </s> = 2


def test_export_writes_the_specials_the_tokenizer_really_adds(tmp_path):
    """A tokenizer.json template that adds <s> ... </s> (Llama 3 style: transformers' add_bos_token attribute
    says False) is written as add_bos/add_eos true, and the import rebuilds the same behaviour."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = tiny_tokenizer().backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert not tok.add_bos_token and tok("hi").input_ids[0] == 1
    model = tiny_model("llama", **SHAPE)
    quantize_(model, config_for("ternary"))
    save_pretrained(model, tmp_path / "ck", "i2", tokenizer=tok)
    f = export_gguf(tmp_path / "ck", tmp_path / "m.gguf", "tq2_0")
    fields = gguf.GGUFReader(str(f)).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_eos_token"].contents() is True
    import_gguf(f, tmp_path / "back")
    text = "The quick brown fox"
    assert AutoTokenizer.from_pretrained(tmp_path / "back")(text).input_ids == tok(text).input_ids


def test_import_refuses_an_untied_head_in_a_bitnet_file(tmp_path):
    """llama.cpp's 'bitnet' graph has no output.weight: an import must not drop it by tying the head."""
    ck = _ternary_checkpoint(tmp_path, "bitnet", hidden_act="silu")
    f = export_gguf(ck, tmp_path / "m.gguf", "tq2_0", embed_type="f32")
    head = np.random.default_rng(0).standard_normal((320, 256)).astype(np.float32)  # (vocab, hidden)
    f = _rewrite(f, tmp_path / "head.gguf", tensors={"output.weight": (head, None)})
    with pytest.raises(UnsupportedModelError, match=r"head\.gguf: tensor 'output\.weight' \(an untied LM head\)"):
        import_gguf(f, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- transformers' gguf_file= loader and bitllm's own GGUF inputs -------------------------------------


def test_transformers_cannot_load_a_bitllm_export(exported, tmp_path):
    """Why bitllm reads its own GGUF files itself: transformers' gguf_file= loader maps GGUF tensors onto HF
    parameters and has none for llama.cpp's per-tensor `blk.N.<proj>.scale`. It fails on attn_q's (its q/k
    un-permutation reshapes the 1-element tensor), and skips the others, loading the codes unscaled. If this
    test starts to fail, transformers has learnt the scales and the detour in eval/models.py and
    convert/student.py can be revisited."""
    from transformers import AutoModelForCausalLM

    from bitllm.formats.gguf_io import transformers_gguf_problem

    why = transformers_gguf_problem(exported)
    assert why is not None and "14 per-tensor weight scales (blk.0.attn_q.scale" in why
    with pytest.raises(ValueError, match="cannot reshape array of size 1"):
        AutoModelForCausalLM.from_pretrained(str(exported.parent), gguf_file=exported.name)
    r = gguf.GGUFReader(str(exported))
    scales = [t.name for t in r.tensors if t.name.endswith(".scale")]
    qk = _rewrite(exported, tmp_path / "qk.gguf", tensors={n: None for n in scales if ".attn_q." in n or ".attn_k." in n})
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=qk.name, dtype=torch.float32)
    v = m.model.layers[0].self_attn.v_proj.weight  # its blk.0.attn_v.scale was in the file, and was dropped
    assert set(v.unique().tolist()) == {-1.0, 0.0, 1.0}
    plain = _rewrite(exported, tmp_path / "plain.gguf", tensors={n: None for n in scales})
    assert transformers_gguf_problem(plain) is None  # no scales: transformers reads it (a file of other makers)
    assert transformers_gguf_problem(tmp_path / "missing.gguf") is None  # left to transformers' own error


@pytest.mark.parametrize("family,kw,qtype,backend", [
    ("llama", {}, "tq2_0", "transformers"),
    ("bitnet", {"hidden_act": "silu"}, "tq1_0", "auto"),  # auto without llama.cpp installed: the native engine
])
def test_eval_opens_a_bitllm_export_with_bitllm_reader(tmp_path, monkeypatch, family, kw, qtype, backend):
    """`bitllm eval FILE.gguf` without llama.cpp (or with backend transformers) reads the file with bitllm's own
    importer, not transformers' loader: the same logits as the checkpoint it was exported from, bit for bit, and
    the same token ids; the temporary checkpoint is gone once the model is open."""
    import sys
    import tempfile

    import bitllm
    from bitllm.eval.models import open_model

    ck = _ternary_checkpoint(tmp_path, family, **kw)
    f = export_gguf(ck, tmp_path / f"m-{qtype}.gguf", qtype, embed_type="f32")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    m = open_model(f, backend=backend, threads=1)
    assert m.kind == "gguf-bitllm" and m.file_bytes == f.stat().st_size
    from bitllm.eval.runner import FORMAT_BITS, bits_per_weight

    assert bits_per_weight(m) == FORMAT_BITS[qtype]  # the file's type, not the imported checkpoint's i2
    assert not list((tmp_path / "tmp").iterdir())
    ref = bitllm.LLM(ck, backend="hf" if backend == "transformers" else "auto", threads=1)
    assert m.llm.backend_name == ref.backend_name == ("hf" if backend == "transformers" else "native")
    tok = tiny_tokenizer()
    text = "Shall I compare thee to a summer's day? 42"
    ids = tok(text).input_ids
    assert m.encode(text) == tok.encode(text, add_special_tokens=False) and m.eos_token_id == tok.eos_token_id

    def logits(llm):
        slot = llm.backend.open(len(ids))
        out = llm.backend.forward([slot], [ids], all_logits=True)  # (T, vocab)
        llm.backend.close(slot)
        return out

    ours, theirs = logits(m.llm), logits(ref)
    assert ours.shape == (len(ids), 320) and np.array_equal(ours, theirs)
    assert m.loglikelihood([(ids[:5], ids[5:])]) == ref.loglikelihood([(ids[:5], ids[5:])])


def test_convert_refuses_a_bitllm_export_as_teacher(exported, monkeypatch):
    """A ternary GGUF with per-tensor scales is refused before transformers loads it (it would load unscaled
    weights), in one line that says what to do instead."""
    from transformers import AutoModelForCausalLM

    from bitllm.convert.student import load_teacher

    def never(*a, **k):
        raise AssertionError("transformers' loader must not be reached")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf: transformers cannot load this GGUF as a teacher: it "
                       r"holds 14 per-tensor weight scales.*`bitllm import m\.gguf -o DIR`") as e:
        load_teacher(str(exported), "fp32")
    assert "\n" not in str(e.value)
