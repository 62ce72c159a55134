"""The OpenAI-compatible server, driven by the real `openai` client and raw httpx on loopback.

Each test starts the app in a background thread on a free 127.0.0.1 port and stops it at the end.
The model is a tiny random ternary llama (I2 checkpoint) with a byte-level BPE tokenizer and a chat
template; outputs are compared with the engine's own `LLM.generate` / `LLM.chat`, so the server
must be a transparent shell. Tests that need requests to overlap slow each engine step down.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import bitllm  # noqa: E402
from bitllm.serve import ServeConfig, Server  # noqa: E402
from serve_helpers import tiny_chat_checkpoint  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return bitllm.LLM(tiny_chat_checkpoint(tmp_path_factory.mktemp("serve") / "tiny"), threads=1)


@pytest.fixture(scope="module")
def server(llm):
    with Server(llm, ServeConfig(model_name="tiny", max_tokens=256, max_prompt_tokens=100)) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def slow(llm, monkeypatch):
    """Make every engine step take >= `delay` s, so that requests overlap on a fast tiny model."""
    forward = llm.backend.forward

    def set_delay(delay: float):
        def slow_forward(*a, **k):
            time.sleep(delay)
            return forward(*a, **k)

        monkeypatch.setattr(llm.backend, "forward", slow_forward)

    return set_delay


def metric(url: str, name: str, headers=None) -> float:
    text = httpx.get(url + "/metrics", headers=headers).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def wait_for(cond, timeout: float = 10.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.05)
    return False


# --- the OpenAI surface ------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["live"] == 0


def test_completion_matches_engine(llm, client):
    want = llm.generate("The quick brown", max_new_tokens=12, ignore_eos=False)
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens == len(llm.encode("The quick brown"))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ids = llm.encode("lazy dog")  # token-id prompts are accepted too
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0).choices[0].text == \
        llm.generate(ids, max_new_tokens=5)


def test_chat_matches_engine(llm, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Shall I compare thee?"}]
    want = llm.chat(messages, max_new_tokens=10)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(llm.chat_ids(messages))


def test_streaming(llm, server, client, slow):
    messages = [{"role": "user", "content": "A ternary weight is"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    slow(0.01)  # pieces that pile up before the client reads are sent as one chunk: make them not pile up
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    pieces = client.completions.create(model="tiny", prompt="The quick", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == llm.generate("The quick", max_new_tokens=10)
    # the raw wire format: one `data: {json}` line per event, ending with `data: [DONE]`
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "The quick", "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(ln[5:])["object"] == "text_completion" for ln in lines[:-1])


def test_stop_sequences(llm, client):
    full = llm.generate("In the beginning", max_new_tokens=24, ignore_eos=True)
    stop = full[6:9]
    assert len(stop) == 3
    want = llm.generate("In the beginning", max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert want == full[:full.find(stop)]
    r = client.completions.create(model="tiny", prompt="In the beginning", max_tokens=24, temperature=0,
                                  stop=[stop, "never-seen"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="In the beginning", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    # lm-eval's local-completions sends a task's whole `until` list and the EOS string (humaneval: 6)
    until = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "</s>", stop]
    r = client.completions.create(model="tiny", prompt="In the beginning", max_tokens=24, temperature=0, stop=until,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"


def test_sampling_seed_is_reproducible(client):
    kw = dict(model="tiny", prompt="0123", max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert a == client.completions.create(seed=7, **kw).choices[0].text


# --- log-probabilities, echo, tokenizer routes (lm-eval's local-completions) ----------------------


def _records(llm, ids, n, **kw):
    """The engine's own records for a greedy completion of `ids`."""
    out = llm.generate(ids, temperature=0.0, logprobs=n, **kw)
    return out, out.logprobs


