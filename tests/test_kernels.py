"""Native kernels (bitllm.kernels / bitllm._core): bit-exact against torch references.

- the pinned activation quantizer vs torch, bit for bit (ties included);
- `generic` A8 vs an int64 torch matmul with the pinned fp32 epilogue, bit for bit;
- `generic` F32 vs a torch re-implementation of the canonical 16-lane summation order;
- every other variant vs `generic`, bit for bit, on awkward shapes. Variants this CPU lacks are
  reported as skipped (with the reason), never as passed; tests/conftest.py prints a summary line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitllm import kernels as bk
from bitllm.errors import FormatError

ALL_ISAS = ["generic", "avx2", "avx512", "neon", "neon_dotprod"]
FORMATS = ["i2", "t1", "b1"]

# (M, N, K): N=1, K=1, K and N off every block size (128, 160, 256), M on both sides of the GEMM
# switch (M >= 2 decodes each row tile once; 2100 spans several K chunks of the micro-kernel).
SHAPES = [
    (1, 1, 1),
    (1, 1, 300),
    (1, 3, 1),
    (1, 7, 33),
    (2, 17, 127),
    (3, 5, 161),
    (1, 37, 257),
    (4, 19, 300),
    (5, 33, 1000),
    (1, 70, 1536),
    (9, 65, 1601),
    (7, 13, 700),
    (16, 40, 2100),
    (4, 200, 1100),  # b1: three whole 64-row tiles and a partial one, two K chunks
    (1, 33, 4000),  # a GEMV with K >= 2N: the table kernels split K between the threads
    (17, 9, 1100),
    (130, 23, 515),
]


def isa_param(isa: str):
    """pytest param for a variant, skipped with the reason when this CPU/build cannot run it."""
    marks = []
    if isa not in bk.available_isas():
        why = "not compiled for this architecture" if isa not in bk.compiled_isas() else "this CPU lacks it"
        marks.append(pytest.mark.skip(reason=f"kernel variant {isa}: {why}"))
    return pytest.param(isa, id=f"isa-{isa}", marks=marks)


def random_weights(fmt: str, N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    if fmt == "b1":
        return (torch.randint(0, 2, (N, K), generator=gen) * 2 - 1).to(torch.int8)
    return torch.randint(-1, 2, (N, K), generator=gen).to(torch.int8)


def torch_quantize(x: torch.Tensor):
    """The pinned quantizer, written exactly as DESIGN.md §2 states it."""
    s = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    q = (x * s).round().clamp(-128, 127)
    return q.to(torch.int8), s.squeeze(-1)


def a8_reference(W, q, xscale, wscale, bias):
    acc = (q.long() @ W.long().T).to(torch.int32)  # (M, N), exact
    out = (acc.float() / xscale[:, None]) * wscale[None, :]
    return out + bias[None, :] if bias is not None else out


def f32_reference(W, x, wscale, bias):
    """Canonical order: 16 lanes (lane j takes k ≡ j mod 16, increasing k), then a fixed tree."""
    M, K = x.shape
    Kp = (K + 15) // 16 * 16
    xw = torch.zeros(M, Kp)
    xw[:, :K] = x
    Wp = torch.zeros(W.shape[0], Kp, dtype=torch.int8)
    Wp[:, :K] = W
    # Signed selection without multiplying: +x, -x or +0.0
    sel = torch.where(Wp[None] == 1, xw[:, None, :], torch.where(Wp[None] == -1, -xw[:, None, :], torch.zeros(())))
    lanes = torch.zeros(M, W.shape[0], 16)
    for t in range(Kp // 16):  # one IEEE add per lane per step, in increasing k
        lanes = lanes + sel[:, :, 16 * t : 16 * t + 16]
    s8 = lanes[..., :8] + lanes[..., 8:]
    s4 = s8[..., :4] + s8[..., 4:]
    s2 = s4[..., :2] + s4[..., 2:]
    acc = s2[..., 0] + s2[..., 1]
    out = acc * wscale[None, :]
    return out + bias[None, :] if bias is not None else out


# ---------------------------------------------------------------------------------------------
# Quantizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", [isa_param(i) for i in ALL_ISAS])
def test_quantizer_matches_torch_bit_exact(isa):
    gen = torch.Generator().manual_seed(0)
    rows = [
        torch.randn(4, 777, generator=gen) * 3,
        torch.zeros(1, 64),  # max clamps to 1e-5
        torch.full((1, 9), 1e-7),
        torch.randn(2, 33, generator=gen) * 1e4,
    ]
    # Exact ties: with max|x| = 127 the scale is exactly 1, so k + 0.5 must round to even.
    ties = torch.arange(-127, 127, dtype=torch.float32) + 0.5
    ties = torch.cat([ties, torch.tensor([127.0])])[None, :]
    rows.append(ties)
    rows.append(torch.randn(3, 4099, generator=gen))  # SIMD body + scalar tail
    for x in rows:
        q, s, sums = bk.quantize_activations(x, isa=isa)
        q_ref, s_ref = torch_quantize(x)
        assert torch.equal(s, s_ref)
        assert torch.equal(q, q_ref)
        assert torch.equal(sums, q_ref.int().sum(-1, dtype=torch.int32))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 300), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_quantizer_property(M, K, scale, seed):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)) * scale
    q, s, _ = bk.quantize_activations(x)
    q_ref, s_ref = torch_quantize(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(FORMATS), st.integers(1, 9), st.integers(1, 700), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(fmt, N, K, seed):
    W = random_weights(fmt, N, K, torch.Generator().manual_seed(seed))
    p = bk.pack(fmt, W)
    tile = {"i2": 1, "t1": 16, "b1": 64}[fmt]  # t1 and b1 interleave rows in tiles of 16 and 64
    rows = -(-N // tile) * tile
    trailer = 4 if fmt == "t1" else 0  # t1: an int32 per stored row, its count of set sign bits
    assert p.data.numel() == rows * (bk._core.row_bytes(fmt, K) + trailer)
    assert torch.equal(p.unpack(), W)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 40), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_t1_layout_sign_folded_with_per_row_sign_counts(N, K, seed):
    # docs/formats.md §5: a group's pattern v = c0 + 3c1 + 9c2 is stored as nibble |v - 13| and sign
    # bit (v < 13); after the blocks, one int32 per stored row counts its set sign bits.
    W = random_weights("t1", N, K, torch.Generator().manual_seed(seed))
    p = bk.pack("t1", W)
    rows, rb = -(-N // 16) * 16, bk._core.row_bytes("t1", K)
    Kp = rb // 10 * 48
    c = torch.ones(rows, Kp, dtype=torch.int64)  # padding columns and rows: w = 0
    c[:N, :K] = W.to(torch.int64) + 1
    v = c[:, 0::3] + 3 * c[:, 1::3] + 9 * c[:, 2::3]  # (rows, groups)
    expected = (v < 13).sum(1).to(torch.int32)
    got = p.data[rows * rb:].view(torch.int32)
    assert torch.equal(got, expected)


def test_bits_per_weight():
    # the t1 kernel layout spends 5 bits on 3 weights (its file format: 8 bits on 5) and 32 bits per row
    for fmt, bpw in [("i2", 2.0), ("t1", 5 / 3 + 32 / 2880), ("b1", 1.0)]:
        K = {"i2": 1280, "t1": 2880, "b1": 2560}[fmt]  # whole blocks
        p = bk.pack(fmt, torch.zeros(64, K, dtype=torch.int8) + (1 if fmt == "b1" else 0))  # whole tiles
        assert p.bits_per_weight == pytest.approx(bpw, rel=1e-12)


@pytest.mark.parametrize("K", [300, 1300])  # one K chunk; 6 blocks = chunks of 4 and 2
def test_b1_kernel_layout_interleaves_tiles_of_64_rows_in_k_chunks(K):
    # docs/formats.md §5: byte j of block b of row 64t+r sits at 2048*(4cT + t*n_c + b - 4c) + 64j + r
    # (c = b // 4, n_c blocks in chunk c, T tiles); its bit i is 1 iff column 256b + 8j + i is -1
    # (the file layout's byte); padding columns are +1 and padding rows zero.
    N, T = 70, 2
    W = random_weights("b1", N, K, torch.Generator().manual_seed(0))
    rb = bk._core.row_bytes("b1", K)
    nb = rb // 32
    data = bk.pack("b1", W).data
    assert data.numel() == T * 64 * rb
    bits = torch.zeros(N, rb * 8, dtype=torch.int64)
    bits[:, :K] = (W == -1).long()
    want = (bits.view(N, rb, 8) << torch.arange(8)).sum(-1).to(torch.uint8)  # (N, rb)
    for n in range(T * 64):
        t, r = divmod(n, 64)
        for b in range(nb):
            c = b // 4
            n_c = min(4, nb - 4 * c)
            start = 2048 * (4 * c * T + t * n_c + b - 4 * c)
            got = data[start + r:start + 2048:64]  # the 32 bytes of row n in tile-block (t, b)
            assert torch.equal(got, want[n, 32 * b:32 * b + 32] if n < N else torch.zeros(32, dtype=torch.uint8)), (n, b)


def test_pack_rejects_bad_input():
    with pytest.raises(FormatError, match="outside the alphabet"):
        bk.pack("i2", torch.tensor([[0, 2]], dtype=torch.int8))
    with pytest.raises(FormatError, match=r"\[0, 1\] = 0"):
        bk.pack("b1", torch.tensor([[1, 0]], dtype=torch.int8))
    with pytest.raises(FormatError, match="unknown kernel format"):
        bk.pack("q4", torch.zeros(1, 1, dtype=torch.int8))
    with pytest.raises(ValueError, match="dtype"):
        bk.pack("i2", torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        bk.pack("i2", torch.zeros(4, 4, dtype=torch.int8).T[:, :3])
    with pytest.raises(ValueError, match="dimensions"):
        bk.pack("i2", torch.zeros(4, dtype=torch.int8))
    # numpy works too (no copy)
    assert bk.pack("t1", np.zeros((2, 3), dtype=np.int8)).N == 2


def test_packed_weight_checks_its_buffer():
    p = bk.pack("i2", torch.zeros(3, 10, dtype=torch.int8))
    with pytest.raises(FormatError, match="needs 96"):
        bk.PackedWeight(p.fmt, 3, 10, p.data[:-1].clone())
    with pytest.raises(FormatError, match="uint8"):
        bk.PackedWeight(p.fmt, 3, 10, p.data.to(torch.int8))


def test_linear_rejects_bad_input():
    p = bk.pack("i2", torch.zeros(3, 10, dtype=torch.int8))
    ws = torch.ones(3)
    with pytest.raises(ValueError, match=r"expected \(M, 10\)"):
        bk.linear_a8(p, torch.zeros(1, 11), ws)
    with pytest.raises(ValueError, match="dtype"):
        bk.linear_a8(p, torch.zeros(1, 10, dtype=torch.float64), ws)
    with pytest.raises(ValueError, match="wscale"):
        bk.linear_f32(p, torch.zeros(1, 10), torch.ones(4))
    with pytest.raises(ValueError, match="bias"):
        bk.linear_f32(p, torch.zeros(1, 10), ws, torch.ones(2))
    with pytest.raises(ValueError, match="contiguous"):
        bk.linear_a8(p, torch.zeros(10, 2).T, ws)
    with pytest.raises(ValueError, match="kernel variant 'sse9'"):
        bk.linear_a8(p, torch.zeros(1, 10), ws, isa="sse9")


# ---------------------------------------------------------------------------------------------
# generic vs torch references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_generic_a8_matches_int_reference(fmt):
    gen = torch.Generator().manual_seed(1)
    for M, N, K in SHAPES:
        W = random_weights(fmt, N, K, gen)
        x = torch.randn(M, K, generator=gen)
        ws, bias = torch.rand(N, generator=gen) + 0.5, torch.randn(N, generator=gen)
        p = bk.pack(fmt, W)
        q, s = torch_quantize(x)
        for b in (bias, None):
            out = bk.linear_a8(p, x, ws, b, isa="generic")
            assert torch.equal(out, a8_reference(W, q, s, ws, b)), (M, N, K)


@pytest.mark.parametrize("fmt", FORMATS)
def test_generic_f32_matches_canonical_order(fmt):
    gen = torch.Generator().manual_seed(2)
    for M, N, K in [s for s in SHAPES if s[0] * s[1] * s[2] < 400_000]:
        W = random_weights(fmt, N, K, gen)
        x = torch.randn(M, K, generator=gen)
        ws, bias = torch.rand(N, generator=gen) + 0.5, torch.randn(N, generator=gen)
        p = bk.pack(fmt, W)
        out = bk.linear_f32(p, x, ws, bias, isa="generic")
        assert torch.equal(out, f32_reference(W, x, ws, bias)), (M, N, K)
        assert torch.allclose(out, x @ W.float().T * ws + bias, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# every variant vs generic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", [isa_param(i) for i in ALL_ISAS if i != "generic"])
def test_variant_matches_generic(isa, fmt):
    gen = torch.Generator().manual_seed(3)
    for M, N, K in SHAPES:
        W = random_weights(fmt, N, K, gen)
        x = torch.randn(M, K, generator=gen) * 2
        ws, bias = torch.rand(N, generator=gen) + 0.5, torch.randn(N, generator=gen)
        p = bk.pack(fmt, W)
        for b in (bias, None):
            assert torch.equal(bk.linear_a8(p, x, ws, b, isa=isa), bk.linear_a8(p, x, ws, b, isa="generic")), (M, N, K)
            assert torch.equal(bk.linear_f32(p, x, ws, b, isa=isa), bk.linear_f32(p, x, ws, b, isa="generic")), (M, N, K)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", [isa_param(i) for i in ALL_ISAS])
def test_extreme_activations_long_k(isa, fmt):
    """K = 16384 with every activation at ±127 / -128: no int16 or int32 accumulator may wrap."""
    gen = torch.Generator().manual_seed(4)
    for M, K in [(1, 16384), (4, 16383)]:  # GEMV and GEMM paths
        N = 5
        W = random_weights(fmt, N, K, gen)
        W[0] = 1 if fmt != "i2" else 1  # all +1 row: Σ = Σq
        W[1] = -1
        choice = torch.randint(0, 3, (M, K), generator=gen)
        q = torch.tensor([127, -127, -128], dtype=torch.int8)[choice]
        q[0, : K // 2] = -128  # the most negative run
        xscale, qsum = torch.ones(M), q.int().sum(-1, dtype=torch.int32)
        ws = torch.ones(N)
        p = bk.pack(fmt, W)
        out = bk.gemm_a8(p, q, xscale, qsum, ws, isa=isa)
        ref = (q.long() @ W.long().T).float()
        assert torch.equal(out, ref)


@pytest.mark.parametrize("isa", [isa_param(i) for i in ALL_ISAS])
def test_threads_do_not_change_results(isa):
    gen = torch.Generator().manual_seed(5)
    W = random_weights("i2", 301, 700, gen)
    x = torch.randn(3, 700, generator=gen)
    ws = torch.rand(301, generator=gen)
    p = bk.pack("i2", W)
    old = bk.get_num_threads()
    try:
        bk.set_num_threads(1)
        one = (bk.linear_a8(p, x, ws, isa=isa), bk.linear_f32(p, x, ws, isa=isa))
        bk.set_num_threads(2)
        assert bk.get_num_threads() == 2
        two = (bk.linear_a8(p, x, ws, isa=isa), bk.linear_f32(p, x, ws, isa=isa))
    finally:
        bk.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    with pytest.raises(ValueError):
        bk.set_num_threads(0)


def _active_isa_with_env(value: str) -> subprocess.CompletedProcess:
    code = "from bitllm import kernels as k; print(k.active_isa())"
    env = dict(os.environ, BITLLM_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_bitllm_isa_env_forces_and_validates():
    assert _active_isa_with_env("generic").stdout.strip() == "generic"
    bad = _active_isa_with_env("sse9")
    assert bad.returncode != 0 and "not a kernel variant" in bad.stderr
    missing = [i for i in ALL_ISAS if i not in bk.available_isas()]
    r = _active_isa_with_env(missing[0])
    assert r.returncode != 0 and "not supported" in r.stderr
    assert bk.active_isa() in bk.available_isas()
