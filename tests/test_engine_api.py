"""bitllm.LLM and the running-batch API: generate / stream / chat / add-step-cancel / loglikelihood,
the transformers fallback, and bad input (unsupported config fields, long prompts, NaN logits,
corrupt weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bitllm
from bitllm.engine import LLM, SamplingParams
from bitllm.engine.golden import _scaled_tiny, hf_greedy, kernel_mode
from bitllm.engine.sampling import apply_repetition_penalty, filter_top_k_top_p, sample
from bitllm.errors import BitLLMError, FormatError, UnsupportedModelError
from bitllm.formats.checkpoint import from_pretrained, save_pretrained
from bitllm.quant.config import config_for

VOCAB = 300
TEXT = ("the quick brown fox jumps over the lazy dog. a bit of text to learn merges from, "
        "with some words repeated: model, models, modelling, bits, bytes, ternary, binary. ") * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _save(directory, family="llama", method="ternary-wo", fmt="i2", tokenizer=None, mutate=None, seed=0):
    model = _scaled_tiny(family, seed, 64, VOCAB)
    if mutate:
        mutate(model)
    bitllm.quantize_(model, config_for(method))
    return save_pretrained(model, directory, fmt, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("api") / "m", tokenizer=_tokenizer())


@pytest.fixture(scope="module")
def llm(text_model):
    return LLM(text_model, threads=1)


# --- generation ------------------------------------------------------------------------------------


def test_generate_text_and_ids(llm):
    out = llm.generate("the quick brown", max_new_tokens=12, ignore_eos=True)
    assert isinstance(out, str) and len(out.token_ids) == 12 and out.finish_reason == "length"
    assert out == llm.decode(out.token_ids)
    ids = llm.encode("the quick brown")
    again = llm.generate(ids, max_new_tokens=12, ignore_eos=True)  # token-id prompts give the same
    assert again.token_ids == out.token_ids
    both = llm.generate(["the quick brown", "a bit of"], max_new_tokens=12, ignore_eos=True)
    assert both[0].token_ids == out.token_ids and len(both) == 2


def test_completion_pickles_and_copies(llm):
    import copy
    import pickle

    out = llm.generate("the quick brown", max_new_tokens=4, ignore_eos=True)
    for c in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        assert (c, c.token_ids, c.finish_reason, c.prompt_tokens) == (out, out.token_ids, "length", out.prompt_tokens)


def test_stream_matches_generate_and_stop_strings(llm):
    full = llm.generate("the lazy", max_new_tokens=16, ignore_eos=True)
    pieces = list(llm.stream("the lazy", max_new_tokens=16, ignore_eos=True))
    assert "".join(pieces) == full and len(pieces) > 1
    stop = full[3:6]
    assert stop and stop in full
    cut = llm.generate("the lazy", max_new_tokens=16, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and cut == full[: full.find(stop)]
    assert "".join(llm.stream("the lazy", max_new_tokens=16, ignore_eos=True, stop=[stop])) == cut


def test_chat_rejects_malformed_messages(llm):
    for bad in ("hello", [], [{"content": "hi"}], [{"role": "user"}], [{"role": "user", "content": None}]):
        with pytest.raises(BitLLMError, match="messages must be"):
            llm.chat(bad, max_new_tokens=2)


def test_chat_uses_the_template(llm):
    msgs = [{"role": "user", "content": "hello model"}]
    ids = llm.chat_ids(msgs)
    assert llm.tokenizer.decode(ids).endswith("<|assistant|>")
    assert llm.chat(msgs, max_new_tokens=8, ignore_eos=True) == llm.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert "".join(llm.chat(msgs, stream=True, max_new_tokens=8, ignore_eos=True)) == llm.chat(msgs, max_new_tokens=8, ignore_eos=True)


def test_chat_without_template_keeps_a_stop_string_whole(llm, monkeypatch):
    """Without a chat template the turn ends at "\nUser:", added to the caller's stops: a single stop
    string stays one string (not one stop per character)."""
    monkeypatch.setattr(llm.tokenizer, "chat_template", None)
    seen = []
    monkeypatch.setattr(llm, "generate", lambda ids, **kw: seen.append(kw["stop"]))
    llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=2, stop="zz")
    llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=2, stop=["a", "b"])
    assert seen == [("zz", "\nUser:"), ("a", "b", "\nUser:")]


def test_sampling_seeded_and_topk1_is_greedy(llm):
    greedy = llm.generate("bits", max_new_tokens=10, ignore_eos=True).token_ids
    assert llm.generate("bits", max_new_tokens=10, temperature=0.8, top_k=1, seed=3, ignore_eos=True).token_ids == greedy
    a = llm.generate("bits", max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7, ignore_eos=True).token_ids
    b = llm.generate("bits", max_new_tokens=10, temperature=1.5, top_p=0.95, seed=7, ignore_eos=True).token_ids
    assert a == b
    rp = llm.generate("bits", max_new_tokens=10, repetition_penalty=1.3, ignore_eos=True)
    assert len(rp.token_ids) == 10


def test_sampling_filters():
    x = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    assert np.isinf(filter_top_k_top_p(x, 2, 1.0)[[0, 3]]).all()
    assert np.isfinite(filter_top_k_top_p(x, 0, 0.5)).sum() == 1  # the top token alone holds > 50 %
    np.testing.assert_allclose(apply_repetition_penalty(x, np.array([1, 3]), 2.0), [1.0, 1.5, 2.0, -2.0])


def test_sampling_params_reject_empty_stop_and_nan():
    """vLLM's rule: an empty stop string (it would stop at the first token) is an error, as are NaN
    settings and a negative seed (numpy's error otherwise); a tiny temperature is near-greedy, not NaN probabilities."""
    for bad in (dict(stop=[""]), dict(stop=["ok", ""]), dict(stop=[5]), dict(temperature=float("nan")),
                dict(repetition_penalty=float("nan")), dict(seed=-1)):
        with pytest.raises(BitLLMError):
            SamplingParams(**bad)
    x = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    for t in (1e-5, 1e-40, 1e-300):
        assert sample(x, SamplingParams(temperature=t, top_p=0.9), np.empty(0, np.int64), rng) == 1


def test_generate_frees_cache_slots_on_error(llm):
    """A prompt that fails after others were queued (or any error mid-run) leaves no KV cache slot."""
    eng = llm.backend.engine
    base = eng.num_sequences()
    with pytest.raises(BitLLMError, match="context is 128"):
        llm.generate([[1, 2, 3], list(range(3, 200))], max_new_tokens=4)
    assert eng.num_sequences() == base


def test_batch_add_step_cancel(llm):
    """Sequences join and leave between steps; per-sequence settings; cancel frees the cache slot."""
    solo = llm.generate("the quick", max_new_tokens=10, ignore_eos=True).token_ids
    b = llm.batch()
    eng = llm.backend.engine
    base = eng.num_sequences()
    a = b.add(llm.encode("the quick"), SamplingParams(max_new_tokens=10, ignore_eos=True))
    c = b.add(llm.encode("a bit of text"), SamplingParams(max_new_tokens=50, temperature=1.0, seed=1, ignore_eos=True))
    ev = b.step()
    assert {e.seq_id for e in ev} == {a, c} and eng.num_sequences() == base + 2
    b.step()
    d = b.add(llm.encode("the quick"), SamplingParams(max_new_tokens=10, ignore_eos=True))  # joins mid-run
    b.step()
    b.cancel(c)
    assert b.seqs[c].finish_reason == "cancelled" and eng.num_sequences() == base + 2
    b.run()
    assert b.seqs[a].generated == solo and b.seqs[d].generated == solo
    assert eng.num_sequences() == base


@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_batched_step_logits_equal_solo(text_model, kv_dtype):
    """One step of 6 sequences (the head takes 4 rows at a time, then 2 alone; every kernel sees M = 6)
    gives each sequence exactly the logits it gets alone: batching changes no arithmetic."""
    be = LLM(text_model, threads=2, kv_dtype=kv_dtype).backend
    prompts = [[1, 5 + i, 9, 13 + 2 * i][: 2 + i % 3] for i in range(6)]
    slots = [be.open(16) for _ in prompts]
    be.forward(slots, prompts)
    together = be.forward(slots, [[7 + i] for i in range(6)])
    for s in slots:
        be.close(s)
    for i, p in enumerate(prompts):
        s = be.open(16)
        be.forward([s], [p])
        alone = be.forward([s], [[7 + i]])
        be.close(s)
        assert np.array_equal(alone[0], together[i]), i


def test_eos_stops(llm):
    eos = llm.eos_token_ids[0]
    b = llm.batch()
    s = b.add(llm.encode("the"), SamplingParams(max_new_tokens=40, stop_token_ids=(llm.generate("the", max_new_tokens=3, ignore_eos=True).token_ids[2],)))
    b.run()
    assert b.seqs[s].finish_reason == "stop" and len(b.seqs[s].generated) <= 3
    assert eos == 2


# --- scoring -------------------------------------------------------------------------------------


def test_loglikelihood_matches_hf_reference(text_model, llm):
    ref = from_pretrained(text_model)
    pairs = [([1, 5, 9, 13], [21, 40, 7]), ([1, 44], [3, 3, 3, 9, 10]), ([1] + list(range(60, 90)), [91])]
    got = llm.loglikelihood(pairs, max_batch_tokens=20)  # forces two batches
    with kernel_mode("reference"), torch.inference_mode():
        for (ctx, cont), (lp, greedy) in zip(pairs, got):
            logits = ref(torch.tensor([ctx + cont])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[len(ctx) - 1: -1]
            want = float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())
            assert lp == pytest.approx(want, abs=1e-3)
            assert greedy == bool((logits[len(ctx) - 1: -1].argmax(-1) == torch.tensor(cont)).all())
    text = llm.loglikelihood([("the quick brown", " fox"), ("", "the")])
    assert all(lp < 0 for lp, _ in text)


def test_loglikelihood_text_boundary_as_lm_eval(text_model, llm):
    """Text pairs split as lm-eval's _encode_pair does: trailing context spaces move to the continuation,
    and an empty context is BOS + the continuation without the BOS a tokenizer adds on its own."""
    from tokenizers.processors import TemplateProcessing

    enc = llm.tokenizer.encode
    (lp, _), = llm.loglikelihood([("the quick ", "brown")])
    (want, _), = llm.loglikelihood([(enc("the quick"), enc(" brown"))])
    assert lp == want
    tok = _tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    bos_llm = LLM(text_model, threads=1, tokenizer=tok)
    assert bos_llm.encode("the quick")[0] == 1
    (lp, _), = bos_llm.loglikelihood([("", "the quick")])
    (want, _), = bos_llm.loglikelihood([([1], enc("the quick"))])
    assert lp == want


def test_logprobs_are_the_reference_models(text_model, llm):
    """logprobs / prompt_logprobs: each position's token and top-n alternatives under the model's own
    distribution (log-softmax of the HF reference path's logits), generated tokens and prompt alike."""
    prompt = [1, 5, 9, 13, 21, 40]
    out = llm.generate(prompt, max_new_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    assert len(out.logprobs) == len(out.token_ids) == 6 and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    ref = from_pretrained(text_model)
    with kernel_mode("reference"), torch.inference_mode():
        logp = torch.log_softmax(ref(torch.tensor([prompt + out.token_ids])).logits[0].double(), -1)
    seq = prompt + out.token_ids
    records = out.prompt_logprobs[1:] + out.logprobs  # record k is position k + 1, predicted by row k
    for k, rec in enumerate(records):
        assert rec.token == seq[k + 1]
        assert rec.logprob == pytest.approx(float(logp[k, seq[k + 1]]), abs=1e-3)
        n = 2 if k + 1 < len(prompt) else 3
        assert len(rec.top) == n and [lp for _, lp in rec.top] == sorted((lp for _, lp in rec.top), reverse=True)
        want = torch.topk(logp[k], n).values.tolist()
        assert [lp for _, lp in rec.top] == pytest.approx(want, abs=1e-3)
        assert all(lp == pytest.approx(float(logp[k, t]), abs=1e-3) for t, lp in rec.top)
    # greedy: each generated token is its position's most likely one
    assert all(rec.token == rec.top[0][0] or rec.logprob == pytest.approx(rec.top[0][1]) for rec in out.logprobs)
    assert llm.generate(prompt, max_new_tokens=2).logprobs is None  # not asked for: not recorded


def test_prompt_logprobs_in_chunks_and_scoring_only(llm, monkeypatch):
    """A long prompt that records log-probabilities is fed in chunks (steps with no token); the
    records and the continuation do not depend on the chunking. max_new_tokens=0 scores the prompt
    only (echo + logprobs in the server), the same as loglikelihood."""
    import bitllm.engine.batch as batch_mod

    prompt = [1] + list(range(60, 80))
    whole = llm.generate(prompt, max_new_tokens=3, ignore_eos=True, logprobs=0, prompt_logprobs=1)
    monkeypatch.setattr(batch_mod, "PROMPT_LOGPROBS_CHUNK", 6)
    b = llm.batch()
    sid = b.add(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=0, prompt_logprobs=1))
    tokens = []
    while b.live:
        tokens += [ev.token for ev in b.step()]
    assert tokens[:3] == [None] * 3 and tokens[3:] == whole.token_ids  # 21 prompt tokens: 4 chunks of <= 6
    seq = b.seqs[sid]
    assert [r and r.token for r in seq.prompt_logprobs] == [r and r.token for r in whole.prompt_logprobs]
    assert [r.logprob for r in seq.prompt_logprobs[1:]] == pytest.approx([r.logprob for r in whole.prompt_logprobs[1:]], abs=1e-4)
    assert [r.top[0][0] for r in seq.prompt_logprobs[1:]] == [r.top[0][0] for r in whole.prompt_logprobs[1:]]
    assert [r.logprob for r in seq.logprobs] == pytest.approx([r.logprob for r in whole.logprobs], abs=1e-4)
    assert all(r.top == [] for r in seq.logprobs)  # logprobs=0: the token's own only
    scored = llm.generate(prompt, max_new_tokens=0, prompt_logprobs=0)
    assert scored.token_ids == [] and scored.finish_reason == "length" and len(scored.prompt_logprobs) == len(prompt)
    (lp, _), = llm.loglikelihood([(prompt[:5], prompt[5:])])
    assert sum(r.logprob for r in scored.prompt_logprobs[5:]) == pytest.approx(lp, abs=1e-4)
    assert llm.backend.engine.num_sequences() == 0


def test_scored_prompts_share_one_chunk_of_rows_per_step(llm, monkeypatch):
    """Every scored prompt token needs a vocabulary-sized logits row, so the scored prompts of one
    step share PROMPT_LOGPROBS_CHUNK rows (oldest first; the others sit the step out), whatever the
    batch size; a decoding sequence still steps each time, and every record is as when run alone."""
    import bitllm.engine.batch as batch_mod

    prompts = [[1] + list(range(40 + 7 * i, 53 + 7 * i)) for i in range(4)]  # 14 tokens each
    solo = [llm.generate(p, max_new_tokens=2, ignore_eos=True, logprobs=1, prompt_logprobs=1) for p in prompts]
    decoding = llm.generate([1, 2, 3], max_new_tokens=12, ignore_eos=True)
    monkeypatch.setattr(batch_mod, "PROMPT_LOGPROBS_CHUNK", 6)
    b = llm.batch()
    forward, rows = b.backend.forward, []

    def counted(slots, tokens, all_logits=False, last=None):
        out = forward(slots, tokens, all_logits, last)
        rows.append(len(out))
        return out

    monkeypatch.setattr(b.backend, "forward", counted)
    dec = b.add([1, 2, 3], SamplingParams(max_new_tokens=12, ignore_eos=True))
    ids = [b.add(p, SamplingParams(max_new_tokens=2, ignore_eos=True, logprobs=1, prompt_logprobs=1)) for p in prompts]
    b.run()
    assert max(rows) <= 6 + len(prompts)  # a chunk of scored rows + a row per other sequence (not 4 x 6 + 1)
    assert b.seqs[dec].generated == decoding.token_ids
    for sid, want in zip(ids, solo):
        seq = b.seqs[sid]
        assert seq.generated == want.token_ids
        assert [r and r.token for r in seq.prompt_logprobs] == [r and r.token for r in want.prompt_logprobs]
        assert [r.logprob for r in seq.prompt_logprobs[1:] + seq.logprobs] == pytest.approx(
            [r.logprob for r in want.prompt_logprobs[1:] + want.logprobs], abs=1e-4)


def test_token_logprobs_take_few_rows_to_float64_at_once():
    """Records of a 256-row chunk: the same values as one float64 log-softmax over all rows, without
    float64 copies of all of them (about 6x the fp32 logits) at once."""
    import tracemalloc

    from bitllm.engine.sampling import token_logprobs

    rows = np.random.default_rng(0).normal(size=(256, 4096)).astype(np.float32) * 4  # (rows, vocab)
    tokens = list(range(256))
    tracemalloc.start()
    try:
        records = token_logprobs(rows, tokens, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < rows.nbytes
    x = rows.astype(np.float64)
    logp = x - (x.max(1, keepdims=True) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)))
    assert [r.logprob for r in records] == pytest.approx(logp[np.arange(256), tokens].tolist(), abs=1e-9)
    assert [r.top[0][0] for r in records] == logp.argmax(1).tolist()


