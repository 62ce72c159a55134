// Arm NEON kernels, shared body of kernels_neon.cpp (plain Armv8-A Advanced SIMD) and
// kernels_neon_dotprod.cpp (Armv8.2-A dotprod, compiled with +dotprod). Bit-exact twins of generic.
// The including file defines BITLLM_NEON_TABLE and, for the dotprod build, BITLLM_NEON_DOTPROD.
#include <arm_neon.h>

#include <cstring>
#include <vector>

#include "kernels_internal.h"

namespace bitllm {
namespace {

// ============================================================================================
// Decode one row into codes w+1 (B1: 2 - 2c)
// ============================================================================================

void decode_codes(Format f, const uint8_t* row, int64_t Kp, uint8_t* codes) {
    switch (f) {
        case Format::I2:
            for (int64_t b = 0; b < Kp / kI2Weights; ++b)
                for (int h = 0; h < 2; ++h) {
                    const uint8x16_t v = vld1q_u8(row + 32 * b + 16 * h);
                    for (int i = 0; i < 4; ++i) {
                        const uint8x16_t c = vandq_u8(vshlq_u8(v, vdupq_n_s8((int8_t)(-2 * i))), vdupq_n_u8(3));
                        vst1q_u8(codes + kI2Weights * b + 32 * i + 16 * h, c);
                    }
                }
            break;
        case Format::T1: {
            // Per 48-column block: the 16 group codes x = nibble | sign bit << 4 (t1_code's bytes and
            // shifts, gathered with tbl), the 3 base-3 digits of their patterns by 32-entry tbl lookups
            // (every 5-bit code, as decode_row_codes_generic: kT1Digits), and one 3-way interleaving store:
            // digit j of group g is column 3g + j.
            static const uint8_t kNibByte[16] = {0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7};
            static const int8_t kNibShift[16] = {0, 0, -4, -4, 0, 0, -4, -4, 0, 0, -4, -4, 0, 0, -4, -4};
            static const uint8_t kHiByte[16] = {8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9};
            static const uint8_t kHiBit[16] = {1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128};
            const uint8x16_t nib_byte = vld1q_u8(kNibByte), hi_byte = vld1q_u8(kHiByte), hi_bit = vld1q_u8(kHiBit);
            const int8x16_t nib_shift = vld1q_s8(kNibShift);
            uint8x16x2_t dt[3];
            for (int j = 0; j < 3; ++j) dt[j] = {{vld1q_u8(kT1Digits.d[j]), vld1q_u8(kT1Digits.d[j] + 16)}};
            const int64_t nb = Kp / kT1Weights, row_bytes = nb * (int64_t)sizeof(BlockT1);
            for (int64_t b = 0; b < nb; ++b) {
                const int64_t at = (int64_t)sizeof(BlockT1) * b;
                uint8_t tail[16] = {0};
                const uint8_t* blk = row + at;
                if (at + 16 > row_bytes) blk = static_cast<const uint8_t*>(std::memcpy(tail, row + at, sizeof(BlockT1)));
                const uint8x16_t v = vld1q_u8(blk);
                const uint8x16_t nib = vandq_u8(vshlq_u8(vqtbl1q_u8(v, nib_byte), nib_shift), vdupq_n_u8(15));
                const uint8x16_t hi = vandq_u8(vtstq_u8(vqtbl1q_u8(v, hi_byte), hi_bit), vdupq_n_u8(16));
                const uint8x16_t code = vorrq_u8(nib, hi);
                uint8x16x3_t d;
                d.val[0] = vqtbl2q_u8(dt[0], code);
                d.val[1] = vqtbl2q_u8(dt[1], code);
                d.val[2] = vqtbl2q_u8(dt[2], code);
                vst3q_u8(codes + kT1Weights * b, d);
            }
            break;
        }
        case Format::B1: {
            // 16 codes from 2 bytes: each byte copied to 8 lanes, lane i tests bit i (code 0 if set, else 2)
            static const uint8_t kRep[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
            static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
            const uint8x16_t rep = vld1q_u8(kRep), bit = vld1q_u8(kBit), two = vdupq_n_u8(2);
            for (int64_t p = 0; p < Kp / 8; p += 16) {
                const uint8x16_t v = vld1q_u8(row + p);
                for (int h = 0; h < 8; ++h) {
                    const uint8x16_t r = vqtbl1q_u8(v, vaddq_u8(rep, vdupq_n_u8((uint8_t)(2 * h))));
                    vst1q_u8(codes + 8 * p + 16 * h, vbicq_u8(two, vtstq_u8(r, bit)));
                }
            }
            break;
        }
    }
}

// Σ codes·q over Kp (multiple of 32). Codes are 0..2, so they are valid signed bytes too.
inline int32_t dot_codes(const uint8_t* c, const int8_t* q, int64_t Kp) {
#if defined(BITLLM_NEON_DOTPROD)
    int32x4_t acc0 = vdupq_n_s32(0), acc1 = vdupq_n_s32(0);
    for (int64_t k = 0; k < Kp; k += 32) {
        acc0 = vdotq_s32(acc0, vreinterpretq_s8_u8(vld1q_u8(c + k)), vld1q_s8(q + k));
        acc1 = vdotq_s32(acc1, vreinterpretq_s8_u8(vld1q_u8(c + k + 16)), vld1q_s8(q + k + 16));
    }
    return vaddvq_s32(vaddq_s32(acc0, acc1));
#else
    // int16 products are at most 2·128 = 256; two of them summed stay far inside int16.
    int32x4_t acc = vdupq_n_s32(0);
    for (int64_t k = 0; k < Kp; k += 16) {
        const int8x16_t cv = vreinterpretq_s8_u8(vld1q_u8(c + k));
        const int8x16_t qv = vld1q_s8(q + k);
        int16x8_t p = vmull_s8(vget_low_s8(cv), vget_low_s8(qv));
        p = vmlal_high_s8(p, cv, qv);
        acc = vpadalq_s16(acc, p);
    }
    return vaddvq_s32(acc);
#endif
}

// ============================================================================================
// A8 and F32
// ============================================================================================

template <Format F>
void a8_neon(const PackedView& w, const A8Acts& a, const float* wscale, const float* bias, float* out,
             int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes((size_t)w.Kp), buf((size_t)w.row_bytes);  // one decoded row, reused for every m
    for (int64_t n = n0; n < n1; ++n) {
        decode_codes(F, row_of(w, n, buf.data()), w.Kp, codes.data());
        for (int64_t m = 0; m < a.M; ++m) {
            const int32_t s = dot_codes(codes.data(), a.q + m * a.ldq, w.Kp) - a.qsum[m];
            out[m * w.N + n] = a8_epilogue(s, a.xscale[m], wscale[n], bias, n);
        }
    }
}

inline float32x4_t signed_select(uint8x8_t c4x2, int half, float32x4_t x) {
    // 4 codes -> +x (2), -x (0), +0.0f (1), by masking and flipping the sign bit.
    const uint16x8_t c16 = vmovl_u8(c4x2);
    const uint32x4_t c = half ? vmovl_high_u16(c16) : vmovl_u16(vget_low_u16(c16));
    const uint32x4_t zero_w = vceqq_u32(c, vdupq_n_u32(1));
    const uint32x4_t neg = vshlq_n_u32(vceqq_u32(c, vdupq_n_u32(0)), 31);
    return vreinterpretq_f32_u32(veorq_u32(vbicq_u32(vreinterpretq_u32_f32(x), zero_w), neg));
}

template <Format F>
void f32_neon(const PackedView& w, const F32Acts& a, const float* wscale, const float* bias, float* out,
              int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes((size_t)w.Kp), buf((size_t)w.row_bytes);  // one row: codes, bytes
    for (int64_t n = n0; n < n1; ++n) {
        decode_codes(F, row_of(w, n, buf.data()), w.Kp, codes.data());
        for (int64_t m = 0; m < a.M; ++m) {
            const float* x = a.x + m * a.ldx;
            // The 16 canonical lanes: l0 = k%16 in 0..3, l1 = 4..7, l2 = 8..11, l3 = 12..15.
            float32x4_t l0 = vdupq_n_f32(0.0f), l1 = l0, l2 = l0, l3 = l0;
            for (int64_t k = 0; k < w.Kp; k += 16) {
                const uint8x16_t c = vld1q_u8(codes.data() + k);
                l0 = vaddq_f32(l0, signed_select(vget_low_u8(c), 0, vld1q_f32(x + k)));
                l1 = vaddq_f32(l1, signed_select(vget_low_u8(c), 1, vld1q_f32(x + k + 4)));
                l2 = vaddq_f32(l2, signed_select(vget_high_u8(c), 0, vld1q_f32(x + k + 8)));
                l3 = vaddq_f32(l3, signed_select(vget_high_u8(c), 1, vld1q_f32(x + k + 12)));
            }
            const float32x4_t s4 = vaddq_f32(vaddq_f32(l0, l2), vaddq_f32(l1, l3));  // l[j]+l[j+8], then +l[j+4]
            const float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
            const float acc = vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
            out[m * w.N + n] = f32_epilogue(acc, wscale[n], bias, n);
        }
    }
}

}  // namespace

const KernelTable BITLLM_NEON_TABLE = {
    {a8_neon<Format::I2>, a8_neon<Format::T1>, a8_neon<Format::B1>},
    {f32_neon<Format::I2>, f32_neon<Format::T1>, f32_neon<Format::B1>},
    nullptr,
};

}  // namespace bitllm
