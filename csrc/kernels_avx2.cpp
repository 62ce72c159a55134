// AVX2 kernels (compiled with -mavx2 -mfma -mf16c -ffp-contract=off; only called after the CPU
// probe says AVX2 is there). Bit-exact twins of kernels_generic.cpp.
//
// A8 inner product: codes (u8, 0..2) x activations (s8) with _mm256_maddubs_epi16. Each int16
// lane of one maddubs is at most 2·2·128 = 512 in magnitude, and we add at most 8 of them (4096)
// before widening to int32 with _mm256_madd_epi16 — far from the int16 limit.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels_internal.h"

namespace bitllm {
namespace {

// ============================================================================================
// Helpers
// ============================================================================================

inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

inline __m256i load(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }

// ---- per-format block decoders: 32 packed bytes -> Σ codes·q over the block (int16 lanes) ----

// I2 block (128 weights): 4 planes of 32 codes, plane i = (byte >> 2i) & 3.
inline __m256i i2_block_dot(__m256i v, const int8_t* q) {
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256i s = _mm256_maddubs_epi16(_mm256_and_si256(v, m3), load(q));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2), m3), load(q + 32)));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m3), load(q + 64)));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), m3), load(q + 96)));
    return s;
}

// GEMV accumulation per format: `acc` adds one block into the int16 accumulator `a` (a second
// one, `b`, summed in after a right shift by kShiftB, is there for layouts with scaled planes),
// widened to int32 every kGroup blocks. (Tried for I2: planes 1 and 3 as `v & 0x0C` into `b` to
// save two shifts per block — measured 8 % slower on Zen 3, so I2 keeps three shifts.)
template <Format F>
struct Fmt;
template <>
struct Fmt<Format::I2> {
    static constexpr int kW = kI2Weights;
    static constexpr int kGroup = 8, kShiftB = 0;  // 8 x 2048 < 2^15
    static void acc(__m256i v, const int8_t* q, __m256i& a, __m256i&) { a = _mm256_add_epi16(a, i2_block_dot(v, q)); }
    static int32_t finish(int32_t s, int32_t qsum) { return s - qsum; }  // Σ(code-1)q
};

// ============================================================================================
// Decode rows into codes (GEMM and F32 paths)
// ============================================================================================

// y[r] byte c = x[c] byte r: a 16x16 byte transpose in four rounds of unpacks (8, 16, 32, 64 bits).
inline void transpose16x16(const __m128i* x, __m128i* y) {
    __m128i a[16], b[16], c[16];
    for (int k = 0; k < 8; ++k) {  // a[8h + k]: 16-bit lane e = row 8h + e, columns 2k, 2k + 1
        a[k] = _mm_unpacklo_epi8(x[2 * k], x[2 * k + 1]);
        a[k + 8] = _mm_unpackhi_epi8(x[2 * k], x[2 * k + 1]);
    }
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 4; ++k) {  // b[8h + 4s + k]: 32-bit lane e = row 8h + 4s + e, columns 4k .. 4k + 3
            b[8 * h + k] = _mm_unpacklo_epi16(a[8 * h + 2 * k], a[8 * h + 2 * k + 1]);
            b[8 * h + 4 + k] = _mm_unpackhi_epi16(a[8 * h + 2 * k], a[8 * h + 2 * k + 1]);
        }
    for (int base = 0; base < 16; base += 4)
        for (int k = 0; k < 2; ++k) {  // c[base + 2s + k]: 64-bit lane e = row base + 2s + e, columns 8k .. 8k + 7
            c[base + k] = _mm_unpacklo_epi32(b[base + 2 * k], b[base + 2 * k + 1]);
            c[base + 2 + k] = _mm_unpackhi_epi32(b[base + 2 * k], b[base + 2 * k + 1]);
        }
    for (int base = 0; base < 16; base += 4)
        for (int s = 0; s < 2; ++s) {
            y[base + 2 * s] = _mm_unpacklo_epi64(c[base + 2 * s], c[base + 2 * s + 1]);
            y[base + 2 * s + 1] = _mm_unpackhi_epi64(c[base + 2 * s], c[base + 2 * s + 1]);
        }
}

}  // namespace

// The codes of the 16 rows of a T1 tile (tile t; rows past N are zero bytes, which decode as code 1),
// Kp per row, ldc apart: each tile-block (byte j of row r at 16j + r) is decoded for all 16 rows at
// once — a group's digits are pshufb lookups of its nibble in the digit tables of v = 13 + i, and a set
// sign bit turns digit d into 2 - d = |d - 2| — then the 48 digit vectors (one byte per row) are
// transposed into rows. ~0.5 vector ops per weight, against ~1.2 for gathering each row's bytes and
// decoding it alone (the form before session 8).
void t1_tile_codes(const PackedView& w, int64_t t, uint8_t* codes, int64_t ldc) {
    const __m128i m15 = _mm_set1_epi8(15), two = _mm_set1_epi8(2);
    const __m128i d0 = _mm_load_si128((const __m128i*)kT1Digits.d[0]), d1 = _mm_load_si128((const __m128i*)kT1Digits.d[1]),
                  d2 = _mm_load_si128((const __m128i*)kT1Digits.d[2]);
    for (int64_t b = 0; b < w.Kp / kT1Weights; ++b) {
        const uint8_t* tb = w.data + tile_block_offset(Format::T1, w.N, w.Kp, t, b);
        const __m128i s8 = _mm_loadu_si128((const __m128i*)(tb + 128)), s9 = _mm_loadu_si128((const __m128i*)(tb + 144));
        __m128i x[48], y[16];  // x[3g + j]: digit j of group g, byte r = row r
        for (int jb = 0; jb < 8; ++jb) {
            const __m128i v = _mm_loadu_si128((const __m128i*)(tb + 16 * jb));
            const __m128i nib[2] = {_mm_and_si128(v, m15), _mm_and_si128(_mm_srli_epi16(v, 4), m15)};
            for (int h = 0; h < 2; ++h) {
                const int g = 4 * (jb >> 1) + 2 * h + (jb & 1);
                const __m128i bit = _mm_set1_epi8((char)(1 << (g >> 1)));
                const __m128i m2 = _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128((g & 1) ? s9 : s8, bit), bit), two);
                x[3 * g] = _mm_abs_epi8(_mm_sub_epi8(_mm_shuffle_epi8(d0, nib[h]), m2));
                x[3 * g + 1] = _mm_abs_epi8(_mm_sub_epi8(_mm_shuffle_epi8(d1, nib[h]), m2));
                x[3 * g + 2] = _mm_abs_epi8(_mm_sub_epi8(_mm_shuffle_epi8(d2, nib[h]), m2));
            }
        }
        for (int q = 0; q < 3; ++q) {
            transpose16x16(x + 16 * q, y);
            for (int r = 0; r < (int)kT1TileRows; ++r)
                _mm_storeu_si128((__m128i*)(codes + r * ldc + kT1Weights * b + 16 * q), y[r]);
        }
    }
}

