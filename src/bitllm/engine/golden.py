"""Golden tiny models: random-init, quantized, saved, and decoded greedily by the HF reference path.

Used by the golden tests (HF reference path == packed HF path == C++ engine, token for token) and
by the standalone C++ test (the engine file carries the prompt and the reference tokens).
A model qualifies only if its greedy continuation is not one repeated token and, at every step,
the top-2 logit margin exceeds twice the logit budget, so that a correct engine cannot flip a token
by rounding alone while a wrong one (e.g. SiLU for ReLU²) is caught.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitllm.errors import BitLLMError

# Logit budget of the engine against the reference, per step: fp32 summation order (weight-only
# kernels, norms, attention) and int8 rounding ties may differ; both scale with the logits.
LOGIT_BUDGET_REL = 1e-3  # of the step's max |logit|
LOGIT_BUDGET_ABS = 1e-4
PROMPT = [1, 5, 9, 13, 21]
STEPS = 64


def logit_budget(ref_logits: np.ndarray) -> np.ndarray:
    """(steps,) allowed max |engine - reference| per step."""
    return LOGIT_BUDGET_ABS + LOGIT_BUDGET_REL * np.abs(ref_logits).max(axis=-1)


@contextmanager
def kernel_mode(mode: str):
    old = os.environ.get("BITLLM_KERNEL")
    os.environ["BITLLM_KERNEL"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BITLLM_KERNEL", None)
        else:
            os.environ["BITLLM_KERNEL"] = old


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], steps: int = STEPS) -> tuple[list[int], np.ndarray]:
    """Greedy decode with the transformers model (KV cache); returns (tokens, (steps, vocab) logits)."""
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    toks, logits = [], []
    for t in range(steps):
        lg = out.logits[0, -1].float()
        logits.append(lg.numpy().copy())
        toks.append(int(lg.argmax()))
        pos = torch.tensor([[len(prompt) + t]])
        out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True,
                    position_ids=pos)
    return toks, np.stack(logits)


@dataclass
class Golden:
    directory: Path
    family: str
    method: str
    fmt: str
    seed: int
    prompt: list[int]
    tokens: list[int]
    logits: np.ndarray  # (steps, vocab) of the HF reference path

    def margins(self) -> np.ndarray:
        s = np.sort(self.logits, axis=-1)
        return s[:, -1] - s[:, -2]


def _scaled_tiny(family: str, seed: int, hidden: int, vocab: int, embed_std: float = 1.0):
    """A tiny model with O(1) embeddings (fp16-exact, as the engine stores them) and weights large
    enough that the continuation wanders instead of repeating one token."""
    from bitllm.tiny import tiny_model

    model = tiny_model(family, seed=seed, hidden=hidden, vocab_size=vocab, initializer_range=0.5, layers=2)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0.0, embed_std)
        emb.copy_(emb.half().float())
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight.normal_(0.0, 0.2)
            head.weight.copy_(head.weight.half().float())
        for name, p in model.named_parameters():  # norms: keep near 1, but not exactly (catches a missed gain)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
    return model


def make_golden(directory: str | Path, family: str, method: str, fmt: str, *, seeds=range(8), hidden: int = 64,
                vocab: int = 128, steps: int = STEPS, input_norm: bool = False, embed_std: float = 1.0) -> Golden:
    """Search the first seed whose reference continuation qualifies; save it under `directory`."""
    import bitllm
    from bitllm.formats.checkpoint import from_pretrained, save_pretrained
    from bitllm.quant.config import config_for

    kwargs = {"input_norm": True} if input_norm else {}
    directory = Path(directory)
    for seed in seeds:
        model = _scaled_tiny(family, seed, hidden, vocab, embed_std)
        bitllm.quantize_(model, config_for(method, **kwargs))
        d = directory / f"{family}-{method}-{fmt}-s{seed}"
        save_pretrained(model, d, fmt)
        with kernel_mode("reference"):
            toks, logits = hf_greedy(from_pretrained(d), PROMPT, steps)
        g = Golden(d, family, method, fmt, seed, list(PROMPT), toks, logits)
        if len(set(toks)) >= 4 and (g.margins() > 2 * logit_budget(logits)).all():
            return g
    raise BitLLMError(f"no seed in {list(seeds)} gives a qualifying golden {family}/{method}/{fmt} model")