def test_completion_logprobs_are_the_engines(llm, client):
    ids = llm.encode("the quick")
    want, records = _records(llm, ids, 3, max_new_tokens=6)
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == want and len(lp.tokens) == len(records) == r.usage.completion_tokens
    assert lp.token_logprobs == pytest.approx([rec.logprob for rec in records], abs=1e-9)
    for top, rec in zip(lp.top_logprobs, records):
        assert 1 <= len(top) <= 3 and set(top.values()) <= {lp for _, lp in rec.top}  # two tokens may share a text
        assert max(top.values()) == pytest.approx(rec.logprob)  # greedy: the chosen token is the most likely
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_completion_top_logprobs_hold_the_sampled_token(llm, client):
    """OpenAI's (and vLLM's) completions top_logprobs always hold the position's own token too, so there
    are up to logprobs + 1 entries: with logprobs 0 exactly the sampled token's (lm-eval reads
    max(top.values()) at every position)."""
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=6, temperature=1.0, seed=3,
                                  logprobs=0, echo=True)
    lp = r.choices[0].logprobs
    n = len(llm.encode("the quick"))
    assert lp.top_logprobs[0] is None and len(lp.tokens) == n + 6
    assert lp.top_logprobs[1:] == [{t: x} for t, x in zip(lp.tokens[1:], lp.token_logprobs[1:])]
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=6, temperature=1.0, seed=3, logprobs=1)
    for tok, x, top in zip(r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs,
                           r.choices[0].logprobs.top_logprobs):
        assert 1 <= len(top) <= 2 and top.get(tok, x) >= x and max(top.values()) >= x


