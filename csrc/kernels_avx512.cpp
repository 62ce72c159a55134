// AVX-512 kernels (F/BW/VL + VNNI; compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni
// -mavx512vbmi -ffp-contract=off, called only after the CPU probe). Bit-exact twins of generic.
//
// One zmm covers two consecutive 32-byte blocks of a row; `vpdpbusd` multiplies u8 codes by s8
// activations and accumulates straight into int32 (no int16 intermediate to saturate). The two
// 32-byte halves of an activation vector come from the two blocks' planes (one vinserti64x4,
// shared by the R rows of a tile). An odd last block runs the 256-bit (VL) form.
#if defined(BITLLM_SIMDE_AVX512)
// Test-only build: SIMDe's portable AVX-512 emulation, so that this file's logic can be checked
// bit for bit on CPUs without AVX-512 (tests/test_kernels_native.py).
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
// SIMDe 0.7 lacks this one; emulate it with two 256-bit halves.
static inline simde__m512i bitllm_mm512_mulhi_epu16(simde__m512i a, simde__m512i b) {
    const simde__m256i lo = simde_mm256_mulhi_epu16(simde_mm512_castsi512_si256(a), simde_mm512_castsi512_si256(b));
    const simde__m256i hi = simde_mm256_mulhi_epu16(simde_mm512_extracti64x4_epi64(a, 1), simde_mm512_extracti64x4_epi64(b, 1));
    return simde_mm512_inserti64x4(simde_mm512_castsi256_si512(lo), hi, 1);
}
#define _mm512_mulhi_epu16 bitllm_mm512_mulhi_epu16
static inline simde__m512i bitllm_mm512_cvtepu8_epi32(simde__m128i a) {
    return simde_mm512_inserti64x4(simde_mm512_castsi256_si512(simde_mm256_cvtepu8_epi32(a)),
                                   simde_mm256_cvtepu8_epi32(simde_mm_srli_si128(a, 8)), 1);
}
#define _mm512_cvtepu8_epi32 bitllm_mm512_cvtepu8_epi32
#define _mm512_cmpneq_epi32_mask(a, b) ((simde__mmask16)~simde_mm512_cmpeq_epi32_mask(a, b))
static inline simde__m512i bitllm_mm512_srai_epi32(simde__m512i a, unsigned s) {
    return simde_mm512_inserti64x4(simde_mm512_castsi256_si512(simde_mm256_srai_epi32(simde_mm512_castsi512_si256(a), (int)s)),
                                   simde_mm256_srai_epi32(simde_mm512_extracti64x4_epi64(a, 1), (int)s), 1);
}
#define _mm512_srai_epi32 bitllm_mm512_srai_epi32
#else
#include <immintrin.h>
#endif

// Vector types as template arguments (Ops<__m512i>) drop their alignment attribute; harmless here.
#pragma GCC diagnostic ignored "-Wignored-attributes"

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

// ---- plane decoders, templated on the vector type (zmm for block pairs, ymm for one block) ----