@pytest.mark.parametrize("field, value", [("logprobs", -1), ("prompt_logprobs", True), ("logprobs", 1.5)])
def test_logprobs_settings_are_checked(field, value):
    with pytest.raises(BitLLMError, match=field):
        SamplingParams(**{field: value})


# --- fallback ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_fallback_runs_through_transformers(tmp_path, capfd, family):
    from bitllm.tiny import tiny_model

    model = tiny_model(family, seed=0)
    bitllm.quantize_(model, config_for("ternary"))
    d = save_pretrained(model, tmp_path / family, "t1")
    llm = LLM(d)  # default threads: leaves torch's pool as the process had it
    err = capfd.readouterr().err
    assert llm.backend_name == "hf" and "native engine does not run this model" in err and len(err.strip().splitlines()) == 1
    out = llm.generate([1, 5, 9], max_new_tokens=6, ignore_eos=True)
    with kernel_mode("native"):
        toks, _ = hf_greedy(from_pretrained(d), [1, 5, 9], 6)
    assert out.token_ids == toks
    # scoring runs the LM head only over the continuation's rows (logits_to_keep): same numbers as
    # the full logits of the same model
    pairs = [([1, 5, 9], toks[:2]), ([1, 7], [3, 4, 5, 6])]
    got = llm.loglikelihood(pairs, max_batch_tokens=6)
    with kernel_mode("native"), torch.inference_mode():
        ref = from_pretrained(d)
        for (ctx, cont), (lp, greedy) in zip(pairs, got):
            logits = ref(torch.tensor([ctx + cont])).logits[0].double()
            want = torch.log_softmax(logits, -1)[len(ctx) - 1: -1][torch.arange(len(cont)), torch.tensor(cont)].sum()
            assert lp == pytest.approx(float(want), abs=1e-4)
            assert greedy == bool((logits[len(ctx) - 1: -1].argmax(-1) == torch.tensor(cont)).all())
    with pytest.raises(UnsupportedModelError, match="model_type"):
        LLM(d, backend="native")
    capfd.readouterr()
    LLM(d, backend="hf", kv_dtype="f16")  # a native-only option: said so, not silently dropped
    assert "apply to the native engine only" in capfd.readouterr().err
    with pytest.raises(BitLLMError, match="kv_dtype"):
        LLM(d, backend="hf", kv_dtype="int4")