def test_echo_scores_the_prompt_like_loglikelihood(llm, server):
    """lm-eval's local-completions request: token-id prompt, echo, logprobs 1, max_tokens 1; the
    prompt positions [ctx:-1] are the continuation's log-probabilities, as LLM.loglikelihood has them."""
    ctx, cont = llm.encode("the quick"), llm.encode(" brown fox", add_special_tokens=False)
    body = {"model": "tiny", "prompt": [ctx + cont], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "seed": 1234}
    choice = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ctx + cont) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    (want, greedy), = llm.loglikelihood([(ctx, cont)])
    assert sum(lp["token_logprobs"][len(ctx):-1]) == pytest.approx(want, abs=1e-4)
    assert greedy == all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(ctx):-1],
                                                                    lp["top_logprobs"][len(ctx):-1]))
    assert choice["text"].startswith(llm.decode(ctx + cont))
    # max_tokens 0: the prompt alone (no token generated), and echo without logprobs is just the text
    scored = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 0}).json()
    assert scored["usage"]["completion_tokens"] == 0 and len(scored["choices"][0]["logprobs"]["tokens"]) == len(ctx + cont)
    assert scored["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:-1], abs=1e-6)
    plain = httpx.post(server.url + "/v1/completions", json={"prompt": "the quick", "echo": True, "max_tokens": 0}).json()
    assert plain["choices"][0]["text"] == "the quick" and plain["choices"][0]["logprobs"] is None


def test_chat_logprobs_and_streamed_logprobs(llm, client):
    messages = [{"role": "user", "content": "hello"}]
    want, records = _records(llm, llm.chat_ids(messages), 2, max_new_tokens=5)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([rec.logprob for rec in records], abs=1e-9)
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    assert [t.logprob for c in content for t in c.top_logprobs] == pytest.approx(
        [lp for rec in records for _, lp in rec.top], abs=1e-9)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == [c.logprob for c in content]
    assert [c.token for c in streamed] == [c.token for c in content]
    # a completion stream with echo: the prompt (with its log-probabilities) is the first chunk
    chunks = list(client.completions.create(model="tiny", prompt="the quick", max_tokens=3, temperature=0, logprobs=1,
                                            echo=True, stream=True))
    first = chunks[0].choices[0]
    assert first.text == "the quick" and first.logprobs.token_logprobs[0] is None
    assert len(first.logprobs.tokens) == len(llm.encode("the quick"))


def test_several_prompts_and_n_choices(llm, server, client):
    """A list of prompts (lm-eval's batch_size > 1) and `n` choices per prompt: one sequence each in
    the running batch, choices indexed prompt * n + j; seeded samples differ between the n choices."""
    prompts = ["the quick", "a bit of", "models"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, logprobs=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for p, c in zip(prompts, r.choices):
        want = llm.generate(p, max_new_tokens=5, logprobs=1)
        assert c.text == want and c.logprobs.token_logprobs == pytest.approx([x.logprob for x in want.logprobs])
    assert r.usage.prompt_tokens == sum(len(llm.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == sum(len(llm.generate(p, max_new_tokens=5).token_ids) for p in prompts)
    ids = [llm.encode(p) for p in prompts[:2]]  # lm-eval sends token-id lists
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in r2.choices] == [c.text for c in r.choices[:2]]
    many = client.completions.create(model="tiny", prompt=prompts[:2], max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.index for c in many.choices] == list(range(6))
    assert len({c.text for c in many.choices[:3]}) > 1  # n samples, not n copies
    again = client.completions.create(model="tiny", prompt=prompts[:2], max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=1.0, seed=3, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.prompt_tokens == len(
        llm.chat_ids([{"role": "user", "content": "hi"}]))
    # streamed: chunks of both choices, each ending with its finish_reason
    chunks = list(client.completions.create(model="tiny", prompt=prompts[:2], max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts, finished = ["", ""], [None, None]
    for ch in chunks[:-1]:
        c = ch.choices[0]
        texts[c.index] += c.text
        finished[c.index] = c.finish_reason or finished[c.index]
    assert texts == [c.text for c in r.choices[:2]] and finished == ["length", "length"]
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == r2.usage.prompt_tokens
    assert server.app.state.engine.kv_sequences() == 0


def _spy_on_submissions(server, monkeypatch, field: str) -> list:
    """The `field` of every SamplingParams the server submits to its engine loop, in order."""
    seen: list = []
    submit_many = server.engine.submit_many

    def spy(jobs, *a, **k):
        seen.extend(getattr(params, field) for _, params in jobs)
        return submit_many(jobs, *a, **k)

    monkeypatch.setattr(server.engine, "submit_many", spy)
    return seen


def test_echoed_prompt_is_scored_once_for_n_choices(llm, server, monkeypatch):
    """With echo + logprobs and n > 1, only a prompt's first choice asks the engine for the prompt's
    log-probabilities; its other choices reuse those records (they depend only on the prompt), in
    their non-streamed answers and as the first chunk of their streams. The prompts are long enough
    that the last one's scoring waits a step while its other choices already decode."""
    from bitllm.engine.batch import PROMPT_LOGPROBS_CHUNK

    prompts = ["the quick brown fox jumps over the lazy dog " * 3, "a bit of text " * 9, "models and bytes " * 9]
    lengths = [len(llm.encode(p)) for p in prompts]
    assert sum(lengths) > PROMPT_LOGPROBS_CHUNK and max(lengths) <= 100
    asked = _spy_on_submissions(server, monkeypatch, "prompt_logprobs")
    body = {"prompt": prompts, "max_tokens": 1, "temperature": 1.0, "seed": 5, "echo": True, "logprobs": 2, "n": 3}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
    assert asked == [2, None, None] * 3  # one scored sequence per prompt
    fields = ("tokens", "token_logprobs", "top_logprobs", "text_offset")

    def prompt_part(choice, n):
        return {f: choice["logprobs"][f][:n] for f in fields}

    for p, (prompt, n) in enumerate(zip(prompts, lengths)):
        parts = [prompt_part(c, n) for c in r["choices"][3 * p: 3 * p + 3]]
        assert parts[0] == parts[1] == parts[2] and parts[0]["token_logprobs"][0] is None
        assert all(c["text"].startswith(prompt) for c in r["choices"][3 * p: 3 * p + 3])
        single = prompt_part(httpx.post(server.url + "/v1/completions", json={**body, "prompt": prompt, "n": 1},
                                        timeout=30).json()["choices"][0], n)
        assert parts[0]["tokens"] == single["tokens"] and parts[0]["text_offset"] == single["text_offset"]
        assert parts[0]["token_logprobs"][1:] == pytest.approx(single["token_logprobs"][1:], abs=1e-5)
        for got, want in zip(parts[0]["top_logprobs"][1:], single["top_logprobs"][1:]):
            assert got == pytest.approx(want, abs=1e-5)
    # streamed: each choice's first chunk is its echoed prompt with the shared records, then its own text
    asked.clear()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        chunks = [json.loads(ln[5:])["choices"][0] for ln in s.iter_lines()
                  if ln.startswith("data:") and ln != "data: [DONE]"]
    assert asked == [2, None, None] * 3
    for k, c in enumerate(r["choices"]):
        mine = [ch for ch in chunks if ch["index"] == k]
        n = lengths[k // 3]
        assert mine[0]["text"] == prompts[k // 3] and mine[0]["logprobs"] == prompt_part(c, n)
        assert "".join(ch["text"] for ch in mine) == c["text"]


def test_a_failed_step_fails_every_choice(llm, server, slow):
    """A request's choices stand or fall together: an engine step that fails gives one clean 500 and
    frees every sequence's cache slot."""
    slow(0.02)
    forward = llm.backend.forward

    def fail_long(slots, tokens, *a, **k):
        if any(len(t) > 3 for t in tokens):
            raise RuntimeError("boom")
        return forward(slots, tokens, *a, **k)

    import unittest.mock as mock

    with mock.patch.object(llm.backend, "forward", fail_long):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": [[5, 6], [5, 6, 7, 8, 9]], "max_tokens": 4},
                       timeout=30)
    assert r.status_code == 500 and "internal" in r.json()["error"]["message"]
    time.sleep(0.3)
    assert server.app.state.engine.kv_sequences() == 0


def test_token_ids_are_json_integers(server):
    """JSON true/false and 1.0 are not token ids, though pydantic's lax mode would read them as 1, 0
    and 1 (and "1" as 1): a 400 naming the value, like any malformed field."""
    url = server.url
    for prompt, bad in [([True, 5], "true"), ([[1, False]], "false"), ([1.0, 2], "1.0"), ([[5, 6], [7, 2.0]], "2.0"),
                        ([1, "2"], '"2"')]:
        for stream in (False, True):
            err = error_of(httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1,
                                                                     "stream": stream}), 400)
            assert err["param"] == "prompt" and f"{bad} is not a token id" in err["message"], err
    for tokens in ([True], [1, 1.0]):
        err = error_of(httpx.post(url + "/detokenize", json={"tokens": tokens}), 400)
        assert err["param"].startswith("tokens") and "integer" in err["message"]
    assert httpx.post(url + "/v1/completions", json={"prompt": [[5, 6], [7]], "max_tokens": 1}).status_code == 200


def test_logprobs_bad_input(server):
    url, user = server.url, [{"role": "user", "content": "x"}]
    for extra in ({"logprobs": 21}, {"logprobs": -1}, {"logprobs": True}, {"logprobs": "2"}):
        assert error_of(httpx.post(url + "/v1/completions", json={"prompt": "x", **extra}), 400)["param"] == "logprobs"
    err = error_of(httpx.post(url + "/v1/chat/completions", json={"messages": user, "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs"
    assert error_of(httpx.post(url + "/v1/chat/completions", json={"messages": user, "logprobs": True,
                                                                   "top_logprobs": 50}), 400)["param"] == "top_logprobs"
    assert error_of(httpx.post(url + "/detokenize", json={"tokens": [1, 10**6]}), 400)["param"] == "tokens"
    assert error_of(httpx.post(url + "/tokenize", json={}), 400)["param"] == "prompt"
    assert error_of(httpx.post(url + "/tokenize", json={"prompt": "x", "messages": user}), 400)["param"] == "prompt"


def test_tokenizer_routes(llm, server):
    url = server.url
    r = httpx.post(url + "/tokenize", json={"prompt": "the quick fox", "add_special_tokens": False}).json()
    assert r["tokens"] == llm.encode("the quick fox", add_special_tokens=False) and r["count"] == len(r["tokens"])
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == llm.chat_ids([{"role": "user", "content": "hi"}])
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "the quick fox"}
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == llm.tokenizer.eos_token and info["chat_template"] == llm.tokenizer.chat_template


def test_lm_eval_local_completions_scores_like_the_engine(llm, server):
    """lm-eval's own API model against the server, its tokenizer fetched from the server's /tokenize
    routes (auto-detected): log-likelihoods and greedy flags as bitllm's LLM.loglikelihood gives."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", max_retries=1)
    assert lm.tokenizer_backend == "remote"
    pairs = [("the quick", " brown fox"), ("a bit of", " text"), ("models", " and bytes")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    want = llm.loglikelihood([(llm.encode(c, add_special_tokens=False), llm.encode(x, add_special_tokens=False))
                              for c, x in pairs])
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    assert [g for _, g in got] == [g for _, g in want]


# --- safety ---------------------------------------------------------------------------------------


def test_api_key(llm):
    with Server(llm, ServeConfig(model_name="tiny", api_key=KEY)) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                             ("GET", "/tokenizer_info")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = httpx.request(method, s.url + path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_malformed_requests(server, client):
    url = server.url
    bad_json = httpx.post(url + "/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert "JSON" in error_of(bad_json, 400)["message"]
    assert error_of(httpx.post(url + "/v1/completions", json={"max_tokens": 3}), 400)["param"] == "prompt"
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": "x", "temperature": 9}), 400)["param"] == "temperature"
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": -1}), 400)["param"] == "max_tokens"
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 10_000}), 400)["param"] == "max_tokens"
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 0}), 400)["param"] == "n"
    assert "at most 64" in error_of(httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 65}), 400)["message"]
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": ["x"] * 65}), 400)["param"] == "prompt"
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": ["x", ""]}), 400)["message"] == "prompt 1 is empty"
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": ""}), 400)["param"] == "prompt"
    assert error_of(httpx.post(url + "/v1/completions", json={"prompt": [1, 99999]}), 400)["message"]
    assert error_of(httpx.post(url + "/v1/chat/completions", json={"messages": []}), 400)["param"] == "messages"
    assert error_of(httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    long = error_of(httpx.post(url + "/v1/completions", json={"prompt": "word " * 300}), 400)
    assert long["code"] == "context_length_exceeded" and "at most 100" in long["message"]
    big = httpx.post(url + "/v1/completions", json={"prompt": "x" * (2 << 20)})
    assert error_of(big, 413)["code"] == "request_too_large"
    assert error_of(httpx.get(url + "/v1/nothing"), 404)["type"] == "not_found_error"
    llm = server.app.state.llm
    template = llm.tokenizer.chat_template
    llm.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    try:
        err = error_of(httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 400)
        assert "roles must alternate" in err["message"] and err["param"] == "messages"
    finally:
        llm.tokenizer.chat_template = template
    with pytest.raises(openai.BadRequestError, match="at most 16 stop"):
        client.completions.create(model="tiny", prompt="x", stop=[f"s{i}" for i in range(17)])


def test_too_many_choices_are_refused_before_tokenizing(llm, server, monkeypatch):
    """A 1 MiB body holds 100k+ prompts: the prompts x n limit is checked before any is tokenized."""
    calls = []
    encode = llm.encode
    monkeypatch.setattr(llm, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    err = error_of(httpx.post(server.url + "/v1/completions", json={"prompt": ["x"] * 20_000}), 400)
    assert err["param"] == "prompt" and "at most 64" in err["message"] and calls == []
    assert error_of(httpx.post(server.url + "/v1/completions", json={"prompt": ["x"] * 2, "n": 40}), 400)["param"] == "n"
    assert calls == []


def test_prompt_records_are_shaped_off_the_event_loop(server, monkeypatch):
    """Shaping a long echoed prompt's records takes a tokenizer call per token and alternative (up to
    21 x the context, per choice): it runs in a worker thread, and other clients are answered meanwhile."""
    import bitllm.serve.app as app_mod

    entered, token_strings = threading.Event(), app_mod.token_strings

    def slow_token_strings(tok, ids, start=0, alternatives=None):
        if start == 0:  # the prompt's
            entered.set()
            time.sleep(1.5)
        return token_strings(tok, ids, start, alternatives)

    monkeypatch.setattr(app_mod, "token_strings", slow_token_strings)
    got = {}
    scoring = threading.Thread(target=lambda: got.setdefault("r", httpx.post(
        server.url + "/v1/completions", json={"prompt": "the quick", "max_tokens": 0, "echo": True, "logprobs": 1},
        timeout=30)))
    scoring.start()
    try:
        assert entered.wait(10)
        assert httpx.get(server.url + "/health", timeout=0.75).status_code == 200
    finally:
        scoring.join(30)
    assert got["r"].status_code == 200 and got["r"].json()["choices"][0]["logprobs"]["tokens"]


def test_null_means_not_given(server):
    """OpenAI's optional fields are nullable; clients that serialize every field send `null`."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stop", "seed", "logprobs", "presence_penalty",
                           "frequency_penalty", "stream_options", "echo", "best_of", "suffix"])
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": None, "max_completion_tokens": 2, "stream": True,
        "stream_options": {"include_usage": None}, "tools": None, "response_format": None, "logit_bias": None})
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]") and '"usage"' not in r.text


def test_negative_seed_is_a_seed(client):
    kw = dict(model="tiny", prompt="0123", max_tokens=8, temperature=1.0, seed=-1)  # e.g. SillyTavern sends -1
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text


def test_fields_that_change_the_answer_are_refused(server, client):
    url, user = server.url, [{"role": "user", "content": "x"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for path, extra, param in [
        ("/v1/chat/completions", {"tools": [tool]}, "tools"),
        ("/v1/chat/completions", {"functions": [tool["function"]]}, "functions"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"logit_bias": {"50": 100}}, "logit_bias"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
    ]:
        body = {"messages": user} if "chat" in path else {"prompt": "x"}
        assert error_of(httpx.post(url + path, json={**body, "max_tokens": 2, **extra}), 400)["param"] == param
    with pytest.raises(openai.BadRequestError, match="tool"):
        client.chat.completions.create(model="tiny", messages=user, max_tokens=2, tools=[tool])
    # harmless ones still work: empty lists and maps, plain text format, bookkeeping fields
    r = client.chat.completions.create(model="tiny", messages=user, max_tokens=2, tools=[], logit_bias={},
                                       response_format={"type": "text"}, user="u1", metadata={"k": "v"})
    assert r.usage.completion_tokens == 2


def test_body_errors(server):
    url = server.url + "/v1/completions"

    def chunks():  # no content-length: the limit must hold while the body streams in
        yield b'{"prompt": "' + b"x" * (1 << 20)
        yield b'"}'

    big = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert error_of(big, 413)["code"] == "request_too_large"
    form = httpx.post(url, content=b'{"prompt": "x"}', headers={"content-type": "application/x-www-form-urlencoded"})
    assert "Content-Type: application/json" in error_of(form, 400)["message"]  # curl -d without -H
    streamed = httpx.post(url, json={"prompt": [1, 99999], "stream": True})  # refused before a 200 goes out
    assert error_of(streamed, 400)["param"] == "prompt"
    chat = httpx.post(server.url + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10_000})
    assert error_of(chat, 400)["param"] == "max_completion_tokens"


def test_model_lookup_and_name(client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")
    # any requested name is answered by the served model, and the answer says which model that was
    assert client.completions.create(model="gpt-4o", prompt="x", max_tokens=1).model == "tiny"


def test_chat_without_template_ends_the_turn_like_llm_chat(llm, server, client, monkeypatch):
    """A model without a chat template sees a "User: ... Assistant:" transcript; as in LLM.chat, the
    answer must stop at the next "\nUser:" instead of writing the user's turns too."""
    seen = _spy_on_submissions(server, monkeypatch, "stop")
    monkeypatch.setattr(llm.tokenizer, "chat_template", None)
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stop="zz")
    assert seen == [("zz", "\nUser:")]
    assert r.choices[0].message.content == llm.chat(messages, max_new_tokens=8, stop=["zz"])


def test_internal_errors_are_clean_500(llm, server, client, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret detail /home/x/file.py line 3")

    monkeypatch.setattr(llm, "encode", boom)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hello"})
    err = error_of(r, 500)
    assert err["type"] == "server_error" and "secret" not in r.text and "Traceback" not in r.text
    monkeypatch.undo()
    monkeypatch.setattr(llm.backend, "forward", boom)  # the engine loop itself fails mid-step
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4})
    assert error_of(r, 500)["type"] == "server_error" and "secret" not in r.text
    monkeypatch.undo()
    assert client.completions.create(model="tiny", prompt="hello", max_tokens=4).usage.completion_tokens >= 1  # still serving


# --- concurrency ------------------------------------------------------------------------------------


def test_concurrent_requests_share_steps(llm, slow):
    """Concurrent requests decode in the same batched steps, with the same greedy output as alone."""
    prompts = ["The quick", "Binary weights", "Thou art", "0123456789"]
    want = [llm.generate(p, max_new_tokens=16, ignore_eos=True) for p in prompts]
    slow(0.01)
    with Server(llm, ServeConfig(model_name="tiny")) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=30)
        got = [None] * len(prompts)

        def one(i):
            got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert got == want
        count = metric(s.url, "bitllm_batch_size_count")
        singles = metric(s.url, 'bitllm_batch_size_bucket{le="1"}')
        assert metric(s.url, "bitllm_batch_size_sum") == 4 * 16  # one token per sequence per step
        assert count - singles >= 8, "requests did not share engine steps"


