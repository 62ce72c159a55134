// Internal to the kernel files: block structs of each layout, the per-ISA kernel table, and the
// scalar layout maps shared by packing and the generic kernels. Not part of the public API.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace bitllm {

// ============================================================================================
// Block structs (kernel memory layouts). Byte-level spec: docs/formats.md, "Native kernels".
// ============================================================================================

// I2: 128 ternary weights in 32 bytes = 2.0 bits/weight.
// Byte j (0..31), bits 2i..2i+1 (i = 0..3) hold code w+1 ∈ {0,1,2} of weight k = 32*i + j.
// So `(byte >> 2i) & 3` over the 32 bytes gives the codes of 32 consecutive weights.
struct BlockI2 {
    uint8_t qs[32];
};
static_assert(sizeof(BlockI2) == 32, "I2 block: 128 weights, 2 bits each");
constexpr int kI2Weights = 128;

// T1: ternary at 5 bits per 3 weights = 1.67 bits/weight (the T1 *file* format is 1.6; this
// layout trades 4 % more bytes for table lookups, see kernels_avx2.cpp "T1 LUT"). A group of 3
// consecutive columns 3g..3g+2 has the pattern value v = c0 + 3·c1 + 9·c2 ∈ [0, 27), c_j = w_j + 1,
// stored sign-folded: patterns v and 26 - v are each other's negation, so the 5-bit code is a
// magnitude index i = |v - 13| ∈ [0, 13] as a nibble and a sign bit s = (v < 13) as the high bit
// (v = 13 + i or 13 - i; t1_value). A table of 14 sums then serves all 27 patterns. A block is 48
// columns (16 groups) in 10 bytes per row; in row order byte j (0..7) holds the nibbles of groups
// 4(j/2) + (j%2) (low) and 4(j/2) + 2 + (j%2) (high), bytes 8 and 9 the sign bits: bit i of byte
// 8 + l = group 2i + l.
// Rows are tiled by 16 like B1, and the blocks of a tile are grouped in K chunks of kT1ChunkBlocks:
// chunk c of every tile comes before chunk c + 1 of any tile, so one thread's rows of one chunk are
// one sequential stream while the chunk's tables stay in L1. Inside a tile-block (160 bytes) byte
// j of row r is at 16·j + r. After the stored rows' blocks, one int32 (little-endian) per stored
// row holds the number of its groups with the sign bit set (t1_sign_count; the AVX2 table kernel
// adds it back, see kernels_avx2.cpp "T1 LUT").
struct BlockT1 {
    uint8_t qs[10];
};
static_assert(sizeof(BlockT1) == 10, "T1 block (per row): 48 weights in 10 bytes");
constexpr int kT1Weights = 48;
constexpr int64_t kT1ChunkBlocks = 16;  // 768 columns per K chunk

// B1: 256 binary weights in 32 bytes = 1.0 bit/weight, rows interleaved in tiles of 64.
// Byte p of a row, bit i holds c = 1 if w = -1 (0 if w = +1) for weight k = 8*p + i (the file
// layout's order). Rows are not stored one after another: the rows 64t..64t+63 form a tile whose
// tile-blocks (64 rows x one 32-byte block, 2 KB) hold byte j of row 64t+r at 64*j + r, so one
// 64-byte line holds byte j of 64 rows: the shape a table lookup wants (AVX-512: one vpermw per
// nibble of 32 rows, kernels_avx512.cpp "B1"; AVX2: a pshufb per nibble of 32 rows in two 16-row
// lanes, kernels_avx2.cpp "B1 LUT"). Like T1's, the tile-blocks are grouped in K chunks of
// kB1ChunkBlocks (tile_block_offset): chunk c of every tile comes before chunk c + 1 of any tile,
// so that the activation tables of one chunk (8 KB per activation row) stay in L1 while a thread's
// tiles stream past them. The last tile is padded with zero rows (never written out).
struct BlockB1 {
    uint8_t qs[32];
};
static_assert(sizeof(BlockB1) == 32, "B1 block: 256 weights, 1 bit each");
constexpr int kB1Weights = 256;
constexpr int64_t kB1ChunkBlocks = 4;  // 1024 columns per K chunk
constexpr int64_t kT1TileRows = 16;  // rows per tile of the tiled formats
constexpr int64_t kB1TileRows = 64;

