"""Conversion data: text through bitllm.train.data (tokenized with the teacher's tokenizer), or sequences sampled
from the teacher itself (`teacher:N`, the LLM-QAT / OneBit `kd_132k` way: no outside text needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bitllm.convert.config import ConvertConfig
from bitllm.train.data import build_corpus, pack
from bitllm.train.config import DataConfig


@dataclass
class ConvertData:
    train: torch.Tensor  # (N, T) int64 blocks
    heldout: dict[str, torch.Tensor]  # split -> (n,) int64 id stream
    source: str  # what the blocks came from, for the report


def _text_corpus(specs: list[str], cfg: ConvertConfig, tokenizer):
    ood = ["bundled"] if "bundled" in specs else []
    data = DataConfig(train=list(specs), heldout_ood=ood, holdout_frac=cfg.holdout_frac,
                      max_eval_tokens=cfg.max_eval_tokens)
    return build_corpus(data, cfg.seq_len, len(tokenizer), tokenizer)


@torch.no_grad()
def sample_teacher(teacher, tokenizer, n: int, seq_len: int, temperature: float = 1.0, seed: int = 0,
                   batch: int = 8) -> torch.Tensor:
    """`n` blocks of `seq_len` ids sampled from the teacher, each started from BOS (or EOS when there is none).
    Generation stops at EOS; the samples are joined into one stream (EOS between them) and packed. (n, T)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(teacher.parameters()).device
    g_state = torch.get_rng_state()
    torch.manual_seed(seed)
    stream: list[int] = []
    try:
        while len(stream) < n * seq_len:
            x = torch.full((batch, 1), start, dtype=torch.long, device=device)  # (b, 1)
            out = teacher.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=temperature,
                                   top_k=0, top_p=1.0,
                                   max_new_tokens=seq_len - 1, pad_token_id=eos, eos_token_id=eos)  # (b, <=T)
            for row in out.tolist():
                if eos in row[1:]:
                    row = row[:row.index(eos, 1) + 1]
                stream.extend(row if row[-1] == eos else row + [eos])
    finally:
        torch.set_rng_state(g_state)
    return pack(torch.tensor(stream[:n * seq_len], dtype=torch.long), seq_len)  # (n, T)


def conversion_data(cfg: ConvertConfig, tokenizer, teacher, cache: Path | None = None) -> ConvertData:
    """Training blocks and held-out streams of `cfg`. Teacher samples are cached in `cache` (a .pt file) so that a
    resumed run trains on the very same sequences."""
    n = cfg.teacher_samples
    if n is None:
        corpus = _text_corpus(cfg.data, cfg, tokenizer)
        heldout = corpus.heldout
        if cfg.eval_data is not None:
            heldout = _text_corpus(cfg.eval_data, cfg, tokenizer).heldout
        return ConvertData(corpus.train, heldout, ", ".join(cfg.data))
    if cache is not None and cache.exists():
        blocks = torch.load(cache, weights_only=True)
    else:
        blocks = sample_teacher(teacher, tokenizer, n, cfg.seq_len, cfg.teacher_samples_temperature, cfg.seed)
        if cache is not None:
            import io

            from bitllm.formats.atomic import atomic_write_bytes

            buf = io.BytesIO()
            torch.save(blocks, buf)
            atomic_write_bytes(cache, buf.getvalue())
    heldout = _text_corpus(cfg.eval_data or ["bundled"], cfg, tokenizer).heldout
    return ConvertData(blocks, heldout, f"{n} sequences sampled from the teacher (T={cfg.teacher_samples_temperature})")