namespace {

void decode_codes(Format f, const uint8_t* row, int64_t Kp, uint8_t* codes) {
    const __m256i m3 = _mm256_set1_epi8(3), two = _mm256_set1_epi8(2);
    switch (f) {
        case Format::I2:
            for (int64_t b = 0; b < Kp / kI2Weights; ++b) {
                const __m256i v = load(row + 32 * b);
                uint8_t* c = codes + kI2Weights * b;
                for (int i = 0; i < 4; ++i)
                    _mm256_storeu_si256((__m256i*)(c + 32 * i),
                                        _mm256_and_si256(_mm256_srli_epi16(v, 2 * i), m3));
            }
            break;
        case Format::T1:  // whole tiles go through t1_tile_codes; a row off the 16-row grid, through the scalar decoder
            decode_row_codes_generic(f, row, Kp, codes);
            break;
        case Format::B1: {
            // 32 codes from 4 bytes: byte k copied to lanes 8k..8k+7, lane i of each tests bit i
            const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
            const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
            for (int64_t p = 0; p < Kp / 8; p += 4) {
                int32_t four;
                std::memcpy(&four, row + p, 4);
                const __m256i r = _mm256_shuffle_epi8(_mm256_set1_epi32(four), rep);
                const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(r, bit), bit);  // weight -1
                _mm256_storeu_si256((__m256i*)(codes + 8 * p), _mm256_andnot_si256(set, two));
            }
            break;
        }
    }
}

// ============================================================================================
// A8 kernels
// ============================================================================================

constexpr int64_t kPrefetchBytes = 4096;

// R rows at once against MB activation rows: R independent DRAM streams, each block decoded once
// (the compiler shares the inlined decode across the MB rows) and the activation loads shared.
template <Format F, int R, int MB>
inline void gemv_rows(const PackedView& w, const int8_t* q, int64_t ldq, int64_t n, int32_t (*res)[MB]) {
    // int16 accumulation over Fmt<F>::kGroup blocks (bounds above), then one widening to int32.
    constexpr int kGroup = Fmt<F>::kGroup;
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t nb = w.Kp / Fmt<F>::kW;
    const uint8_t* rows[R];
    __m256i acc[R][MB];
    for (int r = 0; r < R; ++r) {
        rows[r] = w.data + (n + r) * w.row_bytes;
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_si256();
    }
    // Prefetch distance: at least one whole group of R rows ahead. The range prefetched per block
    // walks [pf, pf + R*row_bytes) at the pace the group is consumed, so a distance shorter than
    // the group (4 KB against 4 rows of 2.2 KB at K = 8640) would leave half of every group to the
    // hardware prefetcher: 3200x8640 ran at 66-71 % of the roofline, the 1 KB-row shapes at 90 %.
    const char* pf = (const char*)(w.data + n * w.row_bytes) + std::max<int64_t>(kPrefetchBytes, R * w.row_bytes);
    for (int64_t b0 = 0; b0 < nb; b0 += kGroup) {
        const int64_t b1 = std::min<int64_t>(nb, b0 + kGroup);
        __m256i s16[R][MB], t16[R][MB];
        for (int r = 0; r < R; ++r)
            for (int m = 0; m < MB; ++m) s16[r][m] = t16[r][m] = _mm256_setzero_si256();
        for (int64_t b = b0; b < b1; ++b) {
            // Software prefetch of the rows after this tile: rows are short (K/4 bytes for I2), so
            // a tile is a few KB and the hardware prefetcher alone ramps up too late.
            // (A fixed count per block: the loop bounded by the group's end it replaced cost 5-8 % in
            // scalar work, in cache, on a Zen 4.)
            for (int k = 0; k < (R + 1) / 2; ++k) _mm_prefetch(pf + 32 * R * b + 64 * k, _MM_HINT_T0);
            for (int r = 0; r < R; ++r) {
                const __m256i v = load(rows[r] + 32 * b);
                for (int m = 0; m < MB; ++m)
                    Fmt<F>::acc(v, q + m * ldq + Fmt<F>::kW * b, s16[r][m], t16[r][m]);
            }
        }
        for (int r = 0; r < R; ++r)
            for (int m = 0; m < MB; ++m) {
                __m256i s = s16[r][m];
                if constexpr (Fmt<F>::kShiftB > 0) s = _mm256_add_epi16(s, _mm256_srai_epi16(t16[r][m], Fmt<F>::kShiftB));
                acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(s, ones));
            }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) res[r][m] = hsum_epi32(acc[r][m]);
}