def test_overload_answers_429(llm, slow):
    slow(0.02)
    with Server(llm, ServeConfig(model_name="tiny", max_batch=1, max_queue=1)) as s:
        body = {"prompt": "x", "max_tokens": 250, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as first:  # decoding
            lines = first.iter_lines()  # keep a reference: a dropped iterator closes the response
            next(lines)
            with httpx.stream("POST", s.url + "/v1/completions", json=body) as second:  # waiting
                assert second.status_code == 200
                assert wait_for(lambda: httpx.get(s.url + "/health").json()["waiting"] == 1)
                third = httpx.post(s.url + "/v1/completions", json=body)
                err = error_of(third, 429)
                assert err["type"] == "rate_limit_error" and int(third.headers["retry-after"]) >= 1
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
                        model="tiny", prompt="x", max_tokens=3)
        assert metric(s.url, "bitllm_rejected_total") == 2
        assert wait_for(lambda: s.engine.kv_sequences() == 0)


def test_disconnect_cancels_and_frees_kv(llm, slow):
    slow(0.02)
    with Server(llm, ServeConfig(model_name="tiny")) as s:
        body = {"prompt": "The quick", "max_tokens": 250, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            assert s.engine.kv_sequences() == 1
        # the client closed the stream after one chunk: its sequence is cancelled, its KV slot freed
        assert wait_for(lambda: s.engine.kv_sequences() == 0 and metric(s.url, "bitllm_cancelled_total") == 1)
        assert metric(s.url, "bitllm_completion_tokens_total") < 100
        # a non-streaming client that gives up (read timeout) is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 250, "ignore_eos": True}, timeout=0.5)
        assert wait_for(lambda: s.engine.kv_sequences() == 0 and metric(s.url, "bitllm_cancelled_total") == 2)
        assert httpx.get(s.url + "/health").json()["live"] == 0
        # several choices (2 prompts x n = 2): all four are cancelled when the client goes away
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "prompt": ["a", "b"], "n": 2}) as r:
            next(r.iter_lines())
            assert wait_for(lambda: s.engine.kv_sequences() == 4)
        assert wait_for(lambda: s.engine.kv_sequences() == 0 and metric(s.url, "bitllm_cancelled_total") == 6)