# --- bad input ---------------------------------------------------------------------------------------


def _edit_config(directory, **fields):
    p = directory / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in fields.items():
        cfg[k] = v
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("family,field,value", [
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    ("llama", "hidden_act", "gelu_fast"),
    ("phi", "qk_layernorm", True),
])
def test_unsupported_config_field_is_named(tmp_path, family, field, value):
    d = _save(tmp_path / "m", family=family)
    _edit_config(d, **{field: value})
    with pytest.raises(UnsupportedModelError, match=field.split(".")[0]):
        LLM(d, backend="native")


def test_prompt_longer_than_context(text_model):
    llm = LLM(text_model, threads=1, max_context=16)
    with pytest.raises(BitLLMError, match="context is 16"):
        llm.generate(list(range(3, 40)), max_new_tokens=4)
    out = llm.generate(list(range(3, 12)), max_new_tokens=50, ignore_eos=True)  # stops at the context
    assert out.finish_reason == "length" and len(out.token_ids) == 16 - 9
    with pytest.raises(BitLLMError, match="outside the vocabulary"):
        llm.generate([VOCAB + 5], max_new_tokens=2)


def test_nan_logits_are_reported(tmp_path):
    def blow_up(model):
        with torch.no_grad():
            model.model.norm.weight.fill_(3e38)  # finite in the file, overflows to inf in the head

    llm = LLM(_save(tmp_path / "m", mutate=blow_up), threads=1)
    with pytest.raises(BitLLMError, match="non-finite logits"):
        llm.generate([1, 2, 3], max_new_tokens=2)