// Rows [n0, n1) for the MB activation rows of `a` (MB = a.M <= 3): R rows per call, then singles.
template <Format F, int R, int MB>
void gemv_a8(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out, int64_t n0,
             int64_t n1) {
    int32_t res[R][MB];
    int64_t n = n0;
    // the first rows of the chunk: nothing prefetched them yet
    const char* first = (const char*)(w.data + n0 * w.row_bytes);
    for (int64_t o = 0; o < std::min<int64_t>(kPrefetchBytes, (n1 - n0) * w.row_bytes); o += 64)
        _mm_prefetch(first + o, _MM_HINT_T0);
    auto emit = [&](int rows) {
        for (int r = 0; r < rows; ++r)
            for (int m = 0; m < MB; ++m)
                out[m * w.N + n + r] =
                    a8_epilogue(Fmt<F>::finish(res[r][m], a.qsum[m]), a.xscale[m], wscale[n + r], bias, n + r);
    };
    for (; n + R <= n1; n += R) {
        gemv_rows<F, R, MB>(w, a.q, a.ldq, n, res);
        emit(R);
    }
    for (; n < n1; ++n) {
        gemv_rows<F, 1, MB>(w, a.q, a.ldq, n, res);
        emit(1);
    }
}

// ---- GEMM (M > 16): rows decoded once per call into codes, then a register-blocked micro-kernel ----
// The tile's codes (kTile rows x kKC) and the activations' K chunk (M x kKC) stay in L1 while every
// (4 activation rows x 2 code rows) block of accumulators runs over the chunk; each code vector
// loaded feeds 4 maddubs, each activation vector 2. (Measured on Zen 3, hot cache, M = 16: 4x2
// 133 G weight-rows/s per core, 3x3 133, 2x4 99, 1x4 79; a bare maddubs+add loop peaks at 154.) int16 accumulation over one chunk is at most
// kKC/32 = 16 maddubs of |lane| <= 2·2·127 = 508 (8128 < 2^15), then widened into int32.
constexpr int64_t kTile = 16;  // code rows per tile
constexpr int64_t kKC = 512;   // K positions per chunk
constexpr int kNR = 2;         // code rows per micro-kernel

template <int MR>
inline void gemm_micro(const uint8_t* c, int64_t ldc, const int8_t* q, int64_t ldq, int64_t kc, __m256i* acc,
                       int64_t lda) {
    __m256i s[MR][kNR];
    for (int m = 0; m < MR; ++m)
        for (int r = 0; r < kNR; ++r) s[m][r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kc; k += 32) {
        __m256i cv[kNR];
        for (int r = 0; r < kNR; ++r) cv[r] = load(c + r * ldc + k);
        for (int m = 0; m < MR; ++m) {
            const __m256i qv = load(q + m * ldq + k);
            for (int r = 0; r < kNR; ++r) s[m][r] = _mm256_add_epi16(_mm256_maddubs_epi16(cv[r], qv), s[m][r]);
        }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int m = 0; m < MR; ++m)
        for (int r = 0; r < kNR; ++r) acc[m * lda + r] = _mm256_add_epi32(acc[m * lda + r], _mm256_madd_epi16(s[m][r], ones));
}

// The 8 horizontal sums of v[0..7], in order, in one vector (int32: any order is exact).
inline __m256i hsum8_epi32(const __m256i* v) {
    const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    // h0: [partial sums of rows 0-3 from the low 128 bits | from the high 128 bits], h1 likewise 4-7
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}

// a8_epilogue for 8 consecutive outputs: ((float)(acc - qsum) / xscale) · wscale (+ bias), the same
// IEEE operations in the same order.
inline void a8_epilogue8(__m256i acc, int32_t qsum, float xscale, const float* wscale, const float* bias, float* out) {
    __m256 y = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, _mm256_set1_epi32(qsum)));
    y = _mm256_mul_ps(_mm256_div_ps(y, _mm256_set1_ps(xscale)), _mm256_loadu_ps(wscale));
    if (bias) y = _mm256_add_ps(y, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(out, y);
}

void gemm_tiles(Format f, const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1) {
    const int64_t Kp = w.Kp, M = a.M;
    // (kTile, Kp) codes; rows past n1 stay code 1 (w = 0) and are never written out
    std::vector<uint8_t> codes((size_t)(kTile * Kp), 1);
    std::vector<__m256i> acc((size_t)(M * kTile));  // (M, kTile) int32 lane sums
    std::vector<uint8_t> rowbuf((size_t)w.row_bytes);  // one row of a tiled format, gathered
    for (int64_t n = n0; n < n1; n += kTile) {
        const int64_t rn = std::min<int64_t>(kTile, n1 - n);
        const int64_t rt = (rn + kNR - 1) / kNR * kNR;  // rows computed (whole micro-kernels)
        if (f == Format::T1 && n % kT1TileRows == 0) {  // a whole tile (the row threads split at multiples of 16)
            t1_tile_codes(w, n / kT1TileRows, codes.data(), Kp);
        } else {
            for (int64_t r = 0; r < rn; ++r) decode_codes(f, row_of(w, n + r, rowbuf.data()), Kp, &codes[r * Kp]);
            if (rn < kTile) std::memset(&codes[rn * Kp], 1, (size_t)((kTile - rn) * Kp));
        }
        for (auto& v : acc) v = _mm256_setzero_si256();
        for (int64_t k0 = 0; k0 < Kp; k0 += kKC) {
            const int64_t kc = std::min<int64_t>(kKC, Kp - k0);
            for (int64_t m = 0; m < M; m += 4) {
                const int8_t* qm = a.q + m * a.ldq + k0;
                for (int64_t r = 0; r < rt; r += kNR) {
                    const uint8_t* c = &codes[r * Kp + k0];
                    __m256i* o = &acc[m * kTile + r];
                    switch (std::min<int64_t>(4, M - m)) {
                        case 4: gemm_micro<4>(c, Kp, qm, a.ldq, kc, o, kTile); break;
                        case 3: gemm_micro<3>(c, Kp, qm, a.ldq, kc, o, kTile); break;
                        case 2: gemm_micro<2>(c, Kp, qm, a.ldq, kc, o, kTile); break;
                        default: gemm_micro<1>(c, Kp, qm, a.ldq, kc, o, kTile); break;
                    }
                }
            }
        }
        for (int64_t m = 0; m < M; ++m) {
            int64_t r = 0;
            for (; r + 8 <= rn; r += 8)  // 8 outputs at once: a8_epilogue's IEEE operations, in vectors
                a8_epilogue8(hsum8_epi32(&acc[m * kTile + r]), a.qsum[m], a.xscale[m], wscale + n + r,
                             bias ? bias + n + r : nullptr, out + m * w.N + n + r);
            for (; r < rn; ++r)
                out[m * w.N + n + r] = a8_epilogue(hsum_epi32(acc[m * kTile + r]) - a.qsum[m], a.xscale[m],
                                                   wscale[n + r], bias, n + r);
        }
    }
}

