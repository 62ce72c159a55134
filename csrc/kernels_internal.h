// Internal to the kernel files: block structs of each layout, the per-ISA kernel table, and the
// scalar layout maps shared by packing and the generic kernels. Not part of the public API.
#pragma once

#include <cstdint>
#include <cstring>
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

// T1: 160 ternary weights in 32 bytes = 1.6 bits/weight (5 trits per byte).
// Byte j holds the 5 codes t_n = w+1 ∈ {0,1,2} (n = 0..4) of weights k = 32*n + t1_pos(j), stored
// as b = ceil(v * 256 / 243) with v = Σ_n t_n * 3^(4-n) (t_0 most significant). Digit n is
// recovered multiplication-mod-256 style: t_n = (((b * 3^n) mod 256) * 3) >> 8.
// t1_pos interleaves even and odd bytes per 16-byte half (what AVX2 packus_epi16 produces):
// j = 16h + r  ->  p = 16h + r/2 (r even), 16h + 8 + r/2 (r odd).
struct BlockT1 {
    uint8_t qs[32];
};
static_assert(sizeof(BlockT1) == 32, "T1 block: 160 weights, 1.6 bits each");
constexpr int kT1Weights = 160;

// B1: 256 binary weights in 32 bytes = 1.0 bit/weight, rows interleaved in tiles of 16.
// Byte p of a row, bit i holds c = 1 if w = -1 (0 if w = +1) for weight k = 8*p + i (the file
// layout's order). Rows are not stored one after another: the rows 16t..16t+15 form a tile of
// 16*row_bytes bytes in which byte p of row 16t+r sits at 16*p + r, so one 32-byte load holds bytes
// p and p+1 of 16 rows — the shape a pshufb table lookup wants (kernels_avx2.cpp, "B1 LUT"). The
// last tile is padded with zero rows (never written out).
struct BlockB1 {
    uint8_t qs[32];
};
static_assert(sizeof(BlockB1) == 32, "B1 block: 256 weights, 1 bit each");
constexpr int kB1Weights = 256;
constexpr int64_t kTileRows = 16;  // rows per tile of the tiled formats (B1)

inline bool is_tiled(Format f) { return f == Format::B1; }
// Rows the packed matrix holds: N, or N rounded up to whole tiles.
inline int64_t stored_rows(Format f, int64_t N) {
    return is_tiled(f) ? (N + kTileRows - 1) / kTileRows * kTileRows : N;
}

inline int t1_pos(int j) {
    const int h = j >> 4, r = j & 15;
    return 16 * h + ((r & 1) ? 8 + (r >> 1) : (r >> 1));
}

inline int t1_digit(uint8_t b, int n) {
    static const int pow3[5] = {1, 3, 9, 27, 81};
    const uint32_t a = (uint32_t(b) * uint32_t(pow3[n])) & 0xFFu;
    return int((a * 3u) >> 8);
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
    const uint8_t* lut = nullptr;  // what the table's a8_prep built from q (shared by the row threads)
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

// Optional, run once per gemm_a8 call before the row threads start (LUT kernels build their
// activation tables here, into `scratch`, and point a.lut at them).
using A8PrepFn = void (*)(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch);

struct KernelTable {
    A8Fn a8[kNumFormats];
    F32Fn f32[kNumFormats];
    QuantFn quantize;  // the pinned activation quantizer (nullptr: the scalar one)
    A8PrepFn a8_prep[kNumFormats] = {nullptr, nullptr, nullptr};
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

// Row n's row_bytes bytes in row order: a pointer into the matrix for the row-major formats, or
// `buf` (row_bytes long) gathered from the row's tile for the tiled ones.
inline const uint8_t* row_of(const PackedView& w, int64_t n, uint8_t* buf) {
    if (!is_tiled(w.fmt)) return w.data + n * w.row_bytes;
    const uint8_t* t = w.data + (n / kTileRows) * kTileRows * w.row_bytes + (n % kTileRows);
    for (int64_t p = 0; p < w.row_bytes; ++p) buf[p] = t[kTileRows * p];
    return buf;
}

#if defined(__x86_64__) || defined(_M_X64)
// B1 through pshufb tables (kernels_avx2.cpp): the AVX-512 table uses them too.
void a8_b1_prep_avx2(const PackedView& w, A8Acts& a, std::vector<uint8_t>& scratch);
void a8_b1_avx2(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
                int64_t n0, int64_t n1);
void f32_b1_avx2(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
                 int64_t n0, int64_t n1);
#endif

}  // namespace bitllm
