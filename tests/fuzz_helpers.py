"""Damaged copies of a file for the property tests of every reader (STYLE.md "Tests")."""

from __future__ import annotations

from hypothesis import strategies as st


def draw_damaged(data, raw: bytes, header_end: int) -> bytes:
    """A prefix of `raw`, or `raw` with 1-3 bytes of its header (bytes [0, header_end)) overwritten."""
    raw = bytearray(raw)
    if data.draw(st.booleans(), label="truncate"):
        return bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="length")])
    for at, byte in data.draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1,
                                       max_size=3), label="edits"):
        raw[at] = byte
    return bytes(raw)
