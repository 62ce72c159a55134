// AVX-512 kernels (F/BW/VL + VNNI; compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni
// -ffp-contract=off, called only after the CPU probe). Bit-exact twins of generic.
//
// One zmm covers two consecutive 32-byte blocks of an I2 row; `vpdpbusd` multiplies u8 codes by s8
// activations and accumulates straight into int32 (no int16 intermediate to saturate). The
// activations are rearranged once per call (and row thread) so that one load gives the two blocks' halves of a plane
// (a8_i2_prep_avx512). An odd last block runs the 256-bit (VL) form.
#if defined(BITLLM_SIMDE_AVX512)
// Test-only build: SIMDe's portable AVX-512 emulation, so that this file's logic can be checked
// bit for bit on CPUs without AVX-512 (tests/test_kernels_native.py).
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
// SIMDe 0.7 lacks these; emulated with two 256-bit halves.
static inline simde__m512i bitllm_mm512_cvtepu8_epi32(simde__m128i a) {
    return simde_mm512_inserti64x4(simde_mm512_castsi256_si512(simde_mm256_cvtepu8_epi32(a)),
                                   simde_mm256_cvtepu8_epi32(simde_mm_srli_si128(a, 8)), 1);
}
#define _mm512_cvtepu8_epi32 bitllm_mm512_cvtepu8_epi32
static inline simde__m512i bitllm_mm512_cvtepi16_epi32(simde__m256i a) {
    return simde_mm512_inserti64x4(simde_mm512_castsi256_si512(simde_mm256_cvtepi16_epi32(simde_mm256_castsi256_si128(a))),
                                   simde_mm256_cvtepi16_epi32(simde_mm256_extracti128_si256(a, 1)), 1);
}
#define _mm512_cvtepi16_epi32 bitllm_mm512_cvtepi16_epi32
#define _mm512_cmpneq_epi32_mask(a, b) ((simde__mmask16)~simde_mm512_cmpeq_epi32_mask(a, b))
static inline simde__m512i bitllm_mm512_srai_epi32(simde__m512i a, unsigned s) {
    return simde_mm512_inserti64x4(simde_mm512_castsi256_si512(simde_mm256_srai_epi32(simde_mm512_castsi512_si256(a), (int)s)),
                                   simde_mm256_srai_epi32(simde_mm512_extracti64x4_epi64(a, 1), (int)s), 1);
}
#define _mm512_srai_epi32 bitllm_mm512_srai_epi32
static inline simde__m512 bitllm_mm512_cvtepi32_ps(simde__m512i a) {
    return simde_mm512_insertf32x8(simde_mm512_castps256_ps512(simde_mm256_cvtepi32_ps(simde_mm512_castsi512_si256(a))),
                                   simde_mm256_cvtepi32_ps(simde_mm512_extracti64x4_epi64(a, 1)), 1);
}
#define _mm512_cvtepi32_ps bitllm_mm512_cvtepi32_ps
#else
#include <immintrin.h>
#endif

#include <cstring>
#include <vector>

#include "kernels_internal.h"