template <Format F>
void a8_avx2(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
             int64_t n0, int64_t n1) {
    // M <= 4: each block decoded in registers once and used for every activation row (GEMV style).
    switch (a.M) {
        case 1: return gemv_a8<F, 4, 1>(w, a, wscale, bias, out, n0, n1);
        case 2: return gemv_a8<F, 2, 2>(w, a, wscale, bias, out, n0, n1);
        case 3: return gemv_a8<F, 2, 3>(w, a, wscale, bias, out, n0, n1);
        case 4: return gemv_a8<F, 1, 4>(w, a, wscale, bias, out, n0, n1);
        default: break;
    }
    if (a.M > 16) return gemm_tiles(F, w, a, wscale, bias, out, n0, n1);
    // 5 <= M <= 16: two rows (or one) at a time, their blocks decoded in registers for groups of <= 4
    // activation rows (the rows stay in L1 between groups). Hot-cache Zen 3, 1 thread, 1536x4096:
    // M = 8 at 103 G weight-rows/s and M = 16 at 105 with 2 rows x 4 (one row x 4: 95 and 85-92; the
    // code tiles: 71 and 85-92); from M = 64 on the code tiles win.
    const int64_t groups = (a.M + 3) / 4, base = a.M / groups, extra = a.M % groups;
    int64_t n = n0;
    if (a.M % 4 == 0)
        for (; n + 2 <= n1; n += 2)
            for (int64_t m = 0; m < a.M; m += 4) {
                int32_t res[2][4];
                gemv_rows<F, 2, 4>(w, a.q + m * a.ldq, a.ldq, n, res);
                for (int r = 0; r < 2; ++r)
                    for (int j = 0; j < 4; ++j)
                        out[(m + j) * w.N + n + r] = a8_epilogue(Fmt<F>::finish(res[r][j], a.qsum[m + j]),
                                                                 a.xscale[m + j], wscale[n + r], bias, n + r);
            }
    for (; n < n1; ++n) {
        for (int64_t g = 0, m = 0; g < groups; ++g) {
            const int mb = (int)(base + (g < extra));
            int32_t res[4];
            const int8_t* q = a.q + m * a.ldq;
            with_rows(mb, [&](auto k) {
                constexpr int MB = decltype(k)::value;
                gemv_rows<F, 1, MB>(w, q, a.ldq, n, (int32_t(*)[MB])res);
            });
            for (int j = 0; j < mb; ++j)
                out[(m + j) * w.N + n] = a8_epilogue(Fmt<F>::finish(res[j], a.qsum[m + j]), a.xscale[m + j],
                                                     wscale[n], bias, n);
            m += mb;
        }
    }
}

// ============================================================================================
// F32 kernels: canonical 16 lanes = two 8-lane accumulators (k ≡ 0..7 and 8..15 mod 16)
// ============================================================================================

inline __m256 signed_select(__m128i c8, __m256 x) {
    // c8: 8 codes in the low bytes. code 2 -> +x, 0 -> -x, 1 -> +0.0f (no multiplication).
    const __m256i c = _mm256_cvtepu8_epi32(c8);
    const __m256i zero_w = _mm256_cmpeq_epi32(c, _mm256_set1_epi32(1));
    const __m256i neg = _mm256_slli_epi32(_mm256_cmpeq_epi32(c, _mm256_setzero_si256()), 31);
    return _mm256_xor_ps(_mm256_andnot_ps(_mm256_castsi256_ps(zero_w), x), _mm256_castsi256_ps(neg));
}

inline float tree16(__m256 lo, __m256 hi) {
    const __m256 s8 = _mm256_add_ps(lo, hi);  // l[j] + l[j+8]
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // + l[j+4]
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                 // + l[j+2]
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));                              // + l[1]
    return _mm_cvtss_f32(s1);
}

template <Format F>
void f32_avx2(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
              int64_t n0, int64_t n1) {
    // T1: a whole tile's codes at a time (t1_tile_codes); the others: one row's
    constexpr int64_t kRows = F == Format::T1 ? kT1TileRows : 1;
    std::vector<uint8_t> codes((size_t)(kRows * w.Kp)), buf((size_t)w.row_bytes);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* c = codes.data() + (n % kRows) * w.Kp;
        if constexpr (F == Format::T1) {
            if (n == n0 || n % kT1TileRows == 0) t1_tile_codes(w, n / kT1TileRows, codes.data(), w.Kp);
        } else {
            decode_codes(F, row_of(w, n, buf.data()), w.Kp, codes.data());
        }
        for (int64_t m = 0; m < a.M; ++m) {
            const float* x = a.x + m * a.ldx;
            __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
            for (int64_t k = 0; k < w.Kp; k += 16) {
                const __m128i c16 = _mm_loadu_si128((const __m128i*)(c + k));
                lo = _mm256_add_ps(lo, signed_select(c16, _mm256_loadu_ps(x + k)));
                hi = _mm256_add_ps(hi, signed_select(_mm_srli_si128(c16, 8), _mm256_loadu_ps(x + k + 8)));
            }
            out[m * w.N + n] = f32_epilogue(tree16(lo, hi), wscale[n], bias, n);
        }
    }
}


