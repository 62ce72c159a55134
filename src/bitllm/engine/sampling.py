"""Sampling settings and the sampler: small pure functions over one logits row (numpy, fp32)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bitllm.errors import BitLLMError


@dataclass
class SamplingParams:
    """Per-sequence generation settings. temperature 0 = greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL rule)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # log-probabilities to record (the model's own: log-softmax of its logits, before the repetition
    # penalty, temperature and top-k/top-p): of each generated token, and of each prompt token after
    # the first, with the n most likely alternatives (0: none); None: do not record
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.stop_token_ids = tuple(self.stop_token_ids or ())
        if not all(isinstance(s, str) and s for s in self.stop):  # "" would stop at the first token
            raise BitLLMError(f"stop must be non-empty strings (token ids go in stop_token_ids), got {self.stop!r}")
        if self.seed is not None and self.seed < 0:
            raise BitLLMError(f"seed must be >= 0 (or None for a fresh one), got {self.seed}")
        if self.max_new_tokens < 0:
            raise BitLLMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # written so that NaN fails too
            raise BitLLMError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BitLLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BitLLMError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise BitLLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
                raise BitLLMError(f"{name} must be None or a number of alternatives >= 0, got {n!r}")


@dataclass
class TokenLogprob:
    """One position's record: the token there, its log-probability, and the `top` most likely
    tokens with theirs (most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    """log Σ exp(logits) over the last axis, in float64: logits - this = log-softmax."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


# Logits rows taken to float64 at once: all 256 rows of a scored prompt chunk would cost about 6x
# their fp32 size in copies (the float64 rows, their shifted copy and its exp).
LOGPROB_ROWS = 32


def token_logprobs(rows: np.ndarray, tokens, top_n: int) -> list[TokenLogprob]:
    """For each row of logits (r, vocab) and the token that followed it: its log-probability and the
    `top_n` most likely tokens' (most likely first)."""
    top_n = min(int(top_n), np.shape(rows)[-1])
    out = []
    for b in range(0, len(tokens), LOGPROB_ROWS):
        x = np.asarray(rows[b: b + LOGPROB_ROWS], dtype=np.float64)  # (≤ LOGPROB_ROWS, vocab)
        lse = log_normalizer(x)
        for i, t in enumerate(tokens[b: b + LOGPROB_ROWS]):
            top: list[tuple[int, float]] = []
            if top_n:
                cand = np.argpartition(-x[i], top_n - 1)[:top_n]
                cand = cand[np.lexsort((cand, -x[i, cand]))]
                top = [(int(j), float(x[i, j] - lse[i])) for j in cand]
            out.append(TokenLogprob(int(t), float(x[i, int(t)] - lse[i]), top))
    return out


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' rule: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    v = logits[seen]
    logits[seen] = np.where(v > 0, v / penalty, v * penalty)
    return logits


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """-inf outside the top-k tokens and outside the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        p = softmax(logits[order])
        keep = np.cumsum(p) - p < top_p  # keep a token while the mass before it is below top_p
        mask = np.full(logits.shape, -np.inf, dtype=logits.dtype)
        mask[order[keep]] = 0.0
        logits = logits + mask
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def sample(logits: np.ndarray, params: SamplingParams, seen: np.ndarray, rng: np.random.Generator) -> int:
    """One token id from one logits row."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), seen, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    # shift before dividing: a tiny temperature then sends the others to -inf, not the top to inf (NaN)
    with np.errstate(over="ignore"):
        logits = (logits.astype(np.float64) - np.max(logits)) / params.temperature
    p = softmax(filter_top_k_top_p(logits, params.top_k, params.top_p))
    return int(rng.choice(p.size, p=p))