namespace bitllm {
namespace {

inline __m256i load256(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
inline int32_t hsum256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
inline int32_t hsum512(__m512i v) {
    return hsum256(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
}

// Codes (w + 1) of plane i (columns 32i .. 32i + 31) of one I2 block.
inline __m256i i2_plane256(__m256i v, int i) {
    return _mm256_and_si256(_mm256_srli_epi16(v, i * 2), _mm256_set1_epi8(3));
}

// ============================================================================================
// A8
// ============================================================================================

// I2 activations in block-pair order, built once per call and row thread (a8_i2_prep_avx512): for each pair p of
// 128-column blocks, plane i's 64 bytes are q[256p + 32i, +32) then q[256p + 128 + 32i, +32), the
// two halves a zmm of codes pairs with, so that one load serves a plane of both blocks (before: a
// load and a vinserti64x4). An odd last block keeps its 128 bytes in column order. Rows of Kp2
// columns (a multiple of 128) from rows of Kp <= Kp2 (the rest zero), ldq apart.
const int8_t* i2_pair_order(const int8_t* q, int64_t ldq, int64_t M, int64_t Kp, int64_t Kp2, std::vector<uint8_t>& scratch) {
    const int64_t pairs = Kp2 / 256;
    scratch.resize((size_t)(M * Kp2 + Kp2 + 64));
    int8_t* dst = reinterpret_cast<int8_t*>(scratch.data() + ((64 - (reinterpret_cast<uintptr_t>(scratch.data()) & 63)) & 63));
    int8_t* row = dst + M * Kp2;  // one zero-padded source row
    for (int64_t m = 0; m < M; ++m) {
        const int8_t* src = q + m * ldq;
        if (Kp < Kp2) {
            std::memcpy(row, src, (size_t)Kp);
            std::memset(row + Kp, 0, (size_t)(Kp2 - Kp));
            src = row;
        }
        int8_t* d = dst + m * Kp2;
        for (int64_t p = 0; p < pairs; ++p)
            for (int i = 0; i < 4; ++i) {
                std::memcpy(d + 256 * p + 64 * i, src + 256 * p + 32 * i, 32);
                std::memcpy(d + 256 * p + 64 * i + 32, src + 256 * p + 128 + 32 * i, 32);
            }
        std::memcpy(d + 256 * pairs, src + 256 * pairs, (size_t)(Kp2 - 256 * pairs));
    }
    return dst;
}

void a8_i2_prep_avx512(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t, int64_t) {
    a.lut = reinterpret_cast<const uint8_t*>(i2_pair_order(a.q, a.ldq, a.M, w.Kp, w.Kp, scratch));
}

// An opaque copy of v: gcc otherwise folds a loaded vector into every instruction that uses it, one
// 64-byte load each (4 per weight vector here), and Zen 4 issues one zmm load per cycle.
inline __m512i in_register(__m512i v) {
#if !defined(BITLLM_SIMDE_AVX512)
    __asm__("" : "+v"(v));
#endif
    return v;
}

// GEMV (M = 1) over R rows, memory-bound: plane i of a weight vector is `v & (3 << 2i)` with no
// shift, 4^i times the codes, summed in an accumulator of its own; the exact quotients (srai) are
// added at the end. 2 ops per 64 weight-rows (and, vpdpbusd), the 4 activation vectors of a block
// pair shared by the R rows. R = 3: 12 accumulators + 4 activations + 4 masks stay in registers
// (R = 4 made gcc spill and copy accumulators: 113-140 G weights/s in a microbenchmark of this loop
// on a Zen 4, against 167 for R = 3).
struct PlaneAcc {
    __m512i a0, a1, a2, a3;
};
inline void plane_step(PlaneAcc& acc, __m512i v, const __m512i* q) {
    acc.a0 = _mm512_dpbusd_epi32(acc.a0, _mm512_and_si512(v, _mm512_set1_epi8(0x03)), q[0]);
    acc.a1 = _mm512_dpbusd_epi32(acc.a1, _mm512_and_si512(v, _mm512_set1_epi8(0x0C)), q[1]);
    acc.a2 = _mm512_dpbusd_epi32(acc.a2, _mm512_and_si512(v, _mm512_set1_epi8(0x30)), q[2]);
    acc.a3 = _mm512_dpbusd_epi32(acc.a3, _mm512_and_si512(v, _mm512_set1_epi8((char)0xC0)), q[3]);
}
inline __m512i plane_total(PlaneAcc a) {  // by value: an address taken keeps the accumulators in memory
    return _mm512_add_epi32(_mm512_add_epi32(a.a0, _mm512_srai_epi32(a.a1, 2)),
                            _mm512_add_epi32(_mm512_srai_epi32(a.a2, 4), _mm512_srai_epi32(a.a3, 6)));
}

template <int R>
__attribute__((noinline)) void i2_gemv_rows(const PackedView& w, const int8_t* q, int64_t n, int32_t* res) {
    const int64_t nb = w.Kp / kI2Weights;
    const uint8_t* rows[R];
    PlaneAcc acc[R];
    for (int r = 0; r < R; ++r) {
        rows[r] = w.data + (n + r) * w.row_bytes;
        acc[r] = PlaneAcc{_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    }
    // Software prefetch at least one whole tile of R rows ahead (the range walks [pf, pf + R*row_bytes)
    // at the pace the tile is consumed; a shorter distance leaves part of each long-row tile
    // unprefetched — see kernels_avx2.cpp).
    const char* pf = (const char*)(w.data + n * w.row_bytes) + std::max<int64_t>(4096, R * w.row_bytes);
    const int64_t pf_end = R * w.row_bytes;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        for (int64_t o = 64 * b * R / 2; o < std::min<int64_t>(pf_end, 64 * (b + 2) * R / 2); o += 64)
            _mm_prefetch(pf + o, _MM_HINT_T0);
        __m512i qa[4];
        for (int i = 0; i < 4; ++i) qa[i] = in_register(load512(q + kI2Weights * b + 64 * i));
        for (int r = 0; r < R; ++r) plane_step(acc[r], in_register(load512(rows[r] + 32 * b)), qa);
    }
    for (int r = 0; r < R; ++r) {
        __m256i tail = _mm256_setzero_si256();
        if (b < nb) {  // an odd last block: 256-bit, activations in column order
            const __m256i v = load256(rows[r] + 32 * b);
            for (int i = 0; i < 4; ++i) tail = _mm256_dpbusd_epi32(tail, i2_plane256(v, i), load256(q + kI2Weights * b + 32 * i));
        }
        res[r] = hsum512(plane_total(acc[r])) + hsum256(tail);
    }
}

// R rows at once against MB > 1 activation rows (block-pair order, ldq apart); res[r][m] = Σ c·q.
// The planes are shifted down once per row and feed MB vpdpbusd each, the activation loads shared
// by the R rows.
template <int R, int MB>
__attribute__((noinline)) void i2_rows(const PackedView& w, const int8_t* q, int64_t ldq, int64_t n, bool prefetch,
                                       int32_t* res) {
    static_assert(MB > 1, "M = 1: i2_gemv_rows");
    const int64_t nb = w.Kp / kI2Weights;
    const uint8_t* rows[R];
    __m512i acc[R][MB];
    for (int r = 0; r < R; ++r) {
        rows[r] = w.data + (n + r) * w.row_bytes;
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_si512();
    }
    const char* pf = (const char*)(w.data + n * w.row_bytes) + std::max<int64_t>(4096, R * w.row_bytes);
    const int64_t pf_end = prefetch ? R * w.row_bytes : 0;
    const __m512i three = _mm512_set1_epi8(3);
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const int8_t* qb = q + kI2Weights * b;
        for (int64_t o = 64 * b * R / 2; o < std::min<int64_t>(pf_end, 64 * (b + 2) * R / 2); o += 64)
            _mm_prefetch(pf + o, _MM_HINT_T0);
        __m512i v[R];
        for (int r = 0; r < R; ++r) v[r] = in_register(load512(rows[r] + 32 * b));
        for (int i = 0; i < 4; ++i) {
            __m512i qa[MB];
            for (int m = 0; m < MB; ++m) qa[m] = in_register(load512(qb + m * ldq + 64 * i));
            for (int r = 0; r < R; ++r) {
                const __m512i pl = _mm512_and_si512(i ? _mm512_srli_epi16(v[r], unsigned(2 * i)) : v[r], three);
                for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], pl, qa[m]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        __m256i tail[MB];
        for (int m = 0; m < MB; ++m) tail[m] = _mm256_setzero_si256();
        if (b < nb) {  // an odd last block: 256-bit, activations in column order
            const int8_t* qb = q + kI2Weights * b;
            const __m256i v = load256(rows[r] + 32 * b);
            for (int i = 0; i < 4; ++i)
                for (int m = 0; m < MB; ++m) tail[m] = _mm256_dpbusd_epi32(tail[m], i2_plane256(v, i), load256(qb + m * ldq + 32 * i));
        }
        for (int m = 0; m < MB; ++m) res[r * MB + m] = hsum512(acc[r][m]) + hsum256(tail[m]);
    }
}

// out[n] = a8_epilogue(acc[n] - qsum, xscale, wscale[n], bias, n) for n in [0, count): the same IEEE
// operations in the same order, 16 lanes at a time (one scalar division per output row cost ~5 % of
// a decode step).
void a8_epilogue_row(const int32_t* acc, int64_t count, int32_t qsum, float xscale, const float* wscale,
                     const float* bias, float* out) {
    const __m512i qs = _mm512_set1_epi32(qsum);
    const __m512 xs = _mm512_set1_ps(xscale);
    int64_t n = 0;
    for (; n + 16 <= count; n += 16) {
        __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(load512(acc + n), qs));
        y = _mm512_mul_ps(_mm512_div_ps(y, xs), _mm512_loadu_ps(wscale + n));
        if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + n));
        _mm512_storeu_ps(out + n, y);
    }
    for (; n < count; ++n) out[n] = a8_epilogue(acc[n] - qsum, xscale, wscale[n], bias, n);
}

// Rows [n0, n1). M = 1: 3 rows at a time, then singles. M > 1: 4 rows at a time, their blocks
// decoded once per group of <= 4 activation rows (the rows stay in L1 between groups, the groups'
// activations in L1/L2). The sums go to an (M, rows) buffer; the epilogue runs at the end, into
// out[m * ldo + n] (wscale, bias and out already offset to the view's row 0). q: the activations
// in block-pair order, w.Kp apart (i2_pair_order).
void i2_rows_out(const PackedView& w, const A8Acts& a, const int8_t* q, const float* wscale, const float* bias,
                 float* out, int64_t ldo, int64_t n0, int64_t n1) {
    const int64_t ldq = w.Kp, rows = n1 - n0;
    std::vector<int32_t> sums((size_t)(a.M * rows));  // (M, rows)
    if (a.M == 1) {
        int64_t n = n0;
        for (; n + 3 <= n1; n += 3) i2_gemv_rows<3>(w, q, n, &sums[n - n0]);
        for (; n < n1; ++n) i2_gemv_rows<1>(w, q, n, &sums[n - n0]);
    } else {
        const int64_t groups = (a.M + 3) / 4, base = a.M / groups, extra = a.M % groups;
        int32_t res[16];
        for (int64_t n = n0; n < n1;) {
            const int rn = n + 4 <= n1 ? 4 : 1;
            for (int64_t g = 0, m0 = 0; g < groups; ++g) {
                const int mb = (int)(base + (g < extra));  // 2..4 when M > 1 (5 = 3 + 2, 9 = 3 + 3 + 3)
                with_rows(mb, [&](auto k) {
                    constexpr int MB = std::max(2, decltype(k)::value);  // with_rows also instantiates 1
                    if (rn == 4) i2_rows<4, MB>(w, q + m0 * ldq, ldq, n, g == 0, res);
                    else i2_rows<1, MB>(w, q + m0 * ldq, ldq, n, g == 0, res);
                });
                for (int r = 0; r < rn; ++r)
                    for (int j = 0; j < mb; ++j) sums[(m0 + j) * rows + n - n0 + r] = res[r * mb + j];
                m0 += mb;
            }
            n += rn;
        }
    }
    for (int64_t m = 0; m < a.M; ++m)
        a8_epilogue_row(&sums[m * rows], rows, a.qsum[m], a.xscale[m], wscale + n0, bias ? bias + n0 : nullptr,
                        out + m * ldo + n0);
}

void a8_i2_avx512(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                  int64_t n0, int64_t n1) {
    i2_rows_out(w, a, reinterpret_cast<const int8_t*>(a.lut), wscale, bias, out, w.N, n0, n1);
}

// ---- T1 ----
// M <= 16: the AVX2 pshufb table kernel. M > 16 (prefill): each 16-row tile is decoded to codes
// (t1_tile_codes), packed as I2 rows and run through the VNNI GEMM above (before: the AVX2 maddubs
// micro-kernel, 1.4-1.8x I2's time at M = 128).
void a8_t1_prep_avx512(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1) {
    if (a.M <= kTableMaxRows) return a8_t1_prep_avx2(w, a, scratch, b0, b1);
    const int64_t Kp2 = (w.Kp + kI2Weights - 1) / kI2Weights * kI2Weights;
    a.lut = reinterpret_cast<const uint8_t*>(i2_pair_order(a.q, a.ldq, a.M, w.Kp, Kp2, scratch));
}

void a8_t1_avx512(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                  int64_t n0, int64_t n1) {
    if (a.M <= kTableMaxRows) return a8_t1_avx2(w, a, wscale, bias, out, n0, n1);
    const int64_t Kp2 = (w.Kp + kI2Weights - 1) / kI2Weights * kI2Weights;
    std::vector<uint8_t> codes((size_t)(kT1TileRows * Kp2), 1), rows((size_t)(kT1TileRows * Kp2 / 4));
    const PackedView v{Format::I2, rows.data(), kT1TileRows, Kp2, Kp2, Kp2 / 4};
    for (int64_t n = n0; n < n1; n += kT1TileRows) {  // n0 is on a tile (the row threads split at whole tiles)
        t1_tile_codes(w, n / kT1TileRows, codes.data(), Kp2);  // Kp codes per row; [Kp, Kp2) stay 1 (w = 0)
        for (int64_t r = 0; r < kT1TileRows; ++r)
            for (int64_t b = 0; b < Kp2 / kI2Weights; ++b) {  // I2 byte j: codes j, 32 + j, 64 + j, 96 + j
                const uint8_t* c = &codes[(size_t)(r * Kp2 + kI2Weights * b)];
                const __m256i x = _mm256_or_si256(_mm256_or_si256(load256(c), _mm256_slli_epi16(load256(c + 32), 2)),
                                                  _mm256_or_si256(_mm256_slli_epi16(load256(c + 64), 4),
                                                                  _mm256_slli_epi16(load256(c + 96), 6)));
                _mm256_storeu_si256((__m256i*)&rows[(size_t)(r * Kp2 / 4 + 32 * b)], x);
            }
        i2_rows_out(v, a, reinterpret_cast<const int8_t*>(a.lut), wscale + n, bias ? bias + n : nullptr, out + n, w.N, 0,
                    std::min<int64_t>(kT1TileRows, n1 - n));
    }
}

// One I2 row's codes (w + 1), Kp bytes.
void decode_i2_codes(const uint8_t* row, int64_t Kp, uint8_t* codes) {
    for (int64_t b = 0; b < Kp / kI2Weights; ++b) {
        const __m256i v = load256(row + 32 * b);
        for (int i = 0; i < 4; ++i) _mm256_storeu_si256((__m256i*)(codes + kI2Weights * b + 32 * i), i2_plane256(v, i));
    }
}

// ============================================================================================
// B1: vpermw lookups of int16 tables
// ============================================================================================
// A 64-byte line of a B1 tile-block is byte p of its 64 rows (kernels_internal.h, BlockB1). As 32
// words, word i holds that byte of rows 2i (low) and 2i + 1 (high), whose 4 nibbles are the "is -1"
// flags of the column groups 2p (low nibble) and 2p + 1 (high nibble) of the two rows. vpermw looks
// up 32 int16 entries by the low 5 bits of each word: with a group's 16 sums T[e] = Σ c·q (the same
// tables as the AVX2 kernel's, b1_build_tables, kept as int16) repeated in both halves of the 32,
// w, w >> 4, w >> 8 and w >> 12 index them directly, whatever the bits above the nibble hold. Per
// 512 weight-rows: 3 shifts, 4 vpermw, 4 adds (11 zmm ops, against 30 ymm ops for pshufb tables).
constexpr int kB1PermGroup = 31;       // int16 lanes gain 2 lookups of |T| <= 512 per row byte: 62·512 < 2^15
void a8_b1_prep_avx512(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1) {
    if (a.M <= kTableMaxRows) b1_build_tables(w, a, scratch, b0, b1, true);  // more rows: table_row_blocks
}

// One tile-chunk (64 rows, `bytes` row bytes) against MB activation rows (tables lut_stride bytes
// apart): adds Σ c·q of tile row r to acc[m * acc_stride + r]. No software prefetch: a thread's tiles
// of a K chunk are one sequential stream, and on a Zen 4 the hardware prefetcher alone streamed it
// faster (1 thread, from DRAM: 8640x3200 149-156 µs, against 171-184 with prefetcht0 2-8 KB ahead).
template <int MB>
inline void b1_perm_tile(const uint8_t* t, int64_t bytes, const uint8_t* lut, int64_t lut_stride, int32_t* acc,
                         int64_t acc_stride) {
    // (even rows, odd rows) -> row order, 16 rows per vector
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t p0 = 0; p0 < bytes; p0 += kB1PermGroup) {
        const int64_t p1 = std::min<int64_t>(bytes, p0 + kB1PermGroup);
        __m512i ev[MB], od[MB];  // int16 sums of rows 0, 2, .., 62 and 1, 3, .., 63
        for (int m = 0; m < MB; ++m) ev[m] = od[m] = _mm512_setzero_si512();
        for (int64_t p = p0; p < p1; ++p) {
            const __m512i v = load512(t + kB1TileRows * p);
            const __m512i v4 = _mm512_srli_epi16(v, 4), v8 = _mm512_srli_epi16(v, 8), v12 = _mm512_srli_epi16(v, 12);
            for (int m = 0; m < MB; ++m) {
                const uint8_t* tb = lut + m * lut_stride + kB1TableBytes * p;
                const __m512i tl = _mm512_broadcast_i64x4(load256(tb)), th = _mm512_broadcast_i64x4(load256(tb + 32));
                ev[m] = _mm512_add_epi16(ev[m], _mm512_add_epi16(_mm512_permutexvar_epi16(v, tl),
                                                                 _mm512_permutexvar_epi16(v4, th)));
                od[m] = _mm512_add_epi16(od[m], _mm512_add_epi16(_mm512_permutexvar_epi16(v8, tl),
                                                                 _mm512_permutexvar_epi16(v12, th)));
            }
        }
        for (int m = 0; m < MB; ++m) {
            int32_t* o = acc + m * acc_stride;
            for (int h = 0; h < 2; ++h) {  // rows 32h .. 32h + 31
                const __m512i e = _mm512_cvtepi16_epi32(h ? _mm512_extracti64x4_epi64(ev[m], 1) : _mm512_castsi512_si256(ev[m]));
                const __m512i d = _mm512_cvtepi16_epi32(h ? _mm512_extracti64x4_epi64(od[m], 1) : _mm512_castsi512_si256(od[m]));
                int32_t* oh = o + 32 * h;
                _mm512_storeu_si512(oh, _mm512_add_epi32(load512(oh), _mm512_permutex2var_epi32(e, first, d)));
                _mm512_storeu_si512(oh + 16, _mm512_add_epi32(load512(oh + 16), _mm512_permutex2var_epi32(e, second, d)));
            }
        }
    }
}