// ============================================================================================
// B1 LUT (T-MAC style): table lookups of activation sums instead of per-weight decoding
// ============================================================================================
// A nibble of a B1 byte is 4 "is -1" flags c_0..c_3 of 4 consecutive weights, so Σ c_i·q_i over
// those 4 columns is one of 16 sums of the 4 activations: built once per call and row thread
// (a8_b1_prep_avx2), then looked up with pshufb for 32 rows at a time — the tiled layout puts byte p
// of 64 rows in one 64-byte line, so a 256-bit load holds byte p of 32 rows, 16 per 128-bit lane, and
// both lanes look up the same table (broadcast). The sums (|T| <= 512) are int16: a table is two
// 16-byte pshufb tables, its low bytes (u8) and high bytes (s8), and unpacklo/hi_epi8 of the two
// lookups rebuild the int16 values exactly (rows 0-7 | 16-23 and 8-15 | 24-31). Per 256
// weight-rows: 3 ops for the nibbles, 4 pshufb, 4 unpacks, 4 adds — against 27 decode+maddubs ops
// for the bit planes. Tables: b1_build_tables (kernels_internal.h), kB1TableBytes per row byte.
constexpr int64_t kB1BlockBytes = (int64_t)sizeof(BlockB1);  // row bytes per block
constexpr int kB1LutGroup = 31;       // int16 lanes gain 2 lookups of |T| <= 512 per row byte: 62·512 < 2^15

// The T1 table kernel keeps 8 rows x 2 lanes of int16 sums per vector; both lanes hold the same rows
// (two groups of columns): their sum as int32.
inline __m256i lane_sum(__m256i v) {
    return _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)),
                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
}

// The int16 tables of 4 activations (a, b, c, d) per 128-bit lane: t0 = entries 0..7,
// T[e] = e0·a + e1·b + e2·c, and t1 = entries 8..15, T[8 + e] = T[e] + d.
inline void b1_sums(__m256i qb, __m256i ctl_ab, __m256i ctl_cd, __m256i& t0, __m256i& t1) {
    const __m256i e01 = _mm256_setr_epi8(0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1,
                                         0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1);
    const __m256i e2 = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0,
                                        0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0);
    const __m256i e3 = _mm256_set1_epi16(0x0100);  // (0, 1): picks d
    const __m256i ab = _mm256_shuffle_epi8(qb, ctl_ab), cd = _mm256_shuffle_epi8(qb, ctl_cd);
    t0 = _mm256_add_epi16(_mm256_maddubs_epi16(e01, ab), _mm256_maddubs_epi16(e2, cd));
    t1 = _mm256_add_epi16(t0, _mm256_maddubs_epi16(e3, cd));
}

// The tables of b1_build_tables for `positions` row bytes (even) of one activation row q (plus 16
// readable bytes) into dst.
void b1_tables_avx2(const int8_t* q, int64_t positions, uint8_t* dst, bool int16) {
    // pshufb controls picking the (a, b) and (c, d) bytes of groups 0 | 2 and 1 | 3 of 16 activations
    const __m256i ab02 = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9);
    const __m256i two = _mm256_set1_epi8(2), four = _mm256_set1_epi8(4);
    const __m256i cd02 = _mm256_add_epi8(ab02, two), ab13 = _mm256_add_epi8(ab02, four),
                  cd13 = _mm256_add_epi8(ab13, two);
    const __m256i lo8 = _mm256_set1_epi16(0x00FF);
    for (int64_t pp = 0; pp < positions / 2; ++pp) {  // row bytes 2pp, 2pp + 1: groups 4pp .. 4pp + 3
        const __m256i qb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(q + 16 * pp)));
        __m256i x[2], y[2];  // x: groups 0 | 2 (the low nibbles), y: groups 1 | 3 (the high nibbles)
        b1_sums(qb, ab02, cd02, x[0], x[1]);
        b1_sums(qb, ab13, cd13, y[0], y[1]);
        __m256i* d = reinterpret_cast<__m256i*>(dst + 2 * kB1TableBytes * pp);
        if (int16) {  // group g: [entries 0-7 | 8-15] = lane (g & 2) / 2 of t0 and of t1
            _mm256_storeu_si256(d, _mm256_permute2x128_si256(x[0], x[1], 0x20));
            _mm256_storeu_si256(d + 1, _mm256_permute2x128_si256(y[0], y[1], 0x20));
            _mm256_storeu_si256(d + 2, _mm256_permute2x128_si256(x[0], x[1], 0x31));
            _mm256_storeu_si256(d + 3, _mm256_permute2x128_si256(y[0], y[1], 0x31));
        } else {  // packus/packs work per 128-bit lane: lane l gets entries 0-7 then 8-15 of its group
            const __m256i xl = _mm256_packus_epi16(_mm256_and_si256(x[0], lo8), _mm256_and_si256(x[1], lo8));
            const __m256i xh = _mm256_packs_epi16(_mm256_srai_epi16(x[0], 8), _mm256_srai_epi16(x[1], 8));
            const __m256i yl = _mm256_packus_epi16(_mm256_and_si256(y[0], lo8), _mm256_and_si256(y[1], lo8));
            const __m256i yh = _mm256_packs_epi16(_mm256_srai_epi16(y[0], 8), _mm256_srai_epi16(y[1], 8));
            _mm256_storeu_si256(d, _mm256_permute2x128_si256(xl, xh, 0x20));
            _mm256_storeu_si256(d + 1, _mm256_permute2x128_si256(yl, yh, 0x20));
            _mm256_storeu_si256(d + 2, _mm256_permute2x128_si256(xl, xh, 0x31));
            _mm256_storeu_si256(d + 3, _mm256_permute2x128_si256(yl, yh, 0x31));
        }
    }
}

}  // namespace

void b1_build_tables(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1, bool int16) {
    const int64_t bytes = w.row_bytes;
    scratch.resize((size_t)(a.M * bytes * kB1TableBytes + 64));
    uint8_t* lut = scratch.data() + ((64 - (reinterpret_cast<uintptr_t>(scratch.data()) & 63)) & 63);
    for (int64_t m = 0; m < a.M; ++m)
        b1_tables_avx2(a.q + m * a.ldq + kB1Weights * b0, (b1 - b0) * kB1BlockBytes,
                       lut + (m * bytes + kB1BlockBytes * b0) * kB1TableBytes, int16);
    a.lut = lut;
}