def test_request_timeout(llm, slow):
    slow(0.02)
    with Server(llm, ServeConfig(model_name="tiny", timeout=0.3)) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 200, "ignore_eos": True})
        assert error_of(r, 504)["type"] == "timeout"
        assert metric(s.url, "bitllm_timeouts_total") == 1 and s.engine.kv_sequences() == 0
        # n choices time out together: each is a timeout, none a cancellation (no client went away)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 200, "ignore_eos": True, "n": 3})
        assert error_of(r, 504)["type"] == "timeout"
        time.sleep(0.3)  # the handler's cancels of the other choices reach the engine loop
        assert metric(s.url, "bitllm_timeouts_total") == 4 and metric(s.url, "bitllm_cancelled_total") == 0
        assert s.engine.kv_sequences() == 0


# --- sampling edge cases, metrics, CORS ------------------------------------------------------------


def test_top_p_zero_is_greedy(llm, server):
    """OpenAI accepts top_p 0 (only the most likely token): the answer is the greedy one, whatever the
    temperature and seed."""
    want = llm.generate("The quick brown", max_new_tokens=8, ignore_eos=True)
    for seed in (1, 2):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "The quick brown", "max_tokens": 8, "top_p": 0,
                                                             "temperature": 1.5, "seed": seed, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    assert error_of(httpx.post(server.url + "/v1/completions", json={"prompt": "x", "top_p": -0.1}), 400)["param"] == "top_p"