inline bool is_tiled(Format f) { return f != Format::I2; }
// The tiled formats' rows per tile, block: weights, bytes per row, blocks per K chunk, bytes per tile-block.
constexpr int64_t tile_rows(Format f) { return f == Format::B1 ? kB1TileRows : kT1TileRows; }
constexpr int64_t tiled_block_weights(Format f) { return f == Format::B1 ? kB1Weights : kT1Weights; }
constexpr int64_t tiled_block_bytes(Format f) { return f == Format::B1 ? (int64_t)sizeof(BlockB1) : (int64_t)sizeof(BlockT1); }
constexpr int64_t chunk_blocks(Format f) { return f == Format::B1 ? kB1ChunkBlocks : kT1ChunkBlocks; }
constexpr int64_t tile_block_bytes(Format f) { return tile_rows(f) * tiled_block_bytes(f); }
// Rows the packed matrix holds: N, or N rounded up to whole tiles.
inline int64_t stored_rows(Format f, int64_t N) {
    return is_tiled(f) ? (N + tile_rows(f) - 1) / tile_rows(f) * tile_rows(f) : N;
}

// ============================================================================================
// Per-ISA kernel table (ggml type_traits_cpu style): filled once per ISA, picked once.
// ============================================================================================

struct PackedView {
    Format fmt;
    const uint8_t* data;  // (N, row_bytes)
    int64_t N, K, Kp;     // Kp = padded_k(fmt, K)
    int64_t row_bytes;
};

struct A8Acts {
    const int8_t* q;      // (M, ldq), ldq >= Kp, zero in [K, Kp)
    int64_t ldq;
    const int32_t* qsum;  // (M,)
    const float* xscale;  // (M,)
    int64_t M;
    const uint8_t* lut = nullptr;  // what the table's a8_prep built from q (each row thread its own)
};

struct F32Acts {
    const float* x;  // (M, ldx), ldx >= Kp, zero in [K, Kp)
    int64_t ldx;
    int64_t M;
};

// Compute rows [n0, n1) of out (M, N) for every m.
using A8Fn = void (*)(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias,
                      float* out, int64_t n0, int64_t n1);
using F32Fn = void (*)(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias,
                       float* out, int64_t n0, int64_t n1);

using QuantFn = void (*)(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                        float* scale, int32_t* sums);

// Optional, run by every thread of a gemm_a8 call before its first rows (LUT kernels build their
// activation tables here, into `scratch`, and point a.lut at them; each thread builds its own copy,
// because tables written by one core and read by another cost more than building them twice). The
// table kernels build the tables of blocks [b0, b1) only, at their places in a scratch sized for all
// blocks (a K part's, gemm_a8's K split); others may build everything.
using A8PrepFn = void (*)(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1);

// Optional (the table kernels of the tiled formats, a.M <= kTableMaxRows, a.lut holding the tables of
// blocks [b0, b1)): the raw sums of rows [n0, n1) (n0 on a tile; rows past N are the zero padding)
// over the blocks [b0, b1), written to acc[m * ldacc + n - n0] for n up to the end of n1's tile.
// table_finish turns a row's total over all blocks into Σ w·q.
using A8SumsFn = void (*)(const PackedView& w, const A8Acts& a, int64_t n0, int64_t n1, int64_t b0, int64_t b1,
                          int32_t* acc, int64_t ldacc);
constexpr int64_t kTableMaxRows = 16;  // activation rows the table kernels build tables for at once

struct KernelTable {
    A8Fn a8[kNumFormats];
    F32Fn f32[kNumFormats];
    QuantFn quantize;  // the pinned activation quantizer (nullptr: the scalar one)
    A8PrepFn a8_prep[kNumFormats] = {nullptr, nullptr, nullptr};
    A8SumsFn a8_sums[kNumFormats] = {nullptr, nullptr, nullptr};
};

// The scalar quantizer (reference); every variant's quantizer is bit-exact with it.
void quantize_generic(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                      float* scale, int32_t* sums);

#if defined(__x86_64__) || defined(_M_X64)
void quantize_avx2(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq, float* scale,
                   int32_t* sums);  // kernels_avx2.cpp
#endif

