"""bitllm.eval: perplexity, the offline task builder, the lm-eval adapter, `bitllm eval` and `bitllm bench`.

Tiny models only (hidden 64, 2 layers): every test here checks plumbing and arithmetic, never speed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitllm
from bitllm.eval import open_model, window_pairs
from bitllm.eval.perplexity import perplexity, perplexity_of_ids

# The adapter and lm-eval's own transformers model score the same token ids of a ternary I2
# checkpoint; they differ only by fp32 summation order (engine kernels vs torch) and, rarely, an int8
# activation tie. Budget per request, in nats: absolute plus a part proportional to |log p|.
LL_BUDGET_ABS = 2e-3
LL_BUDGET_REL = 1e-4


def _tiny(family: str = "llama", max_pos: int = 1024, seed: int = 0, vocab: int | None = None, zero_head=False):
    """A tiny model whose embeddings and head are fp16-exact (as the engine stores them)."""
    from bitllm.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(family, seed=seed, hidden=64, layers=2, vocab_size=vocab or len(tok), max_position_embeddings=max_pos)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0.0, 1.0)
        emb.copy_(emb.half().float())
        head = model.get_output_embeddings().weight
        head.normal_(0.0, 0.05)
        head.copy_(head.half().float())
        if zero_head:
            head.zero_()
    return model, tok


@pytest.fixture(scope="module")
def ternary_dir(tmp_path_factory):
    model, tok = _tiny()
    bitllm.quantize_(model, bitllm.config_for("ternary"))
    return bitllm.save_pretrained(model, tmp_path_factory.mktemp("tern") / "m", "i2", tokenizer=tok)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    model, tok = _tiny(seed=1)
    d = tmp_path_factory.mktemp("fp") / "m"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def splits():
    from bitllm.eval.tasks import bundled_splits

    try:
        return bundled_splits()
    except bitllm.BitLLMError as e:
        pytest.skip(f"bundled corpus not installed: {e}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, splits):
    from bitllm.eval.tasks import build_local_tasks

    d = tmp_path_factory.mktemp("tasks")
    build_local_tasks(d, n=4, splits=splits, cloze_words=40)
    return d


# --- perplexity --------------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [True, False], ids=["engine", "hf"])
def test_uniform_model_perplexity_equals_vocab_size(tmp_path, quantized):
    model, _ = _tiny(vocab=300, zero_head=True)  # all logits 0: p = 1/V for every token
    if quantized:
        bitllm.quantize_(model, bitllm.config_for("ternary"))
        bitllm.save_pretrained(model, tmp_path / "m", "i2")
    else:
        model.save_pretrained(tmp_path / "m")
    m = open_model(tmp_path / "m", threads=1)
    assert m.kind == ("bitllm-native" if quantized else "hf")
    ids = np.random.default_rng(0).integers(0, 300, size=200).tolist()
    nll, n = perplexity_of_ids(m, ids, context=48, stride=20, progress=False)
    assert n == len(ids) - 1
    assert math.exp(nll / n) == pytest.approx(300, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 80), context=st.integers(2, 30), data=st.data())
def test_window_pairs_score_every_token_once(n, context, data):
    stride = data.draw(st.integers(1, context))
    ids = list(range(100, 100 + n))
    pairs = window_pairs(ids, context, stride)
    assert [t for _, c in pairs for t in c] == ids[1:]  # every token but the first, once, in order
    for ctx, cont in pairs:
        assert 1 <= len(ctx) and len(ctx) + len(cont) <= context
        start = ids.index(ctx[0])
        assert ids[start:start + len(ctx) + len(cont)] == ctx + cont  # a contiguous slice


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5), (512, 512)])
def test_sliding_window_matches_direct_computation(fp_dir, context, stride):
    m = open_model(fp_dir, threads=1)
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 3
    res = perplexity(m, text, context=context, stride=stride, max_tokens=None, progress=False)
    # direct: one forward per window of the transformers model, log-softmax, sum the scored positions
    hf = m.llm.backend.model
    ids = [m.prefix_token_id] + m.tokenizer.encode(text, add_special_tokens=False)
    nll, scored, k = 0.0, 1, 0
    while scored < len(ids):
        b = min(k * stride, scored - 1)  # a window starts by the last scored token at the latest
        e = min(b + context, len(ids))
        with torch.no_grad():
            logp = hf(torch.tensor([ids[b:e]])).logits[0].double().log_softmax(-1)
        for pos in range(scored, e):
            nll -= logp[pos - 1 - b, ids[pos]].item()
        scored, k = e, k + 1
    assert res.tokens == len(ids) - 1
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll / res.tokens), rel=1e-5)
    assert res.bytes == len(text.encode())


def test_bits_per_byte_counts_the_scored_text(fp_dir):
    """Bytes are the text's own, even where decoding the ids would not give the text back (special-token strings)."""
    m = open_model(fp_dir, threads=1)
    text = "In the beginning</s> was the word, and the word was with the model."
    assert m.decode(m.encode(text)) != text
    res = perplexity(m, text, progress=False)
    assert res.bytes == len(text.encode())
    short = perplexity(m, text, max_tokens=5, progress=False)  # truncated: the bytes of the 5 scored tokens
    assert short.tokens == 5 and short.bytes == len(m.decode(m.encode(text)[:5]).encode())