namespace {

inline __m256i bcast128(const uint8_t* p) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p)); }

// One tile-chunk (64 rows, `bytes` row bytes) against MB activation rows, whose tables lie lut_stride
// bytes apart: 32 rows at a time, the nibbles split once and looked up in every row's tables. Adds
// Σ c·q of tile row r to acc[m * acc_stride + r]. No software prefetch (the hardware prefetcher
// streamed a thread's tiles faster: 1 thread from DRAM, 8640x3200 190 µs, against 235 with
// prefetcht0 2 KB ahead, on a Zen 4).
template <int MB>
inline void b1_lut_tile(const uint8_t* t, int64_t bytes, const uint8_t* lut, int64_t lut_stride, int32_t* acc,
                        int64_t acc_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int h = 0; h < 2; ++h)  // rows 32h .. 32h + 31
        for (int64_t p0 = 0; p0 < bytes; p0 += kB1LutGroup) {
            const int64_t p1 = std::min<int64_t>(bytes, p0 + kB1LutGroup);
            __m256i a0[MB], a1[MB];  // int16: rows 0-7 | 16-23, rows 8-15 | 24-31 (of the 32)
            for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_si256();
            for (int64_t p = p0; p < p1; ++p) {
                const __m256i v = load(t + kB1TileRows * p + 32 * h);
                const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int m = 0; m < MB; ++m) {
                    const uint8_t* tb = lut + m * lut_stride + kB1TableBytes * p;
                    __m256i l = _mm256_shuffle_epi8(bcast128(tb), lo), g = _mm256_shuffle_epi8(bcast128(tb + 16), lo);
                    a0[m] = _mm256_add_epi16(a0[m], _mm256_unpacklo_epi8(l, g));
                    a1[m] = _mm256_add_epi16(a1[m], _mm256_unpackhi_epi8(l, g));
                    l = _mm256_shuffle_epi8(bcast128(tb + 32), hi);
                    g = _mm256_shuffle_epi8(bcast128(tb + 48), hi);
                    a0[m] = _mm256_add_epi16(a0[m], _mm256_unpacklo_epi8(l, g));
                    a1[m] = _mm256_add_epi16(a1[m], _mm256_unpackhi_epi8(l, g));
                }
            }
            for (int m = 0; m < MB; ++m) {
                int32_t* o = acc + m * acc_stride + 32 * h;
                const __m256i s[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a0[m])),   // rows 0-7
                                      _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a1[m])),   // 8-15
                                      _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a0[m], 1)),  // 16-23
                                      _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a1[m], 1))};  // 24-31
                for (int i = 0; i < 4; ++i) _mm256_storeu_si256((__m256i*)(o + 8 * i), _mm256_add_epi32(load(o + 8 * i), s[i]));
            }
        }
}

// ============================================================================================
// T1 LUT: sign-folded tables of sums of 3 activations
// ============================================================================================
// A group of 3 columns has a 5-bit code: a magnitude index i (nibble, 0..13) and a sign bit s, for
// the pattern w or its negation -w (kernels_internal.h, BlockT1). Σ w·q over the group is E[i] or
// -E[i], E[i] = Σ w·q of the pattern v = 13 + i, so one 16-entry table per group (|E| <= 384,
// int16) serves all 27 patterns: its low and high bytes are two pshufb tables. The sign is applied
// as a byte XOR with the group's 0x00/0xFF mask on both looked-up bytes, which turns the int16 E
// into ~E = -E - 1; the -1s are undone once per row, at the end, by adding the row's number of set
// sign bits, which the packer stores after the blocks (t1_sign_count; counting them here, with a
// pshufb popcount per tile-block, cost 10 %). So Σ w·q needs no activation-sum offset, and per 96
// weight-rows (16 rows x 2 groups): 1.5 ops for the nibbles, 2 for the mask (shift, compare), 2
// pshufb, 2 XOR, 2 unpacks, 2 adds. (The earlier form, 27-entry c-sums as two 16-entry halves
// picked by blendv, needed 4 pshufb and 2 blendv instead: 55 against 80 G weight-rows/s per core
// in a microbenchmark on the session-8 Zen 3.) Tables per 48-column block: 8 index vectors x [low
// bytes | high bytes] x 32 bytes (lane 0: group 2i, lane 1: group 2i+1) = 512 bytes, so a K chunk's
// (kT1ChunkBlocks blocks, 8 KB) stay in L1 while every tile of its rows walks them.
constexpr int kT1LutGroup = 10;  // blocks per int16 run: 8 lookups of |~E| <= 385 per block, 80·385 < 2^15
constexpr int64_t kT1LutPrefetch = 2048;

struct T1Coef {
    __m256i c01[2], c2[2];  // maddubs weights of (a, b) and (c, 0): digits c of the codes 8k .. 8k+7
};
inline const T1Coef& t1_coef() {
    static const T1Coef kCoef = [] {
        T1Coef t;
        alignas(32) int8_t x[32], y[32];
        for (int k = 0; k < 2; ++k) {
            for (int j = 0; j < 32; j += 2) {
                const int e = 8 * k + (j & 15) / 2;  // the 5-bit code; its pattern's digits
                x[j] = int8_t(kT1Digits.d[0][e]), x[j + 1] = int8_t(kT1Digits.d[1][e]);
                y[j] = int8_t(kT1Digits.d[2][e]), y[j + 1] = 0;
            }
            t.c01[k] = _mm256_load_si256((const __m256i*)x);
            t.c2[k] = _mm256_load_si256((const __m256i*)y);
        }
        return t;
    }();
    return kCoef;
}

