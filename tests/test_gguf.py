"""GGUF interop: TQ1_0/TQ2_0 byte layouts, exact round trips, refusals, and llama.cpp itself."""

import json

import numpy as np
import pytest
import torch

from bitllm.errors import FormatError, UnsupportedModelError
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

TOP1_GOAL = 0.99  # share of teacher-forced positions where llama.cpp's top-1 equals bitllm's
# llama.cpp quantizes activations per 256-block (Q8_K), bitllm per token (absmax int8): the two
# round differently, so logits differ by a few per cent of their spread, not bitwise.
LOGIT_BUDGET = 0.05  # max |llama.cpp - bitllm| / (max - min of bitllm's logits), per position


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
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    spread = (ours.amax(-1) - ours.amin(-1)).clamp(min=1e-6)
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
        assert agree >= TOP1_GOAL, qtype
        assert err <= LOGIT_BUDGET, qtype