void b1_perm_tile_n(int mb, const uint8_t* tp, int64_t cb, const uint8_t* lut, int64_t stride, bool, int32_t* acc,
                    int64_t acc_stride) {
    with_rows(mb, [&](auto k) {
        b1_perm_tile<decltype(k)::value>(tp, cb * (int64_t)sizeof(BlockB1), lut, stride, acc, acc_stride);
    });
}

void a8_b1_sums_avx512(const PackedView& w, const A8Acts& a, int64_t n0, int64_t n1, int64_t b0, int64_t b1,
                       int32_t* acc, int64_t ldacc) {
    table_sums(w, a, n0, n1, b0, b1, kB1TableBytes * (int64_t)sizeof(BlockB1), b1_perm_tile_n, acc, ldacc);
}

void a8_b1_avx512(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                  int64_t n0, int64_t n1) {
    if (a.lut) return table_rows(w, a, wscale, bias, out, n0, n1, kB1TableBytes * (int64_t)sizeof(BlockB1), b1_perm_tile_n);
    // More than 16 activation rows (prefill): against the decoded-tile maddubs GEMM this took M = 128
    // from 113-123 G weight-rows/s per core to 259-260 (Zen 4, hot; I2: 151-178).
    table_row_blocks(w, a, wscale, bias, out, n0, n1, a8_b1_prep_avx512, a8_b1_avx512);
}

