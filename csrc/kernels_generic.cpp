// Scalar reference kernels (`generic`): the twin every SIMD variant must match bit for bit.
// Compiled with -ffp-contract=off (CMakeLists.txt) so that no FMA changes the fp32 rounding.
#include <vector>

#include "kernels_internal.h"

namespace bitllm {

// ============================================================================================
// Decode one row into codes w+1
// ============================================================================================

void decode_row_codes_generic(Format f, const uint8_t* row, int64_t Kp, uint8_t* codes) {
    switch (f) {
        case Format::I2:
            for (int64_t b = 0; b < Kp / kI2Weights; ++b) {
                const uint8_t* qs = row + 32 * b;
                uint8_t* c = codes + kI2Weights * b;
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 32; ++j) c[32 * i + j] = (qs[j] >> (2 * i)) & 3;
            }
            break;
        case Format::T1:
            for (int64_t b = 0; b < Kp / kT1Weights; ++b) {
                const uint8_t* blk = row + (int64_t)sizeof(BlockT1) * b;
                uint8_t* c = codes + kT1Weights * b;
                for (int g = 0; g < 16; ++g) {
                    const int x = t1_code(blk, g);  // digits of the pattern t1_value(x)
                    c[3 * g] = kT1Digits.d[0][x], c[3 * g + 1] = kT1Digits.d[1][x], c[3 * g + 2] = kT1Digits.d[2][x];
                }
            }
            break;
        case Format::B1:
            for (int64_t p = 0; p < Kp / 8; ++p)
                for (int i = 0; i < 8; ++i) codes[8 * p + i] = ((row[p] >> i) & 1) ? 0 : 2;
            break;
    }
}

// ============================================================================================
// A8: acc = Σ (code-1)·q = Σ code·q − Σ q, in int32 (exact: |acc| <= 2·128·Kp)
// ============================================================================================

static void a8_generic(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias,
                       float* out, int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes((size_t)w.Kp), buf((size_t)w.row_bytes);  // one row: codes, bytes
    for (int64_t n = n0; n < n1; ++n) {
        decode_row_codes_generic(w.fmt, row_of(w, n, buf.data()), w.Kp, codes.data());
        for (int64_t m = 0; m < a.M; ++m) {
            const int8_t* q = a.q + m * a.ldq;
            int32_t s = 0;
            for (int64_t k = 0; k < w.Kp; ++k) s += int32_t(codes[k]) * int32_t(q[k]);
            out[m * w.N + n] = a8_epilogue(s - a.qsum[m], a.xscale[m], wscale[n], bias, n);
        }
    }
}

// ============================================================================================
// F32: the canonical 16-lane order, multiplication-free (add x, subtract x, or add +0)
// ============================================================================================

static void f32_generic(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias,
                        float* out, int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes((size_t)w.Kp), buf((size_t)w.row_bytes);  // one row: codes, bytes
    for (int64_t n = n0; n < n1; ++n) {
        decode_row_codes_generic(w.fmt, row_of(w, n, buf.data()), w.Kp, codes.data());
        for (int64_t m = 0; m < a.M; ++m) {
            const float* x = a.x + m * a.ldx;
            float lane[16];
            for (int j = 0; j < 16; ++j) lane[j] = 0.0f;
            for (int64_t k = 0; k < w.Kp; ++k) {
                const float v = codes[k] == 2 ? x[k] : codes[k] == 0 ? -x[k] : 0.0f;
                lane[k & 15] = lane[k & 15] + v;
            }
            out[m * w.N + n] = f32_epilogue(f32_tree16(lane), wscale[n], bias, n);
        }
    }
}

const KernelTable kTableGeneric = {
    {a8_generic, a8_generic, a8_generic},
    {f32_generic, f32_generic, f32_generic},
    quantize_generic,
};

}  // namespace bitllm