template <class V>
struct Ops;
template <>
struct Ops<__m512i> {
    static __m512i srli16(__m512i v, int s) { return _mm512_srli_epi16(v, (unsigned)s); }
    static __m512i slli16_8(__m512i v) { return _mm512_slli_epi16(v, 8); }
    static __m512i and_(__m512i a, __m512i b) { return _mm512_and_si512(a, b); }
    static __m512i set8(char c) { return _mm512_set1_epi8(c); }
    static __m512i set16(short c) { return _mm512_set1_epi16(c); }
    static __m512i mullo16(__m512i a, __m512i b) { return _mm512_mullo_epi16(a, b); }
    static __m512i mulhi16(__m512i a, __m512i b) { return _mm512_mulhi_epu16(a, b); }
    static __m512i packus(__m512i a, __m512i b) { return _mm512_packus_epi16(a, b); }
    static __m512i dp(__m512i acc, __m512i u, __m512i s) { return _mm512_dpbusd_epi32(acc, u, s); }
    static __m512i add8(__m512i a, __m512i b) { return _mm512_add_epi8(a, b); }
    static __m512i sub8(__m512i a, __m512i b) { return _mm512_sub_epi8(a, b); }
};
template <>
struct Ops<__m256i> {
    static __m256i srli16(__m256i v, int s) { return _mm256_srli_epi16(v, s); }
    static __m256i slli16_8(__m256i v) { return _mm256_slli_epi16(v, 8); }
    static __m256i and_(__m256i a, __m256i b) { return _mm256_and_si256(a, b); }
    static __m256i set8(char c) { return _mm256_set1_epi8(c); }
    static __m256i set16(short c) { return _mm256_set1_epi16(c); }
    static __m256i mullo16(__m256i a, __m256i b) { return _mm256_mullo_epi16(a, b); }
    static __m256i mulhi16(__m256i a, __m256i b) { return _mm256_mulhi_epu16(a, b); }
    static __m256i packus(__m256i a, __m256i b) { return _mm256_packus_epi16(a, b); }
    static __m256i dp(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
    static __m256i add8(__m256i a, __m256i b) { return _mm256_add_epi8(a, b); }
    static __m256i sub8(__m256i a, __m256i b) { return _mm256_sub_epi8(a, b); }
};

// Codes of plane i of the block(s) in v (I2: 4 planes). T1 and B1 run the AVX2 LUT kernels.
template <Format F, class V>
struct Planes;
template <class V>
struct Planes<Format::I2, V> {
    static constexpr int kN = 4, kW = kI2Weights;
    V v;
    explicit Planes(V x) : v(x) {}
    V get(int i) const { return Ops<V>::and_(Ops<V>::srli16(v, 2 * i), Ops<V>::set8(3)); }
};
template <Format F>
inline int32_t finish(int32_t s, int32_t qsum) {
    static_assert(F == Format::I2, "T1 and B1 run the AVX2 kernels");
    return s - qsum;
}

// ============================================================================================
// A8
// ============================================================================================

// I2 activations in block-pair order, built once per call (a8_i2_prep_avx512): for each pair p of
// 128-column blocks, plane i's 64 bytes are q[256p + 32i, +32) then q[256p + 128 + 32i, +32), the
// two halves a zmm of codes pairs with, so that one load serves a plane of both blocks (before: a
// load and a vinserti64x4). An odd last block keeps its 128 bytes in column order.
void a8_i2_prep_avx512(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch) {
    const int64_t Kp = w.Kp, pairs = Kp / 256;
    scratch.resize((size_t)(a.M * Kp + 64));
    int8_t* dst = reinterpret_cast<int8_t*>(scratch.data() + ((64 - (reinterpret_cast<uintptr_t>(scratch.data()) & 63)) & 63));
    for (int64_t m = 0; m < a.M; ++m) {
        const int8_t* src = a.q + m * a.ldq;
        int8_t* d = dst + m * Kp;
        for (int64_t p = 0; p < pairs; ++p)
            for (int i = 0; i < 4; ++i) {
                std::memcpy(d + 256 * p + 64 * i, src + 256 * p + 32 * i, 32);
                std::memcpy(d + 256 * p + 64 * i + 32, src + 256 * p + 128 + 32 * i, 32);
            }
        std::memcpy(d + 256 * pairs, src + 256 * pairs, (size_t)(Kp - 256 * pairs));
    }
    a.lut = reinterpret_cast<const uint8_t*>(dst);
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
// (R = 4 made gcc spill and copy accumulators: 1536x4096 hot at 124 G weights/s, R = 3 in a
// microbenchmark 167).
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
            const Planes<Format::I2, __m256i> pl(load256(rows[r] + 32 * b));
            for (int i = 0; i < 4; ++i) tail = _mm256_dpbusd_epi32(tail, pl.get(i), load256(q + kI2Weights * b + 32 * i));
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
            const Planes<Format::I2, __m256i> pl(load256(rows[r] + 32 * b));
            for (int i = 0; i < 4; ++i)
                for (int m = 0; m < MB; ++m) tail[m] = _mm256_dpbusd_epi32(tail[m], pl.get(i), load256(qb + m * ldq + 32 * i));
        }
        for (int m = 0; m < MB; ++m) res[r * MB + m] = hsum512(acc[r][m]) + hsum256(tail[m]);
    }
}

