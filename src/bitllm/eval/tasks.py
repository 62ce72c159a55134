"""Offline zero-shot tasks built from held-out text, as lm-eval YAML tasks + JSONL.

No zero-shot benchmark data is installable here (DESIGN.md §7), so bitllm builds two honest,
reproducible task families from text its models never trained on (bitllm.train's held-out split:
the last 5 % of every Shakespeare play and of the KJV, and the Wikipedia leads, held out whole):

- `local_lambada_{id,ood}`: LAMBADA-style last-word cloze (arXiv 1606.06031). A passage of about
  `cloze_words` words ending in a word of >= 3 letters; the model scores that word as the
  continuation. Metrics as lm-eval's lambada_openai: acc (the word is the greedy continuation) and
  perplexity.
- `local_nextsent_{id,ood}`: next-sentence choice. Three sentences of context; the true next
  sentence against 3 distractor sentences drawn from elsewhere in the same held-out split (length
  within 0.5x..2x of the true one). Metrics acc and acc_norm, chance 25 %.

Every task carries the tag `local`: `lm_eval --tasks local --include_path DIR` (or
`bitllm eval MODEL --tasks local`) runs them all. Building is deterministic (seeded per task) and
drops any passage that also occurs verbatim in the training split.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from bitllm.errors import BitLLMError

TAG = "local"
_WORD_END = re.compile(r"[A-Za-z]{3,}(?=[^A-Za-z'\-]|$)")
_SENTENCE = re.compile(r"[^.!?]*[A-Za-z][^.!?]*[.!?]+[\"')\]]*")


@dataclass
class Split:
    name: str  # "id" | "ood"
    held: list[str]  # held-out texts to draw passages from
    train: str  # training text (joined) that no passage may occur in
    _train_norm: str | None = None

    @property
    def train_norm(self) -> str:
        """The training text with runs of whitespace as single spaces (sentences are compared so)."""
        if self._train_norm is None:
            self._train_norm = " ".join(self.train.split())
        return self._train_norm


def bundled_splits() -> list[Split]:
    """The bundled corpus cut exactly as bitllm.train cuts it (DataConfig defaults)."""
    from bitllm.train.config import DataConfig
    from bitllm.train.data import read_sources, split_source

    frac = DataConfig().holdout_frac
    cuts = [split_source(s.text, frac) for s in read_sources(["bundled"], "train")]
    train = "\x00".join(t for t, _ in cuts)
    held = [h for _, h in cuts if h.strip()]
    ood = [s.text for s in read_sources(["bundled"], "ood")]
    return [Split("id", held, train), Split("ood", ood, train)]


def _boundary(text: str, start: int) -> int:
    """The next line start after `start` (within 400 characters), else the next sentence start, else 0."""
    nl = text.find("\n", start, start + 400)
    if nl >= 0:
        return nl + 1
    m = re.compile(r"[.!?][\"')\]]*\s+").search(text, start)
    return m.end() if m else 0


def _sentences(text: str) -> list[str]:
    out = [" ".join(m.group(0).split()) for m in _SENTENCE.finditer(text)]
    return [s for s in out if 3 <= len(s.split()) <= 40]


def _pick_text(rng: random.Random, texts: list[str], min_chars: int) -> str:
    weights = [len(t) if len(t) >= min_chars else 0 for t in texts]
    if not any(weights):
        raise BitLLMError(f"no held-out text of at least {min_chars} characters to build tasks from")
    return rng.choices(texts, weights=weights)[0]


def cloze_docs(split: Split, n: int, seed: int, words: int = 60, max_tries: int = 50) -> list[dict]:
    """LAMBADA-style docs {"context", "target"} (target keeps its leading separator, " word" or "\\nword")."""
    rng = random.Random(f"bitllm-cloze-{split.name}-{seed}")
    docs, seen = [], set()
    for _ in range(n * max_tries):
        if len(docs) == n:
            break
        text = _pick_text(rng, split.held, words * 12)
        start = rng.randrange(0, max(1, len(text) - words * 12))
        start = _boundary(text, start)
        pieces = text[start:start + words * 12].split(" ")
        span = " ".join(pieces[:words])
        ends = list(_WORD_END.finditer(span))
        if not ends:
            continue
        m = ends[-1]
        if m.start() == 0 or not span[m.start() - 1].isspace():
            continue
        context, target = span[: m.start() - 1].strip(), span[m.start() - 1: m.end()]
        passage = context + target
        if len(context.split()) < words // 2 or passage in seen or passage in split.train:
            continue
        seen.add(passage)
        docs.append({"context": context, "target": target})
    if len(docs) < n:
        raise BitLLMError(f"could build only {len(docs)} of {n} cloze passages from the {split.name} held-out text")
    return docs


def nextsent_docs(split: Split, n: int, seed: int, k_context: int = 3, n_choices: int = 4,
                  max_tries: int = 50) -> list[dict]:
    """Next-sentence docs {"context", "choices", "label"}; choices start with a space."""
    rng = random.Random(f"bitllm-nextsent-{split.name}-{seed}")
    docs, seen = [], set()
    for _ in range(n * max_tries):
        if len(docs) == n:
            break
        text = _pick_text(rng, split.held, 300)
        start = rng.randrange(0, max(1, len(text) - 4000))
        sents = _sentences(text[start:start + 4000])[1 if start else 0:]  # a window's first sentence may be cut
        if len(sents) < k_context + 1:
            continue
        i = rng.randrange(k_context, len(sents))
        context, true = " ".join(sents[i - k_context:i]), sents[i]
        pool = [s for j, s in enumerate(sents) if abs(j - i) > 1 and s != true and s not in context]
        while len(set(pool)) < 3 * n_choices:  # short texts (Wikipedia leads): distractors from other texts too
            other = _pick_text(rng, split.held, 300)
            o = rng.randrange(0, max(1, len(other) - 2000))
            pool += [s for s in _sentences(other[o:o + 2000])[1 if o else 0:] if s != true and s not in context]
        pool = [s for s in dict.fromkeys(pool) if 0.5 <= len(s) / len(true) <= 2.0]
        if len(pool) < n_choices - 1:
            continue
        choices = [true] + rng.sample(pool, n_choices - 1)
        rng.shuffle(choices)
        passage = context + " " + true
        if passage in seen or passage in split.train_norm:
            continue
        seen.add(passage)
        docs.append({"context": context, "choices": [" " + c for c in choices], "label": choices.index(true)})
    if len(docs) < n:
        raise BitLLMError(f"could build only {len(docs)} of {n} next-sentence docs from the {split.name} held-out text")
    return docs


_CLOZE_YAML = """\
task: {name}
tag: [{tag}]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "{desc}"
"""

_MC_YAML = """\
task: {name}
tag: [{tag}]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "{desc}"
"""


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_local_tasks(out_dir: str | Path, n: int = 200, seed: int = 1234, splits: list[Split] | None = None,
                      cloze_words: int = 60) -> dict:
    """Write the local tasks (YAML + JSONL, absolute data paths) under `out_dir`; returns the manifest
    (also written as manifest.json) with each file's sha256, so two builds can be compared."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    splits = splits if splits is not None else bundled_splits()
    manifest = {"seed": seed, "n": n, "tag": TAG, "tasks": {}}
    for split in splits:
        where = "in-domain held-out text (last 5 % of each training source)" if split.name == "id" else \
            "out-of-domain held-out text (never trained on)"
        for family, docs, template in (
            ("lambada", cloze_docs(split, n, seed, words=cloze_words), _CLOZE_YAML),
            ("nextsent", nextsent_docs(split, n, seed), _MC_YAML),
        ):
            name = f"local_{family}_{split.name}"
            data = out / f"{name}.jsonl"
            h = _write(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
            desc = ("last-word cloze" if family == "lambada" else "next-sentence choice, 4 options") + ", " + where
            _write(out / f"{name}.yaml", template.format(name=name, tag=TAG, data=json.dumps(str(data)), desc=desc))
            manifest["tasks"][name] = {"docs": len(docs), "jsonl": data.name, "sha256": h, "description": desc}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def default_task_dir() -> Path:
    """Where `bitllm eval --tasks local` builds (once) and finds the local tasks."""
    import os

    root = Path(os.environ.get("BITLLM_CACHE", Path.home() / ".cache" / "bitllm"))
    return root / "lm_eval_tasks"