// Tables of one activation row (qp: Kp bytes plus 16 readable ones) for nb blocks: the sign-folded
// w-sums, kT1LutBlockBytes per block.
void t1_build_tables(const int8_t* qp, int64_t nb, uint8_t* lut) {
    const T1Coef& k = t1_coef();
    const __m256i ab = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                        3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4);
    const __m256i cz = _mm256_setr_epi8(2, -128, 2, -128, 2, -128, 2, -128, 2, -128, 2, -128, 2, -128, 2, -128,
                                        5, -128, 5, -128, 5, -128, 5, -128, 5, -128, 5, -128, 5, -128, 5, -128);
    const __m256i lo8 = _mm256_set1_epi16(0x00FF), ones = _mm256_set1_epi8(1);
    for (int64_t b = 0; b < nb; ++b)
        for (int i = 0; i < 8; ++i) {
            const __m256i qb =
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(qp + kT1Weights * b + 6 * i)));
            const __m256i pab = _mm256_shuffle_epi8(qb, ab), pcz = _mm256_shuffle_epi8(qb, cz);
            uint8_t* blk = lut + kT1LutBlockBytes * b;
            // E = Σ c·q - Σq (the w-sums) of the codes 0..15 (sign bit clear), 8 per vector
            const __m256i gsum = _mm256_add_epi16(_mm256_maddubs_epi16(ones, pab), _mm256_maddubs_epi16(ones, pcz));
            __m256i e[2];
            for (int j = 0; j < 2; ++j)
                e[j] = _mm256_sub_epi16(
                    _mm256_add_epi16(_mm256_maddubs_epi16(k.c01[j], pab), _mm256_maddubs_epi16(k.c2[j], pcz)), gsum);
            // [low | high] bytes per index vector, lane = group parity
            _mm256_store_si256((__m256i*)(blk + 64 * i),
                               _mm256_packus_epi16(_mm256_and_si256(e[0], lo8), _mm256_and_si256(e[1], lo8)));
            _mm256_store_si256((__m256i*)(blk + 64 * i + 32),
                               _mm256_packs_epi16(_mm256_srai_epi16(e[0], 8), _mm256_srai_epi16(e[1], 8)));
        }
}

// One index vector's lookups: E or ~E (mask m8) of 16 rows x 2 groups, added as int16.
inline void t1_lookup(__m256i nib, __m256i m8, const uint8_t* tb, __m256i& a0, __m256i& a1) {
    const __m256i l = _mm256_xor_si256(_mm256_shuffle_epi8(load(tb), nib), m8);
    const __m256i h = _mm256_xor_si256(_mm256_shuffle_epi8(load(tb + 32), nib), m8);
    a0 = _mm256_add_epi16(a0, _mm256_unpacklo_epi8(l, h));
    a1 = _mm256_add_epi16(a1, _mm256_unpackhi_epi8(l, h));
}

// cb blocks of one tile (tp) against MB activation rows (tables lut_stride apart): adds Σ w·q of
// the tile's rows, less their set sign bits, into acc[m * acc_stride + r].
template <int MB>
inline void t1_lut_tile(const uint8_t* tp, int64_t cb, const uint8_t* lut, int64_t lut_stride, bool prefetch,
                        int32_t* acc, int64_t acc_stride) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    constexpr int64_t kLutBlock = kT1LutBlockBytes;
    __m256i r0[MB], r1[MB];  // int32 sums of rows 0-7 and 8-15
    for (int m = 0; m < MB; ++m) r0[m] = r1[m] = zero;
    for (int64_t b0 = 0; b0 < cb; b0 += kT1LutGroup) {
        __m256i a0[MB], a1[MB];  // int16: rows 0-7, rows 8-15 (lane 0: group 2i, lane 1: group 2i+1)
        for (int m = 0; m < MB; ++m) a0[m] = a1[m] = zero;
        for (int64_t b = b0; b < std::min<int64_t>(cb, b0 + kT1LutGroup); ++b) {
            const uint8_t* blk = tp + kT1TileBlockBytes * b;
            if (prefetch)
                for (int o = 0; o < kT1TileBlockBytes; o += 64) _mm_prefetch((const char*)blk + kT1LutPrefetch + o, _MM_HINT_T0);
            const __m256i hb = load(blk + 128);
            for (int u = 0; u < 4; ++u) {
                const __m256i v = load(blk + 32 * u);
                const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                // sign bits 2u (low nibbles) and 2u + 1 (high) moved to bit 7, then spread over the byte
                const __m256i mlo = _mm256_cmpgt_epi8(zero, _mm256_slli_epi16(hb, 7 - 2 * u));
                const __m256i mhi = _mm256_cmpgt_epi8(zero, _mm256_slli_epi16(hb, 6 - 2 * u));
                for (int m = 0; m < MB; ++m) {
                    const uint8_t* tb = lut + m * lut_stride + kLutBlock * b + 128 * u;
                    t1_lookup(lo, mlo, tb, a0[m], a1[m]);
                    t1_lookup(hi, mhi, tb + 64, a0[m], a1[m]);
                }
            }
        }
        for (int m = 0; m < MB; ++m) {
            r0[m] = _mm256_add_epi32(r0[m], lane_sum(a0[m]));
            r1[m] = _mm256_add_epi32(r1[m], lane_sum(a1[m]));
        }
    }
    for (int m = 0; m < MB; ++m) {
        int32_t* o = acc + m * acc_stride;
        _mm256_storeu_si256((__m256i*)o, _mm256_add_epi32(load(o), r0[m]));
        _mm256_storeu_si256((__m256i*)(o + 8), _mm256_add_epi32(load(o + 8), r1[m]));
    }
}


}  // namespace

// ============================================================================================
// The pinned activation quantizer (bit-exact with quantize_generic; also used by the AVX-512 table)
// ============================================================================================

