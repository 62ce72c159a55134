"""Token strings for log-probability records: each token's text in the context of the tokens before it.

Decoding one token alone loses what depends on its neighbours (a SentencePiece word's leading
space, a UTF-8 character split over two byte tokens), so a token's piece is the text that it adds
to the decoding of up to `CONTEXT` tokens before it — the incremental detokenization of streaming
servers. Alternatives (the top-n of a position) are pieces in the same context. Special tokens
show as their text ("</s>"); they take no room in the answer's text (`visible_lengths`). A byte
token that ends in the middle of a UTF-8 character shows as U+FFFD; the token that completes the
character carries it.
"""

from __future__ import annotations

from typing import Sequence as Seq

CONTEXT = 6  # tokens of left context: enough for a multi-byte character or a word boundary


def _piece(tokenizer, before: list[int], base: str, tok: int) -> str:
    text = tokenizer.decode(before + [tok], skip_special_tokens=False)
    return text[len(base):] if text.startswith(base) else text[len(base.rstrip("\ufffd")):]


def token_strings(tokenizer, ids: Seq[int], start: int = 0,
                  alternatives: Seq[Seq[int]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Pieces of ids[start:], each in the context of the ids before it, and the pieces of each
    position's `alternatives` (alternatives[i] belongs to ids[start + i]) in the same context."""
    ids = [int(t) for t in ids]
    pieces: list[str] = []
    alt_pieces: list[list[str]] = []
    for i in range(start, len(ids)):
        before = ids[max(0, i - CONTEXT): i]
        base = tokenizer.decode(before, skip_special_tokens=False) if before else ""
        pieces.append(_piece(tokenizer, before, base, ids[i]))
        if alternatives is not None:
            alt_pieces.append([_piece(tokenizer, before, base, int(a)) for a in alternatives[i - start]])
    return pieces, alt_pieces


def visible_lengths(tokenizer, ids: Seq[int], pieces: Seq[str]) -> list[int]:
    """How many characters of the decoded answer each piece takes: 0 for special tokens, which
    decoding with skip_special_tokens leaves out, and for the U+FFFD of a partial character."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    return [0 if int(t) in special else len(p.replace("\ufffd", "")) for t, p in zip(ids, pieces)]