def test_scoring_steps_generate_no_tokens(llm):
    """Steps that only score a prompt (echo + logprobs, max_tokens 0) generate nothing: they count in
    the batch-size histogram, not in the generated tokens or the tokens-per-second rate."""
    with Server(llm, ServeConfig(model_name="tiny")) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [[1, 5, 6, 7]] * 3, "max_tokens": 0, "echo": True,
                                                        "logprobs": 1})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0
        assert metric(s.url, "bitllm_batch_size_sum") == 3
        assert metric(s.url, "bitllm_completion_tokens_total") == 0
        assert metric(s.url, "bitllm_tokens_per_second") == 0


def test_prompt_tokens_metric_counts_each_prompt_once(server):
    """bitllm_prompt_tokens_total counts a prompt once however many choices (n) it has, as
    usage.prompt_tokens does, though each choice is its own sequence in the batch."""
    before = metric(server.url, "bitllm_prompt_tokens_total")
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["the quick", "a bit of"], "n": 3,
                                                         "max_tokens": 2}).json()
    assert len(r["choices"]) == 6
    assert metric(server.url, "bitllm_prompt_tokens_total") - before == r["usage"]["prompt_tokens"]


def test_tokens_per_second_over_the_window():
    """The rate is the window's tokens over min(10 s, time since the first step began), never over the
    span of the few steps that happen to be recent."""
    from bitllm.serve.scheduler import Metrics

    now = [100.0]
    m = Metrics(clock=lambda: now[0])
    assert m.tokens_per_second() == 0.0
    m.step(4, 0.5)  # one step of 4 tokens that took 0.5 s, ending at t = 100
    assert m.tokens_per_second() == pytest.approx(8.0)
    now[0] = 101.5
    assert m.tokens_per_second() == pytest.approx(2.0)  # 4 tokens since t = 99.5
    for _ in range(60):  # 30 s of steps: 4 tokens every 0.5 s
        now[0] += 0.5
        m.step(4, 0.5)
    assert m.tokens_per_second() == pytest.approx(8.0)
    now[0] += 60
    assert m.tokens_per_second() == 0.0