// ============================================================================================
// F32: one zmm = the 16 canonical lanes
// ============================================================================================

void f32_i2_avx512(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes((size_t)w.Kp);  // (Kp,)
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (int64_t n = n0; n < n1; ++n) {
        decode_i2_codes(w.data + n * w.row_bytes, w.Kp, codes.data());
        for (int64_t m = 0; m < a.M; ++m) {
            const float* x = a.x + m * a.ldx;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < w.Kp; k += 16) {
                const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes.data() + k)));
                const __mmask16 nz = _mm512_cmpneq_epi32_mask(c, one);
                const __mmask16 neg = _mm512_cmpeq_epi32_mask(c, zero);
                __m512i v = _mm512_castps_si512(_mm512_maskz_mov_ps(nz, _mm512_loadu_ps(x + k)));
                v = _mm512_mask_xor_epi32(v, neg, v, sign);  // -x by flipping the sign bit
                acc = _mm512_add_ps(acc, _mm512_castsi512_ps(v));
            }
            const __m256 lo = _mm512_castps512_ps256(acc);
            const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
            const __m256 s8 = _mm256_add_ps(lo, hi);
            const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
            const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            out[m * w.N + n] = f32_epilogue(_mm_cvtss_f32(s1), wscale[n], bias, n);
        }
    }
}


}  // namespace

// T1 runs the AVX2 pshufb table kernel (AVX-512 CPUs have AVX2). A vpermi2b (VBMI) T1 kernel,
// one 128-byte lookup for 4 groups of 16 rows, was measured on a Zen 4 against the sign-folded AVX2
// kernel and removed (session 9): the same speed at M = 1 (~98 G weight-rows/s per core, hot), its
// 1 KB-per-block tables 2 µs slower to build at K = 4096, and 78 against 116 at M = 16.
const KernelTable kTableAVX512 = {
    {a8_i2_avx512, a8_t1_avx512, a8_b1_avx512},
    {f32_i2_avx512, f32_t1_avx2, f32_b1_avx2},
    quantize_avx2,  // AVX-512 CPUs have AVX2; the quantizer is a small part of a matmul
    {a8_i2_prep_avx512, a8_t1_prep_avx512, a8_b1_prep_avx512},
    {nullptr, a8_t1_sums_avx2, a8_b1_sums_avx512},
};

}  // namespace bitllm
