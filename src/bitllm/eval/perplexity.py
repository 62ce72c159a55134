"""Sliding-window perplexity (the Hugging Face "perplexity of fixed-length models" recipe).

Windows of at most `context` tokens start every `stride` tokens (but never after the first
unscored token's predecessor); each window scores only the tokens that no earlier window scored,
conditioned on everything before them inside the window. stride == context gives windows that
overlap by one token (lm-eval's rolling windows: fast, pessimistic); a smaller stride gives every
scored token more context (closer to the model's true perplexity). The text's first token is conditioned
on the model's BOS token (EOS when it has none), so every text token is scored exactly once and
bits per byte are exact: the tokenizer-free number to compare models with different vocabularies.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

from bitllm.errors import BitLLMError

# `datasets` names a user may type; nothing is reachable offline, but the code stays for users who have them
DATASET_ALIASES = {
    "wikitext2": "hf:wikitext:wikitext-2-raw-v1:test",
    "wikitext103": "hf:wikitext:wikitext-103-raw-v1:test",
    "ptb": "hf:ptb_text_only:penn_treebank:test",
}
DEFAULT_MAX_TOKENS = 16384


@dataclass
class PerplexityResult:
    model: str
    source: str
    split: str
    tokens: int  # scored tokens
    nll: float  # summed negative log-likelihood, nats
    ppl: float
    bits_per_token: float
    bytes: int  # UTF-8 bytes of the scored text
    bits_per_byte: float
    context: int
    stride: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def window_pairs(ids: Sequence[int], context: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, scored ids) per window over `ids`, whose first token is only conditioned on.

    Window k covers ids[b:e] with b = min(k*stride, p - 1), e = min(b + context, n), where p is the
    previous window's e (1 at first), and scores ids[p:e]: every token but the first is scored
    exactly once, each with at least one token of context.
    """
    if context < 2:
        raise BitLLMError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise BitLLMError(f"stride must be in [1, context={context}], got {stride}")
    ids = list(ids)
    pairs, prev_end, k = [], 1, 0
    while prev_end < len(ids):
        b = min(k * stride, prev_end - 1)
        e = min(b + context, len(ids))  # > prev_end, since context >= 2
        pairs.append((ids[b:prev_end], ids[prev_end:e]))
        prev_end, k = e, k + 1
    return pairs


def perplexity_of_ids(model, ids: Sequence[int], *, context: int | None = None, stride: int | None = None,
                      progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """(summed NLL in nats, scored tokens) of `ids` (the first id is conditioned on, not scored)."""
    context = min(context or model.max_length, model.max_length)
    stride = stride or context
    pairs = window_pairs(ids, context, min(stride, context))
    nll, n = 0.0, 0
    chunk = max(1, 4096 // context)  # windows per engine call
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(c) for _, c in pairs), desc=desc, unit="tok", leave=False)
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        for (lp, _), (_, cont) in zip(model.loglikelihood(part, max_batch_tokens=4096), part):
            nll -= lp
            n += len(cont)
        if bar is not None:
            bar.update(sum(len(c) for _, c in part))
    if bar is not None:
        bar.close()
    return nll, n


def perplexity(model, text: str, *, context: int | None = None, stride: int | None = None,
               max_tokens: int | None = DEFAULT_MAX_TOKENS, source: str = "text", split: str = "text",
               progress: bool = True) -> PerplexityResult:
    """Sliding-window perplexity of `model` (an `EvalModel`) on the first `max_tokens` tokens of `text`."""
    if not text.strip():
        raise BitLLMError(f"{source}/{split}: no text to score")
    if max_tokens:
        text = text[: max_tokens * 12]  # no tokenizer makes fewer than 1 token per 12 characters of prose
    ids = model.encode(text)
    truncated = bool(max_tokens) and len(ids) > max_tokens
    if truncated:
        ids = ids[:max_tokens]
    prefix = model.prefix_token_id
    if prefix is None:
        raise BitLLMError(f"{model.name} has neither a BOS nor an EOS token to condition the first token on")
    t0 = time.perf_counter()
    context = min(context or model.max_length, model.max_length)
    stride = min(stride or context, context)
    nll, n = perplexity_of_ids(model, [prefix] + ids, context=context, stride=stride, progress=progress,
                               desc=f"ppl {split}")
    # the scored text's bytes (as lm-eval counts them); decoding drops special-token strings found in the text
    nbytes = len((model.decode(ids) if truncated else text).encode("utf-8"))
    return PerplexityResult(model.name, source, split, n, nll, math.exp(nll / n), nll / n / math.log(2), nbytes,
                            nll / math.log(2) / max(1, nbytes), context, stride, time.perf_counter() - t0)


# --- text sources ----------------------------------------------------------------------------------


def bundled_heldout(max_chars: int | None = None) -> dict[str, str]:
    """The bundled corpus' held-out text as bitllm.train holds it out (DataConfig defaults):
    "in-domain" = the last `holdout_frac` of every training source (Shakespeare + KJV), each source
    contributing an equal share of `max_chars`; "out-of-domain" = the Wikipedia leads (never trained on)."""
    from bitllm.train.config import DataConfig
    from bitllm.train.data import read_sources, split_source

    frac = DataConfig().holdout_frac
    helds = [split_source(s.text, frac)[1] for s in read_sources(["bundled"], "train")]
    helds = [h for h in helds if h.strip()]
    share = max_chars // len(helds) if max_chars else None
    in_domain = "\n\n".join(h[:share] if share else h for h in helds)
    ood = "\n\n".join(s.text for s in read_sources(["bundled"], "ood"))
    return {"in-domain": in_domain, "out-of-domain": ood[:max_chars] if max_chars else ood}


def load_ppl_texts(source: str, max_chars: int | None = None) -> dict[str, str]:
    """{split name: text} for `source`: "bundled", a .txt/.jsonl/.json file or directory, a `datasets`
    spec `hf:NAME[:CONFIG[:SPLIT]]`, or an alias (wikitext2, wikitext103, ptb)."""
    from pathlib import Path

    from bitllm.train.data import read_sources

    if source == "bundled":
        return bundled_heldout(max_chars)
    spec = DATASET_ALIASES.get(source, source)
    if not spec.startswith("hf:") and not Path(spec).exists():
        raise BitLLMError(f"perplexity source {source!r} is neither 'bundled', a file/directory, 'hf:NAME[:CONFIG[:SPLIT]]' "
                          f"nor one of {sorted(DATASET_ALIASES)}")
    text = "\n\n".join(s.text for s in read_sources([spec], "eval"))
    return {Path(spec).name if not spec.startswith("hf:") else spec[3:]: text[:max_chars] if max_chars else text}


def evaluate_perplexity(model, source: str, *, context: int | None = None, stride: int | None = None,
                        max_tokens: int | None = DEFAULT_MAX_TOKENS, progress: bool = True) -> list[PerplexityResult]:
    """Perplexity of `model` on every split of `source` (see load_ppl_texts)."""
    texts = load_ppl_texts(source, max_chars=max_tokens * 12 if max_tokens else None)
    return [perplexity(model, text, context=context, stride=stride, max_tokens=max_tokens, source=source,
                       split=split, progress=progress) for split, text in texts.items()]
