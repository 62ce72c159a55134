"""Continuous batching: sequences join and leave a running batch between steps.

The API the server and the eval tools build on: `add` a prompt with its own SamplingParams, call
`step` (one forward over every live sequence: whole prompts for new ones, one token for the rest),
`cancel` at any time. Backends (native engine, or the HF fallback) only run forwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence as Seq

import numpy as np

from bitllm.engine.sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from bitllm.errors import BitLLMError

# Prompt tokens fed per step to the sequences that record their prompt's log-probabilities, all of
# them together: every such token needs its logits row (vocab floats; 256 rows of a 128k vocabulary
# are 128 MiB), so long prompts go in chunks and several scored prompts take turns (oldest first).
PROMPT_LOGPROBS_CHUNK = 256


class Backend(Protocol):
    vocab: int
    max_context: int

    def open(self, capacity: int) -> int: ...
    def close(self, slot: int) -> None: ...
    def forward(self, slots: Seq[int], tokens: Seq[Seq[int]], all_logits: bool = False,
                last: Seq[int] | None = None) -> np.ndarray:
        """Logits (rows, vocab): the last row of each sequence, or with all_logits every row — or,
        with `last`, the last last[i] rows of sequence i (the head then need not run on the rest)."""


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens to feed at the next step
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    rng: np.random.Generator | None = None
    emitted: int = 0  # characters of text already handed out by Batch.text_delta
    fed: int = 0  # prompt tokens already through a forward
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token; the first: None


@dataclass
class StepEvent:
    seq_id: int
    token: int | None  # None: a step that only fed part of a long prompt (no token yet)
    finished: bool
    finish_reason: str | None


class Batch:
    """A running batch over one backend. Not thread-safe: drive it from one thread."""

    def __init__(self, backend: Backend, *, eos_token_ids: Seq[int] = (), tokenizer=None) -> None:
        self.backend = backend
        self.eos = tuple(eos_token_ids)
        self.tokenizer = tokenizer
        self.seqs: dict[int, Sequence] = {}
        self.open_slots = 0  # sequences holding a backend slot: an int, so other threads may read it safely
        self._next = 0
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    # -- membership ----------------------------------------------------------------------------

    def add(self, prompt: Seq[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (token ids); it is prefilled at the next step. Returns the sequence id."""
        params = params or SamplingParams()
        prompt = self.check(prompt, params)
        seq = Sequence(self._next, prompt, params, rng=np.random.default_rng(params.seed))
        self._next += 1
        self.seqs[seq.id] = seq
        if params.max_new_tokens == 0 and params.prompt_logprobs is None:
            seq.finished, seq.finish_reason = True, "length"
            return seq.id  # (with prompt_logprobs the prompt is still scored: a forward, no token)
        capacity = min(self.backend.max_context, len(prompt) + params.max_new_tokens - 1)
        seq.slot = self.backend.open(max(capacity, len(prompt)))
        self.open_slots += 1
        seq.pending = list(prompt)
        return seq.id

    def check(self, prompt: Seq[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, or BitLLMError if `add` would refuse it (opens no slot)."""
        prompt = [int(t) for t in prompt]
        ctx = self.backend.max_context
        if not prompt:
            raise BitLLMError("empty prompt: give at least one token (e.g. the BOS token)")
        if len(prompt) >= ctx:
            raise BitLLMError(f"the prompt has {len(prompt)} tokens but the model's context is {ctx}: "
                              f"shorten it to at most {ctx - 1} tokens (or raise max_context)")
        bad = [t for t in prompt if not 0 <= t < self.backend.vocab]
        if bad:
            raise BitLLMError(f"token id {bad[0]} is outside the vocabulary (0..{self.backend.vocab - 1})")
        if params.stop and self.tokenizer is None:
            raise BitLLMError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        return prompt

    def cancel(self, seq_id: int) -> None:
        """Stop a sequence now and free its cache slot (its output so far stays readable)."""
        seq = self.seqs[seq_id]
        if not seq.finished:
            self._finish(seq, "cancelled")

    def release(self, seq_id: int) -> Sequence:
        """Forget a (finished or cancelled) sequence and return it."""
        self.cancel(seq_id)
        return self.seqs.pop(seq_id)

    @property
    def live(self) -> list[Sequence]:
        return [s for s in self.seqs.values() if not s.finished]

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finished, seq.finish_reason = True, reason
        if seq.slot is not None:
            self.backend.close(seq.slot)
            seq.slot = None
            self.open_slots -= 1

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """One forward over the live sequences; sample one token for each (sequences that record
        their prompt's log-probabilities get their prompts in chunks first, PROMPT_LOGPROBS_CHUNK tokens
        per step between them: one left without any sits the step out). Returns what happened."""
        # a scoring prefill feeds a chunk and wants a logits row per fed token; the rest want one row
        live, feeds, scoring, budget = [], [], [], PROMPT_LOGPROBS_CHUNK
        for s in self.live:
            feed, sc = s.pending, self._scoring(s)
            if sc:
                if not budget:
                    continue  # the scored prompts before it took this step's rows
                feed = feed[:budget]
                budget -= len(feed)
            live.append(s)
            feeds.append(feed)
            scoring.append(sc)
        if not live:
            return []
        rows = [len(f) if sc else 1 for f, sc in zip(feeds, scoring)]
        prefill = sum(len(f) for s, f in zip(live, feeds) if s.fed < len(s.prompt))
        t0 = time.perf_counter()
        slots = [s.slot for s in live]
        logits = (self.backend.forward(slots, feeds, all_logits=True, last=rows) if any(scoring)
                  else self.backend.forward(slots, feeds))  # (Σ rows, vocab)
        events = []
        at = 0
        for seq, feed, sc, n in zip(live, feeds, scoring, rows):
            block, at = logits[at: at + n], at + n
            if seq.fed < len(seq.prompt):
                seq.fed += len(feed)
                seq.pending = seq.pending[len(feed):]
            if sc:
                self._record_prompt_logprobs(seq, block)
                if seq.pending:  # more of the prompt to feed: no token this step
                    events.append(StepEvent(seq.id, None, False, None))
                    continue
                if seq.params.max_new_tokens == 0:  # scoring only
                    self._finish(seq, "length")
                    events.append(StepEvent(seq.id, None, True, seq.finish_reason))
                    continue
            row = block[-1]
            seen = np.asarray(seq.prompt + seq.generated, dtype=np.int64) if seq.params.repetition_penalty != 1.0 else np.empty(0, np.int64)
            tok = sample(row, seq.params, seen, seq.rng)
            if seq.params.logprobs is not None:
                seq.logprobs += token_logprobs(row[None], [tok], seq.params.logprobs)
            seq.generated.append(tok)
            seq.pending = [tok]
            reason = self._stop_reason(seq, tok)
            if reason:
                self._finish(seq, reason)
            events.append(StepEvent(seq.id, tok, seq.finished, seq.finish_reason))
        dt = time.perf_counter() - t0
        if prefill:
            self.stats["prefill_tokens"] += prefill
            self.stats["prefill_s"] += dt
        else:
            self.stats["decode_tokens"] += len(live)
            self.stats["decode_s"] += dt
        return events

    @staticmethod
    def _scoring(seq: Sequence) -> bool:
        """Still feeding a prompt whose log-probabilities it records."""
        return seq.params.prompt_logprobs is not None and seq.fed < len(seq.prompt)

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, block: np.ndarray) -> None:
        """`block` holds the logits rows of the prompt tokens just fed; row j predicts the token after
        the j-th of them (the last row of the last chunk predicts the first generated token)."""
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # nothing predicts the first prompt token
        start = len(seq.prompt_logprobs)  # the prompt position the first row predicts
        targets = seq.prompt[start: start + len(block)]
        seq.prompt_logprobs += token_logprobs(block[: len(targets)], targets, seq.params.prompt_logprobs)

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if p.stop and any(s in self.text(seq, truncate=False) for s in p.stop):
            return "stop"
        if len(seq.generated) >= p.max_new_tokens or len(seq.prompt) + len(seq.generated) >= self.backend.max_context:
            return "length"
        return None

    def text(self, seq: Sequence, truncate: bool = True) -> str:
        """Decoded output, cut at the first stop string."""
        if self.tokenizer is None:
            return ""
        t = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        if truncate and seq.params.stop:
            cut = min((t.find(s) for s in seq.params.stop if s in t), default=-1)
            if cut >= 0:
                t = t[:cut]
        return t

    def text_delta(self, seq_id: int) -> str:
        """Text decoded since the last call, for streaming. Holds back what may still become a stop
        string and an incomplete UTF-8 character; once the sequence has finished, releases the rest."""
        seq = self.seqs[seq_id]
        text = self.text(seq)
        if seq.finished:
            upto = len(text)
        elif text.endswith("\ufffd"):
            upto = seq.emitted  # an incomplete UTF-8 character: wait for the next token
        else:
            hold = max((len(s) for s in seq.params.stop), default=1) - 1
            upto = max(seq.emitted, len(text) - hold)
        piece, seq.emitted = text[seq.emitted:upto], max(seq.emitted, upto)
        return piece

    def run(self) -> None:
        """Step until every sequence has finished."""
        while self.live:
            self.step()