// Each ISA file defines its table (nullptr entries fall back to generic).
extern const KernelTable kTableGeneric;
#if defined(__x86_64__) || defined(_M_X64)
extern const KernelTable kTableAVX2;
extern const KernelTable kTableAVX512;
#endif
#if defined(__aarch64__)
extern const KernelTable kTableNEON;
extern const KernelTable kTableNEONDotprod;
#endif

// Shared epilogues (scalar, so their rounding is identical everywhere; compiled without FMA).
inline float a8_epilogue(int32_t acc, float xscale, float wscale, const float* bias, int64_t n) {
    float y = ((float)acc / xscale) * wscale;
    if (bias) y = y + bias[n];
    return y;
}
inline float f32_epilogue(float acc, float wscale, const float* bias, int64_t n) {
    float y = acc * wscale;
    if (bias) y = y + bias[n];
    return y;
}
// The canonical tree over 16 lane sums.
inline float f32_tree16(const float* l) {
    float s8[8], s4[4];
    for (int j = 0; j < 8; ++j) s8[j] = l[j] + l[j + 8];
    for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
    const float s0 = s4[0] + s4[2], s1 = s4[1] + s4[3];
    return s0 + s1;
}

// Scalar decode of one packed row into codes w+1 ∈ {0,1,2} (B1: 0 for -1, 2 for +1), Kp entries.
void decode_row_codes_generic(Format f, const uint8_t* row, int64_t Kp, uint8_t* codes);

// Byte offset of the tile-block (tile t = rows TR·t..TR·t+TR-1, TR = tile_rows(f), block b) of a
// tiled format: its TR·block_bytes bytes hold byte j of row TR·t+r at TR·j + r.
inline int64_t tile_block_offset(Format f, int64_t N, int64_t Kp, int64_t t, int64_t b) {
    const int64_t nb = Kp / tiled_block_weights(f), tiles = stored_rows(f, N) / tile_rows(f), C = chunk_blocks(f);
    const int64_t c = b / C, cb = std::min<int64_t>(C, nb - c * C);
    return (c * C * tiles + t * cb + (b - c * C)) * tile_block_bytes(f);
}

// T1: the count of set sign bits of stored row n (the int32s after the rows' blocks).
inline int32_t t1_sign_count(const PackedView& w, int64_t n) {
    int32_t c;
    std::memcpy(&c, w.data + stored_rows(w.fmt, w.N) * w.row_bytes + 4 * n, 4);
    return c;
}

// A table kernel's raw sum s of row n over all blocks (A8SumsFn) as Σ w·q: B1 tables sum the
// activations of the -1 weights (Σ c·q), T1's are E or ~E = -E - 1 per group (kernels_avx2.cpp "T1 LUT").
inline int32_t table_finish(const PackedView& w, int32_t s, int32_t qsum, int64_t n) {
    return w.fmt == Format::B1 ? qsum - 2 * s : s + t1_sign_count(w, n);
}

// Row n's row_bytes bytes in row order: a pointer into the matrix for the row-major formats, or
// `buf` (row_bytes long) gathered from the row's tile-blocks for the tiled ones.
inline const uint8_t* row_of(const PackedView& w, int64_t n, uint8_t* buf) {
    if (!is_tiled(w.fmt)) return w.data + n * w.row_bytes;
    const int64_t bb = tiled_block_bytes(w.fmt), TR = tile_rows(w.fmt), t = n / TR, r = n % TR;
    for (int64_t b = 0; b < w.row_bytes / bb; ++b) {
        const uint8_t* src = w.data + tile_block_offset(w.fmt, w.N, w.Kp, t, b) + r;
        for (int64_t j = 0; j < bb; ++j) buf[b * bb + j] = src[TR * j];
    }
    return buf;
}
// The inverse: scatter row n (row order, row_bytes long) into a tiled matrix.
inline void store_row(Format f, int64_t N, int64_t Kp, int64_t n, const uint8_t* row, uint8_t* data) {
    const int64_t bb = tiled_block_bytes(f), TR = tile_rows(f), t = n / TR, r = n % TR;
    const int64_t rb = Kp / tiled_block_weights(f) * bb;
    for (int64_t b = 0; b < rb / bb; ++b) {
        uint8_t* dst = data + tile_block_offset(f, N, Kp, t, b) + r;
        for (int64_t j = 0; j < bb; ++j) dst[TR * j] = row[b * bb + j];
    }
}