void quantize_avx2(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq, float* scale,
                   int32_t* sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo packs' lane interleave
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        int8_t* qr = q + m * ldq;
        __m256 mx = _mm256_setzero_ps();
        int64_t k = 0;
        // max_ps returns its second operand when either is NaN: NaNs are skipped, as in the scalar loop.
        for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)), mx);
        float lanes[8];
        _mm256_storeu_ps(lanes, mx);
        float amax = 0.0f;
        for (float v : lanes) amax = v > amax ? v : amax;
        for (; k < K; ++k) {
            const float a = std::fabs(xr[k]);
            amax = a > amax ? a : amax;
        }
        const float s = (1.0f / (amax > 1e-5f ? amax : 1e-5f)) * 127.0f;  // as torch: reciprocal * 127
        const __m256 vs = _mm256_set1_ps(s);
        __m256i sum = _mm256_setzero_si256();
        auto conv = [&](const float* p) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
            sum = _mm256_add_epi32(sum, i);
            return i;
        };
        for (k = 0; k + 32 <= K; k += 32) {
            const __m256i a = conv(xr + k), b = conv(xr + k + 8), c = conv(xr + k + 16), d = conv(xr + k + 24);
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            _mm256_storeu_si256((__m256i*)(qr + k), _mm256_permutevar8x32_epi32(p, order));
        }
        int32_t total = hsum_epi32(sum);
        for (; k < K; ++k) {
            float r = xr[k] * s;
            r = (r + 12582912.0f) - 12582912.0f;  // rint, as in quantize_generic
            r = r >= -128.0f ? r : -128.0f;
            r = r <= 127.0f ? r : 127.0f;
            qr[k] = (int8_t)(int)r;
            total += qr[k];
        }
        for (k = K; k < ldq; ++k) qr[k] = 0;
        scale[m] = s;
        sums[m] = total;
    }
}


// ---- T1 entry points (also in the AVX-512 table) ----

namespace {
void t1_tile(int mb, const uint8_t* tp, int64_t cb, const uint8_t* lut, int64_t stride, bool pf, int32_t* acc,
             int64_t acc_stride) {
    with_rows(mb, [&](auto k) { t1_lut_tile<decltype(k)::value>(tp, cb, lut, stride, pf, acc, acc_stride); });
}
}  // namespace

void a8_t1_prep_avx2(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1) {
    if (a.M > kTableMaxRows) return;  // more activation rows: the decoded-tile GEMM (no tables)
    const int64_t nb = w.Kp / kT1Weights, lut_stride = nb * kT1LutBlockBytes;
    scratch.resize((size_t)(a.M * lut_stride + 64 + w.Kp + 16));
    uint8_t* lut = scratch.data() + ((64 - (reinterpret_cast<uintptr_t>(scratch.data()) & 63)) & 63);
    int8_t* qp = reinterpret_cast<int8_t*>(lut + a.M * lut_stride);  // one row, 16 bytes of slack
    std::memset(qp + w.Kp, 0, 16);
    for (int64_t m = 0; m < a.M; ++m) {
        std::memcpy(qp, a.q + m * a.ldq, (size_t)w.Kp);
        t1_build_tables(qp + kT1Weights * b0, b1 - b0, lut + m * lut_stride + kT1LutBlockBytes * b0);
    }
    a.lut = lut;
}

void a8_t1_sums_avx2(const PackedView& w, const A8Acts& a, int64_t n0, int64_t n1, int64_t b0, int64_t b1, int32_t* acc,
                     int64_t ldacc) {
    table_sums(w, a, n0, n1, b0, b1, kT1LutBlockBytes, t1_tile, acc, ldacc);
}

void a8_t1_avx2(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1) {
    if (a.lut) return table_rows(w, a, wscale, bias, out, n0, n1, kT1LutBlockBytes, t1_tile);
    gemm_tiles(Format::T1, w, a, wscale, bias, out, n0, n1);
}

void f32_t1_avx2(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
                 int64_t n0, int64_t n1) {
    f32_avx2<Format::T1>(w, a, wscale, bias, out, n0, n1);
}

// ---- B1 entry points (also in the AVX-512 table) ----

namespace {
void b1_tile(int mb, const uint8_t* tp, int64_t cb, const uint8_t* lut, int64_t stride, bool, int32_t* acc,
             int64_t acc_stride) {
    with_rows(mb, [&](auto k) { b1_lut_tile<decltype(k)::value>(tp, cb * kB1BlockBytes, lut, stride, acc, acc_stride); });
}
}  // namespace

void a8_b1_prep_avx2(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch, int64_t b0, int64_t b1) {
    if (a.M <= kTableMaxRows) b1_build_tables(w, a, scratch, b0, b1, false);  // more rows: table_row_blocks
}

void a8_b1_sums_avx2(const PackedView& w, const A8Acts& a, int64_t n0, int64_t n1, int64_t b0, int64_t b1, int32_t* acc,
                     int64_t ldacc) {
    table_sums(w, a, n0, n1, b0, b1, kB1TableBytes * kB1BlockBytes, b1_tile, acc, ldacc);
}

void a8_b1_avx2(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1) {
    if (a.lut) return table_rows(w, a, wscale, bias, out, n0, n1, kB1TableBytes * kB1BlockBytes, b1_tile);
    // More than 16 activation rows (prefill): against the decoded-tile maddubs GEMM this took M = 128
    // from 113-123 G weight-rows/s per core to ~200 (Zen 4, hot).
    table_row_blocks(w, a, wscale, bias, out, n0, n1, a8_b1_prep_avx2, a8_b1_avx2);
}

void f32_b1_avx2(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
                 int64_t n0, int64_t n1) {
    f32_avx2<Format::B1>(w, a, wscale, bias, out, n0, n1);
}

const KernelTable kTableAVX2 = {
    {a8_avx2<Format::I2>, a8_t1_avx2, a8_b1_avx2},
    {f32_avx2<Format::I2>, f32_t1_avx2, f32_b1_avx2},
    quantize_avx2,
    {nullptr, a8_t1_prep_avx2, a8_b1_prep_avx2},
    {nullptr, a8_t1_sums_avx2, a8_b1_sums_avx2},
};

}  // namespace bitllm