def test_engine_perplexity_matches_the_hf_reference_path_around_the_window(ternary_dir, monkeypatch):
    """Native engine vs transformers + PackedLinear's PyTorch reference, on texts shorter than, equal to and just
    longer than the window (context 16), disjoint and strided: the same windows, the same sums."""
    nat = open_model(ternary_dir, threads=1)
    ref = open_model(ternary_dir, threads=1, backend="hf")
    assert (nat.kind, ref.kind) == ("bitllm-native", "bitllm-hf")
    rng = np.random.default_rng(0)
    seqs = [[1] + rng.integers(3, 200, size=n - 1).tolist() for n in (2, 15, 16, 17, 18, 40)]
    got = [perplexity_of_ids(nat, ids, context=16, stride=st, progress=False) for ids in seqs for st in (16, 5)]
    monkeypatch.setenv("BITLLM_KERNEL", "reference")
    want = [perplexity_of_ids(ref, ids, context=16, stride=st, progress=False) for ids in seqs for st in (16, 5)]
    for (a, na), (b, nb), n in zip(got, want, [len(i) for i in seqs for _ in (16, 5)]):
        assert na == nb == n - 1
        assert a == pytest.approx(b, rel=1e-5)


def test_ppl_sources(tmp_path, fp_dir):
    from bitllm.eval.perplexity import evaluate_perplexity

    (tmp_path / "a.jsonl").write_text('{"text": "In the beginning was the word."}\n{"text": "The quick brown fox."}\n')
    m = open_model(fp_dir, threads=1)
    [r] = evaluate_perplexity(m, str(tmp_path / "a.jsonl"), progress=False)
    assert r.tokens > 10 and r.ppl > 1
    with pytest.raises(bitllm.BitLLMError, match="neither"):
        evaluate_perplexity(m, "no-such-source", progress=False)


# --- offline tasks -------------------------------------------------------------------------------