// Calls f(std::integral_constant<int, mb>{}) for mb = 1..4: the activation-row count of a kernel
// template (rows handled per pass), picked at run time.
template <class F>
inline void with_rows(int mb, F&& f) {
    switch (mb) {
        case 4: return f(std::integral_constant<int, 4>{});
        case 3: return f(std::integral_constant<int, 3>{});
        case 2: return f(std::integral_constant<int, 2>{});
        default: return f(std::integral_constant<int, 1>{});
    }
}

// ---- table kernels of the tiled formats (kernels_avx2.cpp; the AVX-512 table runs them too) ----
// T1 table bytes per 48-column block: sign-folded w-sums (8 index vectors x 16 int16 entries x 2 groups).
constexpr int64_t kT1LutBlockBytes = 512;
constexpr int64_t kT1TileBlockBytes = tile_block_bytes(Format::T1);  // 160

// The outer loop of both table kernels: rows [n0, n1) (whole tiles but the last) for the M <= 16
// activation rows, over the blocks [b0, b1), K chunk by K chunk (the chunk's tables stay in L1),
// every tile of the rows (one sequential stream per chunk), activation rows in groups of <= 4 per
// pass over a tile. tile(mb, tile_data, blocks, lut, lut_stride, prefetch, acc, acc_stride) adds the
// tile's TR = tile_rows row sums of that many blocks for mb activation rows (tables of lut_block
// bytes per block). Writes the sums to acc[m * ldacc + n - n0] (an A8SumsFn's contract).
template <class TileFn>
void table_sums(const PackedView& w, const A8Acts& a, int64_t n0, int64_t n1, int64_t b0, int64_t b1,
                int64_t lut_block, TileFn tile, int32_t* acc, int64_t ldacc) {
    const int64_t TR = tile_rows(w.fmt);
    const int64_t nb = w.Kp / tiled_block_weights(w.fmt), tiles = stored_rows(w.fmt, w.N) / TR;
    const int64_t C = chunk_blocks(w.fmt), tb = tile_block_bytes(w.fmt);
    const int64_t t0 = n0 / TR, t1 = (n1 + TR - 1) / TR, rows = (t1 - t0) * TR;
    const int64_t lut_stride = nb * lut_block;
    const int64_t groups = (a.M + 3) / 4, base = a.M / groups, extra = a.M % groups;
    for (int64_t m = 0; m < a.M; ++m) std::memset(acc + m * ldacc, 0, sizeof(int32_t) * (size_t)rows);
    for (int64_t c0 = b0 / C * C; c0 < b1; c0 += C) {
        const int64_t cb = std::min<int64_t>(C, nb - c0);  // the chunk's blocks
        const int64_t lo = std::max(b0, c0), hi = std::min(b1, c0 + cb);  // those of [b0, b1)
        const uint8_t* chunk = w.data + (c0 * tiles + t0 * cb + lo - c0) * tb;  // block lo of tile t0
        for (int64_t t = t0; t < t1; ++t)
            for (int64_t g = 0, m0 = 0; g < groups; ++g) {
                const int mb = (int)(base + (g < extra));
                tile(mb, chunk + (t - t0) * cb * tb, hi - lo, a.lut + m0 * lut_stride + lo * lut_block, lut_stride, g == 0,
                     acc + m0 * ldacc + (t - t0) * TR, ldacc);
                m0 += mb;
            }
    }
}

// Rows [n0, n1) of out from the tables over all blocks: table_sums, then table_finish and the epilogue.
template <class TileFn>
void table_rows(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1, int64_t lut_block, TileFn tile) {
    const int64_t TR = tile_rows(w.fmt), t0 = n0 / TR, rows = ((n1 + TR - 1) / TR - t0) * TR;
    std::vector<int32_t> acc((size_t)(a.M * rows));  // (M, rows)
    table_sums(w, a, n0, n1, 0, w.Kp / tiled_block_weights(w.fmt), lut_block, tile, acc.data(), rows);
    for (int64_t m = 0; m < a.M; ++m)
        for (int64_t n = n0; n < n1; ++n)
            out[m * w.N + n] = a8_epilogue(table_finish(w, acc[m * rows + n - t0 * TR], a.qsum[m], n), a.xscale[m],
                                           wscale[n], bias, n);
}