// Rows [n0, n1). M = 1: 3 rows at a time, then singles. M > 1: 4 rows at a time, their blocks
// decoded once per group of <= 4 activation rows (the rows stay in L1 between groups, the groups'
// activations in L1/L2).
void a8_i2_avx512(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                  int64_t n0, int64_t n1) {
    const int8_t* q = reinterpret_cast<const int8_t*>(a.lut);  // block-pair order (a8_i2_prep_avx512)
    const int64_t ldq = w.Kp;
    auto emit = [&](int64_t n, int rn, int64_t m0, int mb, const int32_t* res) {
        for (int r = 0; r < rn; ++r)
            for (int j = 0; j < mb; ++j)
                out[(m0 + j) * w.N + n + r] = a8_epilogue(finish<Format::I2>(res[r * mb + j], a.qsum[m0 + j]),
                                                          a.xscale[m0 + j], wscale[n + r], bias, n + r);
    };
    int32_t res[16];
    if (a.M == 1) {
        int64_t n = n0;
        for (; n + 3 <= n1; n += 3) {
            i2_gemv_rows<3>(w, q, n, res);
            emit(n, 3, 0, 1, res);
        }
        for (; n < n1; ++n) {
            i2_gemv_rows<1>(w, q, n, res);
            emit(n, 1, 0, 1, res);
        }
        return;
    }
    const int64_t groups = (a.M + 3) / 4, base = a.M / groups, extra = a.M % groups;
    for (int64_t n = n0; n < n1;) {
        const int rn = n + 4 <= n1 ? 4 : 1;
        for (int64_t g = 0, m0 = 0; g < groups; ++g) {
            const int mb = (int)(base + (g < extra));
            if (mb == 1) {  // M = 5 splits 3 + 2; a group of one only when M = 1 (above)
                for (int r = 0; r < rn; ++r) i2_gemv_rows<1>(w, q + m0 * ldq, n + r, res + r);
            } else {
                with_rows(mb, [&](auto k) {
                    constexpr int MB = decltype(k)::value < 2 ? 2 : decltype(k)::value;
                    if (rn == 4) i2_rows<4, MB>(w, q + m0 * ldq, ldq, n, g == 0, res);
                    else i2_rows<1, MB>(w, q + m0 * ldq, ldq, n, g == 0, res);
                });
            }
            emit(n, rn, m0, mb, res);
            m0 += mb;
        }
        n += rn;
    }
}

void decode_codes(Format f, const uint8_t* row, int64_t Kp, uint8_t* codes) {
    // One block at a time with the 256-bit plane decoders; codes = w+1.
    switch (f) {
        case Format::I2:
            for (int64_t b = 0; b < Kp / kI2Weights; ++b) {
                const Planes<Format::I2, __m256i> p(load256(row + 32 * b));
                for (int i = 0; i < 4; ++i) _mm256_storeu_si256((__m256i*)(codes + kI2Weights * b + 32 * i), p.get(i));
            }
            break;
        case Format::T1:
        case Format::B1:  // never called: T1 and B1 run the AVX2 F32 kernels (kTableAVX512 below)
            break;
    }
}

// ============================================================================================
// F32: one zmm = the 16 canonical lanes
// ============================================================================================

template <Format F>
void f32_avx512(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes((size_t)w.Kp);  // (Kp,)
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (int64_t n = n0; n < n1; ++n) {
        decode_codes(F, w.data + n * w.row_bytes, w.Kp, codes.data());
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


// ============================================================================================
// T1 through vpermi2b (VBMI): one 128-entry byte lookup serves 4 groups of 16 rows
// ============================================================================================
// The AVX2 kernel folds the sign of a group's pattern out of its table (16 entries, one pshufb per
// byte plane, and an XOR); vpermi2b indexes 128 bytes from two zmm, so one lookup covers 4 groups
// (one per 128-bit slot, 32 entries each: the c-sums of every 5-bit code, sign bit included):
// index = code (nibble + 16·sign bit) + 32·slot. A 64-byte load holds
// row-order bytes j..j+3 of the tile's 16 rows; its low and high nibbles are two index vectors
// (groups g = 8(k/2) + 4(s/2) + 2(k%2) + s%2 for index vector k, slot s; kernels_internal.h). The
// sign bit of each group sits in the tile-block's bytes 8 and 9 (broadcast to both halves), bit
// 4(k/2) + (k%2) + 2(s/2): a vptestmb mask adds 16 to those bytes. Per 192 weight-rows: ~4 ops for
// the indices, 2 vpermi2b, 2 unpacks, 2 adds (the AVX2 kernel: ~32).
constexpr int kT1Group = 10;  // blocks per int16 run: 4 lookups of |T| <= 768 per lane per block, 40·768 < 2^15
constexpr int64_t kT1Prefetch = 2048;

// Σ over the 4 slots (128-bit lanes) of 8 int16 lanes each, as int32 (the extract index must be an
// immediate even in unoptimized builds: no loop)
inline __m256i slot_sum(__m512i v) {
    const __m256i a = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm512_extracti32x4_epi32(v, 0)),
                                       _mm256_cvtepi16_epi32(_mm512_extracti32x4_epi32(v, 1)));
    const __m256i b = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm512_extracti32x4_epi32(v, 2)),
                                       _mm256_cvtepi16_epi32(_mm512_extracti32x4_epi32(v, 3)));
    return _mm256_add_epi32(a, b);
}