def test_task_builder_is_deterministic_and_uses_heldout_text_only(tmp_path, splits):
    from bitllm.eval.tasks import build_local_tasks
    from bitllm.train.config import DataConfig
    from bitllm.train.data import read_sources, split_source

    a = build_local_tasks(tmp_path / "a", n=5, splits=splits, cloze_words=40)
    b = build_local_tasks(tmp_path / "b", n=5, splits=splits, cloze_words=40)
    assert {k: v["sha256"] for k, v in a["tasks"].items()} == {k: v["sha256"] for k, v in b["tasks"].items()}
    assert set(a["tasks"]) == {"local_lambada_id", "local_lambada_ood", "local_nextsent_id", "local_nextsent_ood"}
    # the training split exactly as bitllm.train cuts it, recomputed here
    cuts = [split_source(s.text, DataConfig().holdout_frac) for s in read_sources(["bundled"], "train")]
    train = [t for t, _ in cuts]
    train_norm = [" ".join(t.split()) for t in train]  # next-sentence docs are whitespace-normalized
    held_id = "\n".join(h for _, h in cuts)
    for name in a["tasks"]:
        for line in (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines():
            doc = json.loads(line)
            if "target" in doc:
                passage = doc["context"] + doc["target"]
                assert not any(passage in t for t in train), f"{name}: a passage occurs in the training split"
                if name.endswith("_id"):
                    assert passage in held_id
            else:
                true = doc["choices"][doc["label"]]
                assert not any((doc["context"] + true) in t for t in train_norm), f"{name}: a passage is in training"
                assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4


# --- lm-eval adapter ---------------------------------------------------------------------------


def _per_request(results) -> dict:
    return {task: [float(r[0][0]) for d in docs for r in d["resps"]] for task, docs in results["samples"].items()}


def test_adapter_matches_lm_eval_hf_on_a_ternary_checkpoint(ternary_dir, task_dir):
    pytest.importorskip("lm_eval")
    from bitllm.eval.harness import run_lm_eval

    # one task of each kind (a cloze and a 4-way choice) keeps this under a minute on 2 busy cores
    tasks = ["local_lambada_id", "local_nextsent_ood"]
    kw = dict(include_path=task_dir, limit=3, log_samples=True, extra={"bootstrap_iters": 0})
    ours = run_lm_eval(str(ternary_dir), tasks, threads=1, **kw)
    ref = run_lm_eval(str(ternary_dir), tasks, model_type="hf", **kw)
    a, b = _per_request(ours), _per_request(ref)
    assert a.keys() == b.keys() == set(tasks) and sum(map(len, a.values())) == 3 + 3 * 4
    for task in a:
        x, y = np.asarray(a[task]), np.asarray(b[task])
        assert np.all(np.abs(x - y) <= LL_BUDGET_ABS + LL_BUDGET_REL * np.abs(y)), \
            f"{task}: max |d log p| {np.abs(x - y).max():.2e}"
        assert ours["results"][task]["acc,none"] == ref["results"][task]["acc,none"]


def test_simple_evaluate_route_and_rolling(ternary_dir):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.api.instance import Instance

    import bitllm.eval  # noqa: F401  (registers "bitllm")
    from lm_eval.api.registry import get_model

    lm = get_model("bitllm").create_from_arg_string(f"pretrained={ternary_dir},threads=1", {"batch_size": 1})
    text = "Thou art more lovely and more temperate. " * 12
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    m = lm.model
    nll, n = perplexity_of_ids(m, [m.prefix_token_id] + m.encode(text), context=m.max_length, progress=False)
    assert rolling == pytest.approx(-nll, rel=1e-6)
    [gen] = lm.generate_until([Instance("generate_until", {}, ("Shall I", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    assert isinstance(gen, str)
    [gen2] = lm.generate_until([Instance("generate_until", {}, ("Shall I", {"until": ["", "\n"], "max_gen_toks": 5}), 0)])
    assert gen2 == gen and gen  # an empty `until` string stops nothing
    assert lm_eval.simple_evaluate is not None


def test_generate_until_leaves_room_for_max_gen_toks(ternary_dir):
    """The context is left-truncated to max_length - max_gen_toks (lm-eval's aliases honoured); no room: an error."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from bitllm.eval.lm_adapter import BitLLMEval

    lm = BitLLMEval(str(ternary_dir), threads=1, max_length=32)
    ctx = "Shall I compare thee to a summer's day? " * 8
    ids = lm.tok_encode(ctx)
    assert len(ids) > 32

    def gen(kw):
        return lm.generate_until([Instance("generate_until", {}, (ctx, kw), 0)], disable_tqdm=True)[0]

    want = lm.model.generate(ids[-30:], max_new_tokens=2)
    assert gen({"until": [], "max_gen_toks": 2}) == want
    assert gen({"until": [], "max_new_tokens": 2}) == want  # the alias lm-eval's normalize_gen_kwargs accepts
    for n in (32, 40):
        with pytest.raises(bitllm.BitLLMError, match="max_gen_toks"):
            gen({"until": [], "max_gen_toks": n})


# --- CLI and bench ---------------------------------------------------------------------------


def test_cli_eval_local_tasks_end_to_end(tmp_path, ternary_dir, task_dir):
    pytest.importorskip("lm_eval")
    from typer.testing import CliRunner

    from bitllm.cli import app

    (tmp_path / "t.txt").write_text("In the beginning was the word, and the word was with the model.\n" * 4)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["eval", str(ternary_dir), "--tasks", "local", "--include-path", str(task_dir),
                                 "--limit", "1", "--lm-eval-arg", "bootstrap_iters=0", "--ppl", str(tmp_path / "t.txt"),
                                 "--threads", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "eval.json").read_text())
    assert {z["task"] for z in res["zeroshot"]} == {"local_lambada_id", "local_lambada_ood", "local_nextsent_id",
                                                    "local_nextsent_ood"}
    assert res["perplexity"][0]["bits_per_weight"] == 2.0 and res["perplexity"][0]["ppl"] > 1
    assert (out / "eval.md").exists() and (out / "ppl_vs_bits.png").stat().st_size > 0


def test_lm_eval_model_type_hf_resolves_after_bitllm_registers():
    """`bitllm eval --model-type hf` / run_lm_eval(model_type="hf"): importing bitllm.eval registers
    "bitllm", which stops lm-eval from filling its model registry lazily; lm-eval's own "hf" must still
    resolve (a fresh process, so no other test has filled the registry)."""
    pytest.importorskip("lm_eval")
    import subprocess
    import sys

    code = (
        "import lm_eval, bitllm.eval\n"
        "from bitllm.eval.harness import run_lm_eval\n"
        "from lm_eval.api.registry import get_model\n"
        "def fake(model, **kw):\n"
        "    get_model(model)  # raises if 'hf' is not registered\n"
        "    raise SystemExit(0)\n"
        "lm_eval.simple_evaluate = fake\n"
        "run_lm_eval('m', ['local_lambada_id'], model_type='hf')\n"
        "raise SystemExit(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def test_bench_reports_every_field(tmp_path, ternary_dir):
    from bitllm.eval.bench import BenchConfig, run_bench
    from bitllm.eval.report import bench_markdown, write_bench_report

    cfg = BenchConfig(prompt_tokens=16, gen_tokens=4, reps=5, batch_sizes=(1, 4, 16), batch_prompt_tokens=8,
                      batch_gen_tokens=2, threads=1)
    res = run_bench(str(ternary_dir), ["fp", "llama.cpp"], cfg=cfg, workdir=tmp_path, roofline_bytes=1 << 24,
                    progress=lambda s: None).as_dict()
    assert res["machine"]["roofline_gbs"] > 0 and res["machine"]["isa"]
    rows = {r["kind"]: r for r in res["rows"]}
    assert "skipped" in rows["llama.cpp"]  # 64-wide rows cannot be TQ2_0 (or llama-cpp-python is missing): said so
    for kind in ("bitllm", "fp"):
        r = rows[kind]
        assert r["file_bytes"] > 0 and r["rss_peak_mib"] >= r["rss_after_load_mib"] > 0
        for key in ("prefill_tok_s", "decode_tok_s"):
            assert r[key]["reps"] == 5 and r[key]["median"] >= r[key]["min"] > 0
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]
        assert all(r["batched"][str(b)]["tok_s"]["median"] > 0 for b in (1, 4, 16))
        e = r["energy"]
        assert e["joules_per_token"] > 0 and e["prefill_joules_per_token"] > 0 and r["roofline_pct"] > 0
        # decode steps are 3 of the 4 generated tokens: their energy is part of the whole, not all of it
        assert 3 * e["joules_per_token"] < 4 * e["total_joules_per_generated_token"]
        if e["estimate"]:
            assert e["method"].startswith("ESTIMATE")
            assert e["joules_per_token"] == pytest.approx(e["cpu_s_per_token"] * cfg.watts_per_core)
    assert rows["bitllm"]["backend"] == "native" and rows["fp"]["backend"] == "hf"
    md = bench_markdown(res)
    assert ("ESTIMATE" in md) == rows["bitllm"]["energy"]["estimate"]
    paths = write_bench_report(res, tmp_path / "rep")
    assert paths["png"].stat().st_size > 0 and json.loads(paths["json"].read_text())["rows"]


def test_bench_rejects_bad_input_before_measuring(tmp_path, ternary_dir):
    from bitllm.eval.bench import BenchConfig, run_bench

    def bench(model, baselines=(), fp_model=None, **cfg):
        run_bench(str(model), list(baselines), fp_model=fp_model, cfg=BenchConfig(threads=1, **cfg),
                  workdir=tmp_path, roofline_bytes=1 << 20, progress=lambda s: None)

    with pytest.raises(bitllm.BitLLMError, match="no such"):
        bench(tmp_path / "missing")
    with pytest.raises(bitllm.BitLLMError, match="no such"):
        bench(ternary_dir, ["fp"], fp_model=str(tmp_path / "missing-fp"))
    with pytest.raises(bitllm.BitLLMError, match="--baseline fp"):
        bench(ternary_dir, [], fp_model=str(ternary_dir))
    with pytest.raises(bitllm.BitLLMError, match="gen_tokens >= 2"):
        bench(ternary_dir, gen_tokens=1)  # no decode step to time


def test_energy_meter_unwraps_rapl_and_labels_the_estimate(tmp_path, monkeypatch):
    from bitllm.eval import bench

    dom = tmp_path / "intel-rapl:0"
    dom.mkdir()
    (dom / "max_energy_range_uj").write_text("1000000000\n")
    (dom / "energy_uj").write_text("999000000\n")
    monkeypatch.setattr(bench, "_rapl_files", lambda: [dom / "energy_uj"])
    with bench.EnergyMeter(4.0) as m:
        (dom / "energy_uj").write_text("5000000\n")  # the counter wrapped: 1 J before the wrap + 5 J after
    assert not m.method.startswith("ESTIMATE") and m.joules == pytest.approx(6.0)
    monkeypatch.setattr(bench, "_rapl_files", lambda: [])  # a VM: no counters
    with bench.EnergyMeter(4.0) as m:
        sum(range(10**5))
    assert m.method.startswith("ESTIMATE") and m.joules == pytest.approx(m.cpu_s * 4.0) and m.joules >= 0


@pytest.mark.slow
def test_gguf_through_llama_cpp_scores_like_the_engine(tmp_path):
    """The same ternary weights as a bitllm checkpoint (engine) and as GGUF TQ2_0 (llama.cpp) give the same
    perplexity up to llama.cpp's Q8_K activations (per 256-block instead of per token): 2 % budget."""
    pytest.importorskip("llama_cpp")
    from bitllm.formats.gguf_io import export_gguf
    from bitllm.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", hidden=256, layers=1, vocab_size=len(tok), intermediate_size=512,
                       max_position_embeddings=128, embed_std=1.0)
    bitllm.quantize_(model, bitllm.config_for("ternary"))
    d = bitllm.save_pretrained(model, tmp_path / "m", "i2", tokenizer=tok)
    g = export_gguf(d, tmp_path / "m.gguf", "tq2_0")
    ids = [1] + np.random.default_rng(0).integers(3, len(tok), size=100).tolist()
    ppl = {}
    for spec in (d, g):
        m = open_model(spec, threads=1, max_length=64)
        nll, n = perplexity_of_ids(m, ids, context=64, stride=32, progress=False)
        ppl[m.kind] = math.exp(nll / n)
        m.close()
    assert set(ppl) == {"bitllm-native", "llama.cpp"}
    assert ppl["llama.cpp"] == pytest.approx(ppl["bitllm-native"], rel=2e-2)
    m = open_model(g, threads=1)  # no max_length: the file's own context, as for the engine
    assert m.max_length == 128
    m.close()


def test_adapter_truncates_long_requests_as_lm_eval_hf(ternary_dir):
    """A request longer than the window is cut as `--model hf` cuts it, (ctx + cont)[-(max_length + 1):]
    with the last token only scored: the engine must hold max_length fed tokens, not one fewer."""
    pytest.importorskip("lm_eval")
    import lm_eval.models  # noqa: F401  (lm-eval's own "hf"; see the registry test below)
    from lm_eval.api.registry import get_model

    import bitllm.eval  # noqa: F401  (registers "bitllm")

    ours = get_model("bitllm").create_from_arg_string(f"pretrained={ternary_dir},threads=1,max_length=24", {})
    ref = get_model("hf").create_from_arg_string(f"pretrained={ternary_dir},max_length=24", {"batch_size": 1, "device": "cpu"})
    ctx, cont = [3 + (7 * i) % 50 for i in range(40)], [11, 12, 13]
    reqs = [(("a", "b"), ctx, cont), (("c", "d"), ctx[:22], cont), (("e", "f"), ctx[:21], cont[:1])]
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    want = ref._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(got, want):
        assert abs(a - b) <= LL_BUDGET_ABS + LL_BUDGET_REL * abs(b) and ga == gb
    # exactly hf's cut: the last max_length + 1 = 25 tokens (the budget above is too loose to see one
    # token of context on this tiny model); 22 + 3 tokens fit uncut, and the engine takes that many
    assert [lp for lp, _ in ours.model.loglikelihood([(ctx[-22:], cont), (ctx[:22], cont)])] == \
        [got[0][0], got[1][0]]
    with pytest.raises(bitllm.BitLLMError, match="exceed"):
        ours.model.loglikelihood([(ctx[:23], cont)])
