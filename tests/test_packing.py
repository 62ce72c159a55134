"""Exact pack/unpack round trips (property-tested) and the byte examples of docs/formats.md."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitllm.errors import FormatError
from bitllm.formats.packing import (
    PackFormat,
    pack,
    pack_hf_bitnet,
    packed_shape,
    unpack,
    unpack_hf_bitnet,
)


def _weights(fmt, out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    if fmt is PackFormat.B1:
        return (torch.randint(0, 2, (out_f, in_f), generator=g) * 2 - 1).to(torch.int8)
    return torch.randint(-1, 2, (out_f, in_f), generator=g).to(torch.int8)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(PackFormat)), st.integers(1, 19), st.integers(1, 75), st.integers(0, 2**31))
def test_round_trip_odd_shapes(fmt, out_f, in_f, seed):
    w = _weights(fmt, out_f, in_f, seed)
    p = pack(fmt, w)
    assert p.dtype == torch.uint8 and tuple(p.shape) == packed_shape(fmt, out_f, in_f)
    assert torch.equal(unpack(fmt, p, (out_f, in_f)), w)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 23), st.integers(1, 40), st.integers(0, 2**31))
def test_hf_layout_round_trip_and_agrees_with_transformers(out_f, in_f, seed):
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    w = _weights(PackFormat.I2, out_f, in_f, seed)
    p = pack_hf_bitnet(w)
    assert torch.equal(unpack_hf_bitnet(p, out_f), w)
    if out_f % 4 == 0:  # transformers' own packer (it mutates its input, so give it a copy)
        assert torch.equal(p, pack_weights(w.clone().to(torch.int32)))
        assert torch.equal(unpack_weights(p, torch.float32), w.float())


def test_byte_examples_from_formats_doc():
    assert pack("i2", torch.tensor([[-1, 0, 1, 1]], dtype=torch.int8)).tolist() == [[164]]
    assert pack("t1", torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int8)).tolist() == [[156]]
    assert pack("b1", torch.tensor([[1, -1, 1, 1, 1, 1, 1, -1]], dtype=torch.int8)).tolist() == [[130]]
    # HF layout: rows 0,2,4,6 of column 0 = (-1, 0, -1, +1) with 8 rows -> R'=2, byte [0,0] holds rows 0,2,4,6
    w = torch.zeros(8, 1, dtype=torch.int8)
    w[[0, 2, 4, 6], 0] = torch.tensor([-1, 0, -1, 1], dtype=torch.int8)
    assert pack_hf_bitnet(w)[0, 0].item() == 0b10_00_01_00
    # padding: in=5 -> I2 pads 3 columns with code 1 (weight 0)
    assert pack("i2", torch.tensor([[1, 1, 1, 1, 1]], dtype=torch.int8)).tolist() == [[170, 0b01_01_01_10]]


def test_invalid_input_and_bytes():
    with pytest.raises(FormatError, match=r"\[-1, 1\]"):
        pack("i2", torch.tensor([[2]], dtype=torch.int8))
    with pytest.raises(FormatError, match="found 0"):
        pack("b1", torch.tensor([[0, 1]], dtype=torch.int8))
    with pytest.raises(FormatError, match="code 3"):
        unpack("i2", torch.tensor([[0xFF]], dtype=torch.uint8), (1, 4))
    with pytest.raises(FormatError, match="242"):
        unpack("t1", torch.tensor([[250]], dtype=torch.uint8), (1, 5))
    with pytest.raises(FormatError, match="shape"):
        unpack("b1", torch.zeros(2, 2, dtype=torch.uint8), (2, 24))
    with pytest.raises(FormatError, match="uint8"):
        unpack("i2", torch.zeros(1, 1, dtype=torch.int8), (1, 4))
    with pytest.raises(FormatError, match="cannot hold"):
        unpack_hf_bitnet(torch.zeros(1, 3, dtype=torch.uint8), 9)


def test_bits_per_weight():
    assert [f.bits_per_weight for f in PackFormat] == [2.0, 1.6, 1.0]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(list(PackFormat)), st.integers(1, 6), st.integers(1, 30), st.data())
def test_unpack_of_arbitrary_bytes(fmt, out_f, in_f, data):
    """Any bytes of the right shape unpack to valid weights or raise FormatError (I2 code 3, T1 byte > 242);
    valid bytes round-trip through pack() up to the padding columns."""
    nbytes = packed_shape(fmt, out_f, in_f)[1]
    raw = data.draw(st.binary(min_size=out_f * nbytes, max_size=out_f * nbytes))
    p = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(out_f, nbytes)
    try:
        w = unpack(fmt, p, (out_f, in_f))
    except FormatError:
        return
    assert w.dtype == torch.int8 and tuple(w.shape) == (out_f, in_f)
    assert set(w.unique().tolist()) <= ({-1, 1} if fmt is PackFormat.B1 else {-1, 0, 1})
    assert torch.equal(unpack(fmt, pack(fmt, w), (out_f, in_f)), w)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 13), st.integers(1, 9), st.data())
def test_hf_unpack_of_arbitrary_bytes(out_f, in_f, data):
    rp = (out_f + 3) // 4
    raw = data.draw(st.binary(min_size=rp * in_f, max_size=rp * in_f))
    p = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(rp, in_f)
    try:
        w = unpack_hf_bitnet(p, out_f)
    except FormatError:
        return
    assert tuple(w.shape) == (out_f, in_f) and set(w.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(unpack_hf_bitnet(pack_hf_bitnet(w), out_f), w)
