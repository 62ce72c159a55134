"""`bitllm.LLM`: load a packed model once, then generate, stream, chat and score.

    llm = bitllm.LLM("path/or/hub-id", threads=2)
    llm.generate("Once upon a time", max_new_tokens=32)
    for piece in llm.stream("Hello"): print(piece, end="")
    llm.loglikelihood([("The capital of France is", " Paris")])

Llama, BitNet and Phi models run on the native C++ engine; other architectures run through the
transformers model with bitllm's packed layers behind the same API (with a one-line notice).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence as Seq

import numpy as np
import torch

from bitllm.engine.batch import Batch
from bitllm.engine.sampling import SamplingParams, TokenLogprob, log_normalizer
from bitllm.errors import BitLLMError, UnsupportedModelError

Prompt = str | Seq[int]


# --- backends --------------------------------------------------------------------------------------


class NativeBackend:
    """The C++ engine (csrc/engine): KV cache slots and batched forwards."""

    name = "native"

    def __init__(self, engine, max_context: int) -> None:
        self.engine = engine
        self.vocab = int(engine.vocab)
        self.max_context = int(max_context)
        self._lock = threading.Lock()  # the engine's workspace serves one call at a time

    def open(self, capacity: int) -> int:
        with self._lock:
            return self.engine.add_sequence(int(capacity))

    def close(self, slot: int) -> None:
        with self._lock:
            self.engine.remove_sequence(slot)

    def forward(self, slots: Seq[int], tokens: Seq[Seq[int]], all_logits: bool = False,
                last: Seq[int] | None = None) -> np.ndarray:
        from bitllm import _engine

        lens = [len(t) for t in tokens]
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.fromiter((x for t in tokens for x in t), dtype=np.int32, count=int(offsets[-1]))
        if not all_logits:
            last = [1] * len(lens)
        elif last is None:
            last = lens
        rows = np.asarray(last, dtype=np.int64)
        out = np.empty((int(np.clip(rows, 0, None).sum()), self.vocab), dtype=np.float32)
        try:
            with self._lock:  # the engine runs its LM head on the asked-for rows only
                self.engine.forward(np.asarray(slots, dtype=np.int32), flat, offsets, rows, out)
        except _engine.EngineError as e:
            raise BitLLMError(str(e)) from None
        return out


class HFBackend:
    """Fallback: the transformers model (with bitllm PackedLinear layers), one KV cache per slot."""

    name = "hf"

    def __init__(self, model, max_context: int) -> None:
        self.model = model
        self.vocab = int(model.config.get_text_config().vocab_size)
        self.max_context = int(max_context)
        self._caches: dict[int, Any] = {}
        self._next = 0
        self._lock = threading.Lock()  # slots are opened and closed from any thread (server, scoring)

    def open(self, capacity: int) -> int:
        with self._lock:
            slot = self._next
            self._next += 1
            self._caches[slot] = None
        return slot

    def close(self, slot: int) -> None:
        with self._lock:
            self._caches.pop(slot, None)

    @torch.inference_mode()
    def forward(self, slots: Seq[int], tokens: Seq[Seq[int]], all_logits: bool = False,
                last: Seq[int] | None = None) -> np.ndarray:
        rows = []
        for i, (slot, toks) in enumerate(zip(slots, tokens)):
            cache = self._caches[slot]
            past = 0 if cache is None else cache.get_seq_length()
            ids = torch.tensor([list(toks)], dtype=torch.long)
            pos = torch.arange(past, past + len(toks)).unsqueeze(0)
            # the LM head only over the rows asked for: with a 262k vocabulary it is most of the work
            keep = int(last[i]) if (all_logits and last is not None) else (0 if all_logits else 1)
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=pos,
                             logits_to_keep=keep)
            self._caches[slot] = out.past_key_values
            lg = out.logits[0].float()
            rows.append(lg if all_logits else lg[-1:])
        logits = torch.cat(rows).numpy()
        if not np.isfinite(logits).all():
            raise BitLLMError("non-finite logits (NaN/inf) from the model: its weights or activations overflowed")
        return logits


# --- the API ---------------------------------------------------------------------------------------


class Completion(str):
    """The generated text (a str), with `.token_ids`, `.finish_reason` and `.prompt_tokens`, and the
    log-probabilities asked for (`logprobs=n`: `.logprobs`, one TokenLogprob per generated token;
    `prompt_logprobs=n`: `.prompt_logprobs`, one per prompt token, None for the first)."""

    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None

    def __new__(cls, text: str, token_ids: list[int], finish_reason: str | None, prompt_tokens: int,
                logprobs: list[TokenLogprob] | None = None, prompt_logprobs: list[TokenLogprob | None] | None = None):
        obj = super().__new__(cls, text)
        obj.token_ids, obj.finish_reason, obj.prompt_tokens = token_ids, finish_reason, prompt_tokens
        obj.logprobs, obj.prompt_logprobs = logprobs, prompt_logprobs
        return obj

    def __getnewargs__(self):  # pickle and copy rebuild it through __new__
        return str(self), self.token_ids, self.finish_reason, self.prompt_tokens, self.logprobs, self.prompt_logprobs


def _eos_ids(directory: Path | None, config) -> tuple[int, ...]:
    ids: list = []
    if directory is not None and (directory / "generation_config.json").exists():
        ids = [json.loads((directory / "generation_config.json").read_text()).get("eos_token_id")]
    if not ids or ids == [None]:
        ids = [getattr(config.get_text_config(), "eos_token_id", None)]
    flat: list[int] = []
    for i in ids:
        flat.extend(i if isinstance(i, list) else [i] if i is not None else [])
    return tuple(int(i) for i in flat)


def _load_tokenizer(directory: Path):
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # a broken tokenizer should not stop token-id use
        print(f"bitllm: could not load the tokenizer in {directory} ({e}); token-id prompts only", file=sys.stderr)
        return None


class LLM:
    """A loaded model. `backend`: "auto" (native engine when it supports the model, else transformers),
    "native" or "hf". `head`: "f16" or "i8" (int8 per-row LM head, native only). `kv_dtype`: "f32" or
    "f16" (the native engine's KV cache: f16 halves its memory and attention's reads, like llama.cpp's
    default cache; keys and values are rounded once when stored)."""

    def __init__(self, model: str | os.PathLike, *, threads: int | None = None, head: str = "f16",
                 kernel_format: str | None = None, max_context: int | None = None, backend: str = "auto",
                 kv_dtype: str = "f32",
                 tokenizer: Any = None, revision: str | None = None, token: str | None = None,
                 verbose: bool = False) -> None:
        from bitllm.engine.loader import check_options, load_engine, read_config
        from bitllm.formats.checkpoint import resolve_model_dir

        if backend not in ("auto", "native", "hf"):
            raise BitLLMError(f"backend must be 'auto', 'native' or 'hf', got {backend!r}")
        check_options(head, kv_dtype)
        self.threads = set_threads(threads)
        self.directory = resolve_model_dir(model, revision, token)
        self.config, _, _ = read_config(self.directory)
        ctx = max_context or _context(self.config)
        self.load_info: dict[str, Any] = {}
        self.backend: NativeBackend | HFBackend | None = None
        if backend in ("auto", "native"):
            try:
                eng, _, info = load_engine(self.directory, head=head, kernel_format=kernel_format, kv_dtype=kv_dtype)
                self.backend = NativeBackend(eng, ctx)
                self.load_info = info
                if verbose:
                    print(f"bitllm: loaded {self.directory} into the native engine in {info['load_s']:.2f} s "
                          f"(read + repack; {info['weight_bytes'] / 2**20:.1f} MiB of weights)", file=sys.stderr)
            except UnsupportedModelError as e:
                if backend == "native":
                    raise
                print(f"bitllm: the native engine does not run this model ({e}); using transformers with bitllm's packed layers",
                      file=sys.stderr)
        if self.backend is None:
            from bitllm.formats.checkpoint import from_pretrained

            if (head, kv_dtype) != ("f16", "f32"):
                print(f"bitllm: head={head!r} and kv_dtype={kv_dtype!r} apply to the native engine only; "
                      "transformers keeps its own head and cache", file=sys.stderr)
            t0 = time.perf_counter()
            self.backend = HFBackend(from_pretrained(self.directory), ctx)
            torch.set_num_threads(self.threads)
            self.load_info = {"load_s": time.perf_counter() - t0}
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.directory)
        self.eos_token_ids = _eos_ids(self.directory, self.config)
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_model(cls, model, *, tokenizer: Any = None, threads: int | None = None, head: str = "f16",
                   kernel_format: str | None = None, max_context: int | None = None, kv_dtype: str = "f32") -> "LLM":
        """Wrap an in-memory model from bitllm.from_pretrained (native when supported, else transformers)."""
        from bitllm.engine.loader import engine_from_model

        self = cls.__new__(cls)
        self.threads = set_threads(threads)
        self.directory = None
        self.config = model.config
        ctx = max_context or _context(model.config)
        try:
            eng, _ = engine_from_model(model, head=head, kernel_format=kernel_format, kv_dtype=kv_dtype)
            self.backend = NativeBackend(eng, ctx)
        except UnsupportedModelError as e:
            print(f"bitllm: the native engine does not run this model ({e}); using transformers", file=sys.stderr)
            self.backend = HFBackend(model, ctx)
            torch.set_num_threads(self.threads)
        self.load_info = {}
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_ids(None, model.config)
        self.last_stats = {}
        return self

    # -- helpers -------------------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BitLLMError(f"{self.directory or 'this model'} has no tokenizer: pass token-id lists instead of text")
            return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        return [int(t) for t in prompt]

    def decode(self, ids: Seq[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def batch(self) -> Batch:
        """A new running batch over this model (add / step / cancel)."""
        return Batch(self.backend, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer)

    @staticmethod
    def sampling_params(**kwargs) -> SamplingParams:
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: Prompt | list[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Seq[str] | None = None, **kwargs) -> Completion | list[Completion]:
        """Complete one prompt (text or token ids) or a list of them, all in one running batch. A 1-D
        tensor or array of token ids is one prompt; a 2-D one is a prompt per row."""
        if isinstance(prompts, (torch.Tensor, np.ndarray)):
            prompts = prompts.tolist()  # (T,) -> [ids]; (B, T) -> [[ids], ...]
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        plist = [prompts] if single else list(prompts)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed, stop=stop or (), **kwargs)
        b = self.batch()
        try:
            ids = [b.add(self.encode(p), params) for p in plist]
            b.run()
        finally:  # a bad later prompt, an engine error or Ctrl-C must not leave KV cache slots behind
            for seq in b.live:
                b.cancel(seq.id)
        self.last_stats = dict(b.stats)
        out = [Completion(b.text(s), list(s.generated), s.finish_reason, len(s.prompt),
                          s.logprobs if params.logprobs is not None else None,
                          s.prompt_logprobs if params.prompt_logprobs is not None else None)
               for s in (b.seqs[i] for i in ids)]
        return out[0] if single else out

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Seq[str] | None = None, **kwargs) -> Iterator[str | int]:
        """Yield the continuation piece by piece: text pieces with a tokenizer, token ids without.
        Bad settings or a prompt the model cannot take raise here, not at the first `next()`."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed, stop=stop or (), **kwargs)
        b = self.batch()
        ids = b.check(self.encode(prompt), params)
        return self._stream(b, ids, params)

    def _stream(self, b: Batch, ids: list[int], params: SamplingParams) -> Iterator[str | int]:
        sid = b.add(ids, params)  # here, not in stream(): a generator never started must hold no slot
        seq = b.seqs[sid]
        given = 0  # token ids yielded (without a tokenizer)
        try:
            while not seq.finished:
                b.step()
                if self.tokenizer is None:
                    if len(seq.generated) > given:  # a step that fed part of a long prompt yields nothing
                        given += 1
                        yield seq.generated[-1]
                    continue
                piece = b.text_delta(sid)  # holds back partial UTF-8 and possible stop strings
                if piece:
                    yield piece
        finally:
            b.cancel(sid)
            self.last_stats = dict(b.stats)
            self.last_finish_reason = seq.finish_reason

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` ready for the assistant's turn: the tokenizer's chat template, or
        (for base models without one) a plain "User: / Assistant:" transcript."""
        if self.tokenizer is None:
            raise BitLLMError("chat needs a tokenizer; this model has none (use generate() with token ids)")
        if (isinstance(messages, (str, dict)) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in messages)):
            raise BitLLMError("messages must be a non-empty list of {'role': str, 'content': str} dicts, "
                              f"e.g. [{{'role': 'user', 'content': 'Hi!'}}]; got {messages!r:.200}")
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return self.encode(text)

    def chat(self, messages: list[dict[str, str]], stream: bool = False, max_new_tokens: int = 256, **kwargs):
        """Answer the last user message. stream=True yields text pieces; else returns a Completion.
        When the history outgrows the context, the oldest exchanges (a user message and the replies up
        to the next one) are dropped, a leading system message kept: the history still starts with a
        user turn, as templates that enforce user/assistant alternation require."""
        ids = self.chat_ids(messages)
        head = list(messages[:1]) if messages[0].get("role") == "system" else []
        turns = list(messages[len(head):])
        while len(ids) + 1 >= self.backend.max_context:
            nxt = next((i for i in range(1, len(turns)) if turns[i].get("role") == "user"), None)
            if nxt is None:  # the last exchange alone is too long: generate() says so
                break
            turns = turns[nxt:]
            ids = self.chat_ids(head + turns)
        if not getattr(self.tokenizer, "chat_template", None):
            stop = kwargs.get("stop") or ()
            kwargs["stop"] = ((stop,) if isinstance(stop, str) else tuple(stop)) + ("\nUser:",)
        if stream:
            return self.stream(ids, max_new_tokens=max_new_tokens, **kwargs)
        return self.generate(ids, max_new_tokens=max_new_tokens, **kwargs)

    # -- scoring -------------------------------------------------------------------------------

    def loglikelihood(self, requests: Iterable[tuple[Prompt, Prompt]], max_batch_tokens: int = 1024
                      ) -> list[tuple[float, bool]]:
        """Teacher-forced log P(continuation | context) and whether it is the greedy continuation,
        for each (context, continuation) pair (text or token ids), scored in batches. The last
        continuation token is only a target, never fed: context + continuation may hold
        ``max_context + 1`` tokens, as for lm-eval's ``hf`` model."""
        pairs = []
        for ctx, cont in requests:
            if isinstance(ctx, str) and isinstance(cont, str):
                n_spaces = len(ctx) - len(ctx.rstrip())  # as lm-eval: trailing context spaces start the continuation
                if n_spaces:
                    ctx, cont = ctx[:-n_spaces], ctx[-n_spaces:] + cont
                if not ctx:  # conditioned on BOS below; a BOS the tokenizer adds is not part of the continuation
                    ctx_ids, cont_ids = [], self.encode(cont, add_special_tokens=False)
                else:
                    whole = self.encode(ctx + cont)
                    c_ids = self.encode(ctx)
                    n_ctx = len(c_ids)
                    if whole[:n_ctx] != c_ids:  # the join re-tokenized: fall back to separate encodings
                        whole = c_ids + self.encode(cont, add_special_tokens=False)
                    ctx_ids, cont_ids = whole[:n_ctx], whole[n_ctx:]
            else:
                ctx_ids, cont_ids = self.encode(ctx), self.encode(cont, add_special_tokens=False)
            if not cont_ids:
                raise BitLLMError("empty continuation: nothing to score")
            if not ctx_ids:
                bos = getattr(self.config.get_text_config(), "bos_token_id", None)
                if bos is None:
                    raise BitLLMError("empty context and the model has no BOS token to condition on")
                ctx_ids = [int(bos)]
            toks = ctx_ids + cont_ids
            if len(toks) > self.backend.max_context + 1:
                raise BitLLMError(f"context + continuation is {len(toks)} tokens; the model's context is "
                                  f"{self.backend.max_context} (+1: the last token is only scored)")
            pairs.append((toks, len(ctx_ids)))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        i = 0
        while i < len(pairs):
            j, total = i, 0
            while j < len(pairs) and (j == i or total + len(pairs[j][0]) <= max_batch_tokens):
                total += len(pairs[j][0])
                j += 1
            chunk = pairs[i:j]
            slots = [self.backend.open(len(t) - 1) for t, _ in chunk]
            # all tokens but the last are fed; rows n_ctx-1 .. len-2 (the last len-n_ctx) predict toks[n_ctx:]
            last = [len(t) - n_ctx for t, n_ctx in chunk]
            try:
                logits = self.backend.forward(slots, [t[:-1] for t, _ in chunk], all_logits=True, last=last)
            finally:
                for s in slots:
                    self.backend.close(s)
            row = 0
            for k, (toks, n_ctx) in enumerate(chunk):
                lg = logits[row: row + last[k]].astype(np.float64)  # predicts toks[n_ctx:]
                target = np.asarray(toks[n_ctx:])
                logp = lg[np.arange(len(target)), target] - log_normalizer(lg)
                results[i + k] = (float(logp.sum()), bool((lg.argmax(axis=1) == target).all()))
                row += last[k]
            i = j
        return results


def _context(config) -> int:
    c = config.get_text_config()
    return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048)


def set_threads(threads: int | None) -> int:
    """Threads for the engine and the kernels (default: every CPU this process may use). torch's own
    pool is left alone unless the transformers fallback runs (HFBackend)."""
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, int(threads))
    try:
        from bitllm import _engine

        _engine.set_num_threads(n)
    except ImportError:
        pass
    try:
        from bitllm import _core

        _core.set_num_threads(n)
    except (ImportError, AttributeError):
        pass
    return n