def test_corrupt_packed_weight_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _save(tmp_path / "m", method="ternary", fmt="t1")
    f = d / "model.safetensors"
    tensors = load_file(f)
    from safetensors import safe_open

    with safe_open(f, "pt") as h:
        meta = h.metadata()
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key][3, 2] = 250  # > 242: not a base-3 byte
    save_file(tensors, f, metadata=meta)
    with pytest.raises(FormatError, match="up_proj"):
        LLM(d, backend="native")


def test_tokenizer_free_model_takes_ids_only(tmp_path):
    llm = LLM(_save(tmp_path / "m"), threads=1)
    assert llm.tokenizer is None
    assert len(llm.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True).token_ids) == 3
    assert all(isinstance(t, int) for t in llm.stream([1, 2, 3], max_new_tokens=3, ignore_eos=True))
    with pytest.raises(BitLLMError, match="no tokenizer"):
        llm.generate("text", max_new_tokens=2)


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_hf_bitnet_scale_conventions(tmp_path, linear_class):
    """transformers' BitNet layout: 'bitlinear' stores 1/mean|W| (divide), 'autobitlinear' mean|W|."""
    model = _scaled_tiny("bitnet", 0, 64, VOCAB)
    bitllm.quantize_(model, config_for("ternary"))
    d = save_pretrained(model, tmp_path / linear_class, "i2", linear_class=linear_class)
    assert json.loads((d / "config.json").read_text())["quantization_config"]["linear_class"] == linear_class
    with kernel_mode("reference"):
        toks, _ = hf_greedy(from_pretrained(d), [1, 5, 9], 12)
    assert LLM(d, threads=1).generate([1, 5, 9], max_new_tokens=12, ignore_eos=True).token_ids == toks