template <int MB>
inline void t1_vbmi_tile(const uint8_t* tp, int64_t cb, const uint8_t* lut, int64_t lut_stride, bool prefetch,
                         int32_t* acc, int64_t acc_stride) {
    alignas(64) uint8_t slot_b[64], bit_b[4][64];
    for (int j = 0; j < 64; ++j) {
        const int s = j / 16;
        slot_b[j] = uint8_t(32 * s);
        for (int k = 0; k < 4; ++k) bit_b[k][j] = uint8_t(1u << (4 * (k >> 1) + (k & 1) + 2 * (s >> 1)));
    }
    const __m512i slot = load512(slot_b), m4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
    __m512i bit[4];
    for (int k = 0; k < 4; ++k) bit[k] = load512(bit_b[k]);
    __m256i r0[MB], r1[MB];  // int32 sums of rows 0-7 and 8-15
    for (int m = 0; m < MB; ++m) r0[m] = r1[m] = _mm256_setzero_si256();
    for (int64_t b0 = 0; b0 < cb; b0 += kT1Group) {
        __m512i a0[MB], a1[MB];  // int16: slot s (128-bit lane) x rows 0-7, rows 8-15
        for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm512_setzero_si512();
        for (int64_t b = b0; b < std::min<int64_t>(cb, b0 + kT1Group); ++b) {
            const uint8_t* blk = tp + kT1TileBlockBytes * b;
            if (prefetch)
                for (int o = 0; o < kT1TileBlockBytes; o += 64) _mm_prefetch((const char*)blk + kT1Prefetch + o, _MM_HINT_T0);
            const __m512i na = load512(blk), nc = load512(blk + 64);
            const __m512i hb = _mm512_broadcast_i64x4(load256(blk + 128));
            __m512i idx[4] = {_mm512_and_si512(na, m4), _mm512_and_si512(_mm512_srli_epi16(na, 4), m4),
                              _mm512_and_si512(nc, m4), _mm512_and_si512(_mm512_srli_epi16(nc, 4), m4)};
            for (int k = 0; k < 4; ++k) {
                idx[k] = _mm512_or_si512(idx[k], slot);
                idx[k] = _mm512_mask_add_epi8(idx[k], _mm512_test_epi8_mask(hb, bit[k]), idx[k], sixteen);
            }
            for (int m = 0; m < MB; ++m) {
                const uint8_t* tb = lut + m * lut_stride + t1_lut_block_bytes(true) * b;
                for (int k = 0; k < 4; ++k) {
                    const uint8_t* t = tb + 256 * k;
                    const __m512i l = _mm512_permutex2var_epi8(load512(t), idx[k], load512(t + 64));
                    const __m512i h = _mm512_permutex2var_epi8(load512(t + 128), idx[k], load512(t + 192));
                    a0[m] = _mm512_add_epi16(a0[m], _mm512_unpacklo_epi8(l, h));
                    a1[m] = _mm512_add_epi16(a1[m], _mm512_unpackhi_epi8(l, h));
                }
            }
        }
        for (int m = 0; m < MB; ++m) {  // the 4 slots are 4 groups of the same rows
            r0[m] = _mm256_add_epi32(r0[m], slot_sum(a0[m]));
            r1[m] = _mm256_add_epi32(r1[m], slot_sum(a1[m]));
        }
    }
    for (int m = 0; m < MB; ++m) {
        int32_t* o = acc + m * acc_stride;
        _mm256_storeu_si256((__m256i*)o, _mm256_add_epi32(load256(o), r0[m]));
        _mm256_storeu_si256((__m256i*)(o + 8), _mm256_add_epi32(load256(o + 8), r1[m]));
    }
}

void a8_t1_prep_avx512(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch) {
    t1_prep_tables(w, a, scratch, true);
}

void a8_t1_avx512(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                  int64_t n0, int64_t n1) {
    if (!a.lut) return a8_t1_avx2(w, a, wscale, bias, out, n0, n1);  // M > 16: the decoded-tile GEMM
    auto tile = [](int mb, const uint8_t* tp, int64_t cb, const uint8_t* lut, int64_t stride, bool pf, int32_t* acc,
                   int64_t acc_stride) {
        with_rows(mb, [&](auto k) { t1_vbmi_tile<decltype(k)::value>(tp, cb, lut, stride, pf, acc, acc_stride); });
    };
    t1_table_rows(w, a, wscale, bias, out, n0, n1, true, tile);
}

}  // namespace

// T1 looks up its tables with vpermi2b; B1 runs the AVX2 pshufb kernel, and the F32 forms of both
// the AVX2 ones (AVX-512 CPUs have AVX2).
const KernelTable kTableAVX512 = {
    {a8_i2_avx512, a8_t1_avx512, a8_b1_avx2},
    {f32_avx512<Format::I2>, f32_t1_avx2, f32_b1_avx2},
    quantize_avx2,  // AVX-512 CPUs have AVX2; the quantizer is a small part of a matmul
    {a8_i2_prep_avx512, a8_t1_prep_avx512, a8_b1_prep_avx2},
};

}  // namespace bitllm