def test_kv_sequences_never_walks_the_batch():
    """/metrics runs on the web thread while the engine thread mutates `batch.seqs`: kv_sequences reads
    the Batch's own slot counter instead of iterating the dict (transformers fallback)."""
    import numpy as np

    from bitllm.engine.batch import Batch
    from bitllm.engine.sampling import SamplingParams
    from bitllm.serve.scheduler import EngineLoop

    class Backend:  # no native `engine`: the fallback's path
        vocab, max_context = 8, 32

        def open(self, capacity):
            return 0

        def close(self, slot):
            pass

        def forward(self, slots, tokens, all_logits=False, last=None):
            return np.zeros((len(slots), self.vocab), np.float32)

    class FakeLLM:
        backend = Backend()

        def batch(self):
            return Batch(self.backend)

    class Unwalkable(dict):
        def values(self):
            raise RuntimeError("dictionary changed size during iteration")

    loop = EngineLoop(FakeLLM())
    b = loop.batch

    def kv_sequences() -> int:  # as /metrics calls it, with the dict unwalkable meanwhile
        seqs, b.seqs = b.seqs, Unwalkable(b.seqs)
        try:
            return loop.kv_sequences()
        finally:
            b.seqs = seqs

    short = b.add([1, 2], SamplingParams(max_new_tokens=1))
    long = b.add([1, 2], SamplingParams(max_new_tokens=5))
    b.add([3], SamplingParams(max_new_tokens=0))  # finished at once: holds no slot
    assert kv_sequences() == 2
    b.step()  # `short` finishes and frees its slot
    assert b.seqs[short].finished and kv_sequences() == 1
    b.cancel(long)
    assert kv_sequences() == 0


def test_cors_is_off_by_default_and_answers_preflights_when_on(llm, server):
    origin = "http://ui.example:3000"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code != 200 and "access-control-allow-origin" not in r.headers
    with Server(llm, ServeConfig(model_name="tiny", api_key=KEY, cors_origins=(origin,))) as s:
        r = httpx.options(s.url + "/v1/chat/completions", headers=preflight)  # no key on a preflight: not a 401
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        other = httpx.options(s.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        denied = httpx.get(s.url + "/v1/models", headers={"Origin": origin})  # the page can read the 401
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin
        ok = httpx.get(s.url + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin


def test_serve_command_passes_cors_origins(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import bitllm.serve
    from bitllm.cli import app

    got = {}
    monkeypatch.setattr(bitllm.serve, "serve", lambda llm, host, port, config: got.setdefault("cfg", config))
    d = tiny_chat_checkpoint(tmp_path / "m")
    r = CliRunner().invoke(app, ["serve", str(d), "--threads", "1", "--cors-origin", "http://a.example",
                                 "--cors-origin", "http://b.example"])
    assert r.exit_code == 0, r.output
    assert got["cfg"].cors_origins == ("http://a.example", "http://b.example")
