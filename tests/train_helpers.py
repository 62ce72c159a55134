"""Shared pieces of the training tests: a small learnable corpus written into tmp_path and a tiny config."""

from __future__ import annotations

import random
from pathlib import Path

from bitllm.train.config import TrainConfig, preset_config

MARKER = "Zyqxvel"  # only ever written into the held-out tail of each source

_DET = ["the", "a", "my", "our", "this"]
_ADJ = ["old", "red", "quiet", "brave", "small", "green", "proud"]
_NOUN = ["king", "queen", "river", "sword", "castle", "horse", "garden", "storm"]
_VERB = ["sees", "takes", "guards", "follows", "praises", "fears", "finds"]


def sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_DET).capitalize()} {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} "
            f"{rng.choice(_DET)} {rng.choice(_NOUN)}.")


def write_corpus(root: Path, n_files: int = 2, lines: int = 1500, seed: int = 0) -> Path:
    """`n_files` .txt sources of grammar sentences; the last 3 % of each source's lines carry MARKER."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        body = [sentence(rng) for _ in range(lines)]
        tail = int(lines * 0.03)
        body[-tail:] = [f"{MARKER} {i} {sentence(rng)}" for i in range(tail)]
        (root / f"source{f}.txt").write_text("\n".join(body) + "\n")
    return root


def tiny_config(tmp_path: Path, quant: str = "ternary", **overrides) -> TrainConfig:
    corpus = write_corpus(tmp_path / "corpus")
    base = {"data.train": [str(corpus)], "data.heldout_ood": [], "data.max_eval_tokens": 4096,
            "output_dir": str(tmp_path / f"run-{quant}"), "steps": 40}
    return preset_config("tiny", quant=quant, overrides={**base, **overrides})