// A table kernel's rows [n0, n1) for more than kTableMaxRows activation rows (prefill): prep builds
// the tables of kTableMaxRows rows at a time (all blocks, into a per-thread scratch) and fn runs each
// block of rows, a pass over the rows (from L2/L3 after the first).
inline void table_row_blocks(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                             int64_t n0, int64_t n1, A8PrepFn prep, A8Fn fn) {
    thread_local std::vector<uint8_t> scratch;
    for (int64_t m0 = 0; m0 < a.M; m0 += kTableMaxRows) {
        A8Acts part{a.q + m0 * a.ldq, a.ldq, a.qsum + m0, a.xscale + m0, std::min<int64_t>(kTableMaxRows, a.M - m0)};
        prep(w, part, scratch, 0, w.Kp / tiled_block_weights(w.fmt));
        fn(w, part, wscale, bias, out + m0 * w.N, n0, n1);
    }
}

// The pattern value v of a 5-bit T1 code (nibble i | sign bit << 4): 13 + i, or 13 - i with the sign
// bit. Nibbles 14 and 15 are never written (a packer writes i <= 13); they read as v = 13 (w = 0).
constexpr int t1_value(int code) {
    const int i = code & 15;
    return i > 13 ? 13 : (code >> 4) ? 13 - i : 13 + i;
}
// The 5-bit code of pattern value v (the packer's side of t1_value).
constexpr int t1_code_of(int v) { return v >= 13 ? v - 13 : (13 - v) | 16; }

// Digit j (base 3, the group's first column least significant) of the pattern of every 5-bit T1
// code: the scalar decoder's table and the SIMD decoders' lookup tables (AVX2: two 16-entry pshufb
// tables picked by the sign bit; NEON: one 32-entry tbl2).
struct T1DigitTable {
    alignas(16) uint8_t d[3][32];
    constexpr T1DigitTable() : d{} {
        for (int x = 0; x < 32; ++x) {
            const int v = t1_value(x);
            d[0][x] = uint8_t(v % 3), d[1][x] = uint8_t(v / 3 % 3), d[2][x] = uint8_t(v / 9 % 3);
        }
    }
};
inline constexpr T1DigitTable kT1Digits{};

// T1 row order: the nibble of group g (0..15) of a block is in byte 2(g/4) + g%2, high nibble iff
// (g/2) is odd; its sign bit is bit g/2 of byte 8 + g%2. Returns the 5-bit code (t1_value: pattern).
inline int t1_code(const uint8_t* blk, int g) {
    const int nib = (blk[2 * (g >> 2) + (g & 1)] >> (4 * ((g >> 1) & 1))) & 15;
    const int hb = (blk[8 + (g & 1)] >> (g >> 1)) & 1;
    return nib | (hb << 4);
}

#if defined(__x86_64__) || defined(_M_X64)
// T1 and B1 through pshufb tables (kernels_avx2.cpp): the AVX-512 table uses them too.
void a8_t1_prep_avx2(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1);
// The codes (w + 1) of the 16 rows of T1 tile t, Kp per row, ldc apart.
void t1_tile_codes(const PackedView& w, int64_t t, uint8_t* codes, int64_t ldc);
void a8_t1_sums_avx2(const PackedView& w, const A8Acts& a, int64_t n0, int64_t n1, int64_t b0, int64_t b1, int32_t* acc,
                     int64_t ldacc);
void a8_t1_avx2(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1);
void f32_t1_avx2(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
                 int64_t n0, int64_t n1);
void a8_b1_prep_avx2(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1);
void a8_b1_avx2(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1);
void f32_b1_avx2(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
                 int64_t n0, int64_t n1);
// B1 activation tables of blocks [b0, b1) for a.M <= kTableMaxRows activation rows, at their places
// in `scratch` (sized for every block, 64-byte aligned); a.lut points at them. For each 4-column
// group g (columns 4g..4g+3) the 16 sums T_g[e] = Σ_i bit_i(e)·q[4g + i] (|T| <= 512), kB1TableBytes
// per row byte p (groups 2p, 2p + 1): int16, T_2p then T_2p+1 (the AVX-512 vpermw tables); else the
// pshufb form: low bytes of T_2p, high bytes of T_2p, low bytes of T_2p+1, high bytes of T_2p+1, 16 each.
constexpr int64_t kB1TableBytes = 64;
void b1_build_tables(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1, bool int16);
#endif

}  // namespace bitllm
