"""Held-out text never reaches training; tokenization, packing and batch order are deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from bitllm.errors import BitLLMError
from bitllm.train.config import DataConfig
from bitllm.train.data import batch_indices, build_corpus, read_sources, split_source, unigram_perplexity, eval_windows
from train_helpers import MARKER, write_corpus


def _data(root, **kw) -> DataConfig:
    return DataConfig(train=[str(root)], heldout_ood=[], **kw)


def test_heldout_text_never_appears_in_training_sequences(tmp_path):
    root = write_corpus(tmp_path / "c")
    corpus = build_corpus(_data(root), seq_len=32, vocab_size=300)
    tok = corpus.tokenizer
    train_text = tok.decode(corpus.train.reshape(-1).tolist())
    held_text = tok.decode(corpus.heldout["in-domain"].tolist())
    assert MARKER not in train_text
    assert held_text.count(MARKER) == 2 * int(1500 * 0.03)  # every marked line, from both sources
    # the held-out part is the last 5 %: its size is ~5 % of every source
    n_held = corpus.heldout["in-domain"].numel()
    assert 0.03 < n_held / (n_held + corpus.train.numel()) < 0.08


def test_split_cuts_at_a_line_start():
    train, held = split_source("one\ntwo\nthree\nfour\n" * 10, 0.05)
    assert train + held == "one\ntwo\nthree\nfour\n" * 10
    assert train.endswith("\n") and 0 < len(held) < 0.1 * len(train)


def test_tokenization_and_packing_are_deterministic(tmp_path):
    root = write_corpus(tmp_path / "c")
    a = build_corpus(_data(root), seq_len=16, vocab_size=300)
    b = build_corpus(_data(root), seq_len=16, vocab_size=300)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout["in-domain"], b.heldout["in-domain"])
    assert a.train.shape[1] == 16 and a.train.dtype == torch.long
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def test_batch_order_is_seeded_and_covers_every_block_per_epoch():
    n, bs = 37, 8
    first = torch.cat([batch_indices(n, s, bs, seed=3) for s in range(20)])
    again = torch.cat([batch_indices(n, s, bs, seed=3) for s in range(20)])
    other = torch.cat([batch_indices(n, s, bs, seed=4) for s in range(20)])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first[:n].tolist()) == list(range(n))  # epoch 0 is a permutation
    assert sorted(first[n:2 * n].tolist()) == list(range(n))


def test_readers_txt_jsonl_json_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "verse one"}) + "\n" + json.dumps({"text": "verse two"}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"X": {"title": "X", "extract": "lead of X"}}))
    (tmp_path / "c.txt").write_text("plain text\n")
    srcs = read_sources([str(tmp_path)], "train")
    assert [s.text for s in srcs] == ["verse one\nverse two", "lead of X", "plain text\n"]
    with pytest.raises(BitLLMError, match="neither a file"):
        read_sources([str(tmp_path / "missing")], "train")


def test_unigram_floor_is_the_uniform_perplexity_for_uniform_counts():
    counts = torch.ones(10, dtype=torch.float64) * 5
    windows = torch.arange(40).remainder(10).view(4, 10)
    assert unigram_perplexity(counts, windows) == pytest.approx(10.0)
    assert eval_windows(torch.arange(100), 16, 64).shape == (4, 16)
