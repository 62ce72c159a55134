"""Checkpoints: exact round trips, transformers interop both ways, hub ids, bad input, atomic saves."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bitllm
from bitllm.errors import BitLLMError, FormatError, UnsupportedModelError
from bitllm.formats.checkpoint import from_pretrained, save_pretrained
from bitllm.nn import PackedLinear
from bitllm.quant import config_for, quantize_
from bitllm.tiny import FAMILIES, tiny_model
from fuzz_helpers import draw_damaged

CASES = [("ternary", "i2"), ("ternary", "t1"), ("ternary-wo", "i2"), ("binary", "b1"), ("onebit", "b1")]
IDS = torch.tensor([[3, 17, 42, 5, 88, 1, 60, 23, 9, 77]])


def _quantized(family="llama", method="ternary", embed_std=None, **kw):
    model = tiny_model(family, embed_std=embed_std)
    quantize_(model, config_for(method, **kw))
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _packed_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,fmt", CASES)
def test_round_trip_is_exact(tmp_path, family, method, fmt):
    model = _quantized(family, method)
    ref = _logits(model)
    save_pretrained(model, tmp_path / "ck", fmt)
    loaded = from_pretrained(tmp_path / "ck")
    torch.testing.assert_close(_logits(loaded), ref, rtol=1e-5, atol=1e-6)
    # save the loaded model again: packed bytes and scales are bit-identical
    save_pretrained(loaded, tmp_path / "again", fmt)
    a, b = load_file(tmp_path / "ck" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method,fmt", CASES)
def test_metadata_names_format_and_version(tmp_path, method, fmt):
    save_pretrained(_quantized("llama", method), tmp_path, fmt)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        meta = f.metadata()
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert meta["bitllm_format_version"] == "1" and meta["bitllm_method"] == method
    if (method, fmt) == ("ternary", "i2"):
        assert qc["quant_method"] == "bitnet" and meta["bitllm_format"] == "hf-bitnet"
    else:
        assert qc["quant_method"] == "bitllm" and qc["format"] == fmt and qc["format_version"] == 1
        assert meta["bitllm_format"] == fmt


def test_transformers_alone_loads_bitllm_ternary(tmp_path):
    """A ternary I2 checkpoint loads with plain transformers in a process that never imports bitllm.

    Embeddings are O(1) as in trained models: with HF's 0.02 init the RMSNorms amplify the fp32 noise
    between the two epilogues (ours multiplies by mean|W|, transformers divides by 1/mean|W|) enough
    to flip an int8 activation rounding now and then, which no budget below 1e-2 absorbs.
    """
    cases = []
    for family, lc, norm in [("llama", "bitlinear", False), ("llama", "autobitlinear", True),
                             ("bitnet", "bitlinear", False), ("phi", "autobitlinear", False)]:
        model = _quantized(family, "ternary", embed_std=1.0, input_norm=norm)
        d = tmp_path / f"{family}-{lc}"
        save_pretrained(model, d, "i2", linear_class=lc)
        torch.save(_logits(from_pretrained(d)), d / "bitllm_logits.pt")
        cases.append(str(d))
    torch.save(IDS, tmp_path / "ids.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        for d in {cases!r}:
            m = AutoModelForCausalLM.from_pretrained(d).eval()
            assert type(m.get_submodule([n for n, _ in m.named_modules() if n.endswith('q_proj')][0])).__name__ in ('BitLinear', 'AutoBitLinear')
            with torch.no_grad():
                torch.save(m(ids).logits, d + '/hf_logits.pt')
        assert 'bitllm' not in sys.modules
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for d in cases:
        ours, theirs = torch.load(Path(d) / "bitllm_logits.pt"), torch.load(Path(d) / "hf_logits.pt")
        rel = ((theirs - ours).abs().max() / ours.abs().max()).item()
        print(f"bitllm -> transformers {Path(d).name}: max relative logit difference {rel:.2e}")
        assert rel < 1e-4


@pytest.mark.parametrize(
    "linear_class,packed_unpacked",
    # transformers' BitLinear only exists packed; AutoBitLinear saves unpacked, releases ship it packed
    [("bitlinear", "packed"), ("autobitlinear", "packed"), ("autobitlinear", "unpacked")],
)
def test_bitllm_loads_checkpoints_packed_by_transformers(tmp_path, linear_class, packed_unpacked):
    """transformers' own BitNet layers and pack_weights write the checkpoint; bitllm reads it.

    (transformers' BitLinear allocates out//4 packed rows, so it cannot hold an out dimension that
    is not a multiple of 4; test_out_dim_not_multiple_of_4 covers what bitllm does then.)
    """
    from transformers import BitNetQuantConfig
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights, replace_with_bitnet_linear

    model = tiny_model("bitnet", embed_std=1.0)  # O(1) hidden states, see the test above
    fp_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    qconf = BitNetQuantConfig(linear_class=linear_class, quantization_mode="offline", modules_to_not_convert=["lm_head"])
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qconf)
    model.to_empty(device="cpu")
    fresh = tiny_model("bitnet", embed_std=1.0)  # non-linear tensors (embeddings, norms) from a same-seed model
    model.load_state_dict({k: v for k, v in fresh.state_dict().items() if k in model.state_dict() and "proj" not in k}, strict=False)
    for name, buf in fresh.named_buffers():  # non-persistent buffers (rotary inv_freq) too: to_empty wiped them
        model.get_buffer(name).copy_(buf)
    for n, w in fp_weights.items():
        layer = model.get_submodule(n)
        gamma = w.abs().mean().clamp(min=1e-5)
        t = (w / gamma).round().clamp(-1, 1)
        if isinstance(layer, BitLinear):
            layer.weight.copy_(pack_weights(t.clone()))
            layer.weight_scale.copy_(1 / gamma)
        else:
            assert isinstance(layer, AutoBitLinear)
            layer.weight.data.copy_(t)
            layer.weight_scale.copy_(gamma)
    model.tie_weights()
    model.config.quantization_config = qconf
    ref = _logits(model)
    model.save_pretrained(tmp_path)
    if packed_unpacked == "packed" and linear_class == "autobitlinear":  # rewrite the weights packed, as released checkpoints ship
        sd = load_file(tmp_path / "model.safetensors")
        for n in fp_weights:
            sd[f"{n}.weight"] = pack_weights(sd[f"{n}.weight"].clone())
        save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = from_pretrained(tmp_path)
    got = _logits(ours)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"transformers({linear_class},{packed_unpacked}) -> bitllm: max relative logit difference {rel:.2e}")
    assert rel < 1e-4
    assert len([m for m in ours.modules() if isinstance(m, PackedLinear)]) == len(fp_weights)


def test_out_dim_not_multiple_of_4(tmp_path, caplog):
    """transformers cannot hold such a layer, so bitllm writes its own quant_method, says so, and round-trips."""
    model = tiny_model("llama", intermediate_size=70)
    quantize_(model, config_for("ternary"))
    with caplog.at_level("WARNING"):
        save_pretrained(model, tmp_path, "i2")
    assert "70 outputs, not a multiple of 4" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitllm"
    torch.testing.assert_close(_logits(from_pretrained(tmp_path)), _logits(model), rtol=1e-5, atol=1e-6)


def test_hf_bitnet_online_master_weights_are_quantized_on_load(tmp_path):
    """bf16 BitNet releases ship master weights with quantization_mode "online"."""
    model = tiny_model("bitnet").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = from_pretrained(tmp_path)
    ref = tiny_model("bitnet").to(torch.bfloat16).float()
    quantize_(ref, config_for("ternary"))
    torch.testing.assert_close(_logits(ours), _logits(ref), rtol=1e-4, atol=1e-4)


def test_hub_id_goes_through_the_hub_code_path(tmp_path):
    """A hub id resolves through huggingface_hub's snapshot code path (offline, from a local cache)."""
    save_pretrained(_quantized("llama", "binary"), tmp_path / "src", "b1")
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-b1"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "src", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    code = textwrap.dedent("""
        import torch, bitllm
        m = bitllm.from_pretrained("someone/tiny-b1")
        print(m.bitllm_source["path"])
        try:
            bitllm.from_pretrained("someone/absent")
        except bitllm.BitLLMError as e:
            print("ABSENT-OK", type(e).__name__)
    """)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"snapshots/{commit}" in r.stdout and "ABSENT-OK" in r.stdout


def test_sharded_checkpoint(tmp_path):
    model = _quantized("llama", "ternary")
    save_pretrained(model, tmp_path, "i2", max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(_logits(from_pretrained(tmp_path)), _logits(model), rtol=1e-5, atol=1e-6)


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    save_pretrained(_quantized("llama", "ternary"), tmp_path / "ck", "t1")
    return tmp_path / "ck"


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="model.safetensors"):
        from_pretrained(saved)


def test_corrupt_header(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt or truncated"):
        from_pretrained(saved)


def _rewrite(saved, fn):
    f = saved / "model.safetensors"
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata=meta)


def test_wrong_shape_names_tensor(saved):
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite(saved, lambda sd: sd.__setitem__(key, sd[key][:, :-1].contiguous()))
    with pytest.raises(FormatError, match=r"up_proj\.weight.*shape"):
        from_pretrained(saved)


def test_wrong_dtype_names_tensor(saved):
    key = "model.layers.1.self_attn.q_proj.weight"
    _rewrite(saved, lambda sd: sd.__setitem__(key, sd[key].to(torch.int16)))
    with pytest.raises(FormatError, match=r"q_proj\.weight.*dtype"):
        from_pretrained(saved)


def test_nan_weights_name_tensor(saved):
    key = "model.norm.weight"
    _rewrite(saved, lambda sd: sd[key].__setitem__(0, float("nan")))
    with pytest.raises(FormatError, match=r"model\.norm\.weight.*NaN"):
        from_pretrained(saved)


def test_invalid_codes(saved):
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite(saved, lambda sd: sd[key].__setitem__((0, 0), 250))
    with pytest.raises(FormatError, match="242"):
        from_pretrained(saved)


def test_unknown_format_version(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="format_version 99"):
        from_pretrained(saved)


def test_unsupported_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "quantum-llm"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quantum-llm"):
        from_pretrained(saved)


def test_unexpected_tensor(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(FormatError, match="unexpected tensor 'model.extra.weight'"):
        from_pretrained(saved)


def test_missing_file_and_not_a_model(tmp_path, saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="no model.safetensors"):
        from_pretrained(saved)
    with pytest.raises(FormatError, match="no config.json"):
        from_pretrained(tmp_path)


def test_saving_without_bitllm_layers_or_with_nan():
    with pytest.raises(BitLLMError, match="quantize_"):
        save_pretrained(tiny_model("llama"), "/tmp/never-written", "i2")
    model = _quantized("llama", "ternary")
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(BitLLMError, match="model.norm.weight"):
        save_pretrained(model, "/tmp/never-written", "i2")
    assert not Path("/tmp/never-written").exists()


# --- atomic saves --------------------------------------------------------------------------------


def test_killed_save_leaves_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "ck"
    old_model = _quantized("llama", "ternary")
    save_pretrained(old_model, target, "t1")
    old_logits = _logits(from_pretrained(target))
    code = textwrap.dedent(f"""
        import time, torch
        import bitllm.formats.checkpoint as ck
        from bitllm.quant import quantize_, config_for
        from bitllm.tiny import tiny_model
        real = ck.write_checkpoint_tensors
        def slow(directory, *a, **kw):
            out = real(directory, *a, **kw)
            print("WRITTEN", flush=True)
            time.sleep(60)  # killed here: new weights on disk, config not yet written, nothing renamed
            return out
        ck.write_checkpoint_tensors = slow
        m = tiny_model("llama", seed=123)
        quantize_(m, config_for("ternary"))
        ck.save_pretrained(m, {str(target)!r}, "t1")
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "WRITTEN"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".ck.tmp-*"))  # the half-written save is beside, not in, the checkpoint
    torch.testing.assert_close(_logits(from_pretrained(target)), old_logits, rtol=0, atol=0)
    # a later save succeeds and replaces it whole
    new_model = _quantized("llama", "binary")
    save_pretrained(new_model, target, "b1")
    torch.testing.assert_close(_logits(from_pretrained(target)), _logits(new_model), rtol=1e-5, atol=1e-6)


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import bitllm.formats.checkpoint as ck

    target = tmp_path / "ck"
    save_pretrained(_quantized("llama", "ternary"), target, "i2")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "write_checkpoint_tensors", full)
    with pytest.raises(BitLLMError, match="no space left.*intact"):
        save_pretrained(_quantized("llama", "binary"), target, "b1")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not list(tmp_path.glob(".ck.tmp-*"))


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_pack_latent_weight_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from bitllm.cli import app

    fp = tiny_model("phi")
    fp.save_pretrained(tmp_path / "fp")  # fp32 latent weights, as Bitlinear4HF and bf16 BitNet ship
    for method, fmt in [("ternary-wo", "i2"), ("onebit", "b1"), ("ternary", "t1")]:
        out = tmp_path / f"{method}-{fmt}"
        r = CliRunner().invoke(app, ["pack", str(tmp_path / "fp"), "--method", method, "--format", fmt, "-o", str(out)])
        assert r.exit_code == 0, r.output
        expect = tiny_model("phi")
        quantize_(expect, config_for(method))
        torch.testing.assert_close(_logits(bitllm.from_pretrained(out)), _logits(expect), rtol=1e-4, atol=1e-5)
    r = CliRunner().invoke(app, ["pack", str(tmp_path / "fp"), "--method", "int3", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0


# --- malformed configs and indexes, stray tensors, unrelated output directories ---------------------------


def _edit_config(saved, fn):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(fn(cfg)))


@pytest.mark.parametrize("edit", [lambda c: [c], lambda c: {**c, "quantization_config": "bitllm"}])
def test_config_json_that_is_not_an_object(saved, edit):
    _edit_config(saved, edit)
    with pytest.raises(FormatError, match=r"config\.json: expected a JSON object"):
        from_pretrained(saved)


def test_config_too_large_to_build_is_a_format_error(saved):
    # a corrupt size must not surface as torch's allocation RuntimeError (1 TB of gate_proj here)
    _edit_config(saved, lambda c: {**c, "intermediate_size": 1 << 30})
    with pytest.raises(FormatError, match=r"config\.json: the config describes a model too large to build"):
        from_pretrained(saved)


@pytest.mark.parametrize("key,value", [("linear_class", "BitLinear"), ("quantization_mode", "dynamic")])
def test_hf_bitnet_unknown_scale_convention_is_refused(tmp_path, key, value):
    """The convention decides whether weight_scale divides or multiplies: an unknown value is not guessed."""
    save_pretrained(_quantized("llama", "ternary"), tmp_path / "ck", "i2")
    _edit_config(tmp_path / "ck", lambda c: (c["quantization_config"].update({key: value}), c)[1])
    with pytest.raises(FormatError, match=f"{key} '{value}' is not one of"):
        from_pretrained(tmp_path / "ck")


def test_stray_tensor_inside_a_quantized_layer(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.junk", torch.zeros(3)))
    with pytest.raises(FormatError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.up_proj\.junk'"):
        from_pretrained(saved)


@pytest.mark.parametrize("index", ['{"weight_map": []}', '{"weight_map": {"model.norm.weight": 3}}'])
def test_malformed_shard_index(saved, index):
    (saved / "model.safetensors.index.json").write_text(index)
    with pytest.raises(FormatError, match=r"index\.json: weight_map must map"):
        from_pretrained(saved)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ck/../../outside.safetensors", "ABSOLUTE"])
def test_shard_index_pointing_outside_the_directory_is_refused(saved, shard):
    """An index must not make bitllm read a file elsewhere, even a valid one (the shard here is the real weights)."""
    outside = saved.parent / "outside.safetensors"
    (saved / "model.safetensors").rename(outside)
    shard = str(outside.resolve()) if shard == "ABSOLUTE" else shard
    with safe_open(outside, "pt") as h:
        weight_map = {k: shard for k in h.keys()}
    (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FormatError, match=r"index\.json: shard .* is not a file inside the model directory"):
        from_pretrained(saved)


@pytest.mark.parametrize("value", [0.0, -0.25, float("inf")])
def test_non_positive_weight_scale_names_file_and_tensor(saved, value):
    """A ternary/binary scale is mean|W| > 0; the HF-layout path checks the same (4.3)."""
    key = "model.layers.1.mlp.down_proj.weight_scale"
    _rewrite(saved, lambda sd: sd[key].fill_(value))
    with pytest.raises(FormatError, match=rf"model\.safetensors: tensor '{key}' (must hold positive|holds 1 NaN/inf)"):
        from_pretrained(saved)


def test_onebit_scales_of_either_sign_load(tmp_path):
    """OneBit's h is learned (any sign is a valid model), so the positivity rule is not applied to it."""
    model = _quantized("llama", "onebit")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight_scale.neg_()
    save_pretrained(model, tmp_path / "ob", "b1")
    torch.testing.assert_close(_logits(from_pretrained(tmp_path / "ob")), _logits(model))


def test_unknown_linear_class_is_a_format_error(tmp_path, monkeypatch, capsys):
    """`bitllm pack --linear-class foo` is one error line naming the choices, before the model is loaded."""
    from bitllm.cli import main
    from bitllm.pack import pack_checkpoint

    with pytest.raises(FormatError, match=r"unknown linear_class 'foo'; expected one of \('bitlinear', 'autobitlinear'\)"):
        save_pretrained(_quantized("llama", "ternary"), tmp_path / "ck", "i2", linear_class="foo")
    with pytest.raises(FormatError, match="unknown linear_class 'foo'"):
        pack_checkpoint(tmp_path / "not-loaded", tmp_path / "out", linear_class="foo")
    monkeypatch.setattr(sys, "argv", ["bitllm", "pack", str(tmp_path / "fp"), "-o", str(tmp_path / "out"), "--linear-class", "foo"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "unknown linear_class 'foo'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    """A save replaces its target whole: `-o .` or `-o ~/models` must not delete unrelated files."""
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(BitLLMError, match="is not a model checkpoint"):
        save_pretrained(_quantized("llama", "ternary"), target, "i2")
    assert (target / "notes.txt").read_text() == "keep me" and not list(tmp_path.glob(".mine.*"))
    (target / "notes.txt").unlink()  # an empty directory is fine
    save_pretrained(_quantized("llama", "ternary"), target, "i2")
    assert (target / "config.json").exists()


def test_failed_final_rename_restores_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    save_pretrained(_quantized("llama", "ternary"), target, "t1")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real = os.rename

    def rename(src, dst):
        if ".ck.tmp-" in str(src):  # moving the new checkpoint into place fails
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        save_pretrained(_quantized("llama", "binary"), target, "b1")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not list(tmp_path.glob(".ck.*"))


# --- property tests: any corruption of the file is a FormatError ---------------------------------------


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "ck"
    save_pretrained(_quantized("llama", "onebit"), d, "b1")
    return d, (d / "model.safetensors").read_bytes()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_corrupted_safetensors_raise_format_error(saved_bytes, tmp_path, data):
    """Any prefix of the file, or its header with bytes overwritten, loads or raises a FormatError naming the file."""
    src, raw = saved_bytes
    damaged = draw_damaged(data, raw, header_end=8 + int.from_bytes(raw[:8], "little"))
    d = tmp_path / "fz"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    (d / "model.safetensors").write_bytes(damaged)
    try:
        from_pretrained(d)
    except FormatError as e:
        assert str(d) in str(e)