# --- API edges -------------------------------------------------------------------------------------


def test_generate_takes_1d_tensors_and_arrays(llm):
    ids = llm.encode("the quick brown")
    want = llm.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids
    for prompt in (torch.tensor(ids), np.array(ids, dtype=np.int32)):  # one prompt of token ids
        out = llm.generate(prompt, max_new_tokens=6, ignore_eos=True)
        assert isinstance(out, str) and out.token_ids == want
    rows = llm.generate(torch.tensor([ids, ids]), max_new_tokens=6, ignore_eos=True)  # (B, T): a prompt per row
    assert [r.token_ids for r in rows] == [want, want]


def test_stream_validates_at_the_call(llm):
    """Bad settings and prompts raise when stream() is called, and an unstarted stream holds no KV slot."""
    import inspect

    eng = llm.backend.engine
    base = eng.num_sequences()
    for kwargs in (dict(top_p=0), dict(temperature=-1), dict(max_new_tokens=-1)):
        with pytest.raises(BitLLMError):
            llm.stream("the quick", **kwargs)
    with pytest.raises(BitLLMError, match="context is 128"):
        llm.stream(list(range(3, 200)))
    with pytest.raises(BitLLMError, match="outside the vocabulary"):
        llm.stream([VOCAB + 5])
    g = llm.stream("the quick", max_new_tokens=4, ignore_eos=True)
    assert inspect.isgenerator(g) and eng.num_sequences() == base
    assert "".join(g) == llm.generate("the quick", max_new_tokens=4, ignore_eos=True)
    assert eng.num_sequences() == base


STRICT_TEMPLATE = (  # as Llama 2 / Mistral templates: an optional system message, then user/assistant/user/...
    "{% set turns = messages[1:] if messages[0]['role'] == 'system' else messages %}"
    "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% endfor %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_trims_whole_exchanges(text_model, monkeypatch):
    """A history past the context loses its oldest user+assistant exchanges, never half of one: the
    system message stays and the turns still alternate, so a strict template accepts the result."""
    tok = _tokenizer()
    tok.chat_template = STRICT_TEMPLATE
    llm = LLM(text_model, threads=1, max_context=64, tokenizer=tok)
    system = {"role": "system", "content": "be brief"}
    history = [system]
    for i in range(6):
        history += [{"role": "user", "content": f"tell me about bits and bytes {i}"},
                    {"role": "assistant", "content": f"ternary models, binary models {i}"}]
    history.append({"role": "user", "content": "and the lazy dog?"})
    assert len(llm.chat_ids(history)) > 64
    sent = []
    chat_ids = llm.chat_ids
    monkeypatch.setattr(llm, "chat_ids", lambda m: sent.append(m) or chat_ids(m))
    out = llm.chat(history, max_new_tokens=2, ignore_eos=True)
    kept = sent[-1]
    assert kept[0] == system and kept[1]["role"] == "user" and kept[-1] == history[-1]
    assert kept == [system] + history[len(history) - len(kept) + 1:]  # a suffix of whole exchanges
    assert len(kept) < len(history) and out.prompt_tokens == len(chat_ids(kept)) < 63
    assert len(chat_ids([system] + history[len(history) - len(kept) - 1:])) + 1 >= 64  # one more exchange won't fit


def test_hf_backend_opens_slots_under_a_lock():
    """The transformers fallback hands out slots from any thread (server, scoring), as NativeBackend does."""
    import threading
    from types import SimpleNamespace

    from bitllm.engine.llm import HFBackend

    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=8)))
    be = HFBackend(model, 32)
    got = []
    with be._lock:  # held elsewhere: open waits for it
        t = threading.Thread(target=lambda: got.append(be.open(8)))
        t.start()
        t.join(0.2)
        assert t.is_alive() and not got
    t.join(5)
    assert got == [0]
    threads = [threading.Thread(target=lambda: got.extend(be.open(8) for _ in range(200))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(got) == list(range(801))
    be.close(0)
    assert 0 not in be._caches and len(be._caches) == 800
