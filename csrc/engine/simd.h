// Small vector helpers for the engine's own fp32 work (LM head, attention). Each has a portable
// body; x86 builds add an AVX2+FMA+F16C twin picked once at run time, AArch64 uses NEON through
// the compiler. None of them is on the bit-exact kernel path (csrc/kernels.h owns that).
#pragma once

#include <cstdint>

namespace bitllm {
namespace engine {

// Σ_k a[k]·b[k]
float dot_f32(const float* a, const float* b, int64_t n);
// out[j] = scale · Σ_k q[k]·K[j·stride + k] for j < n (attention scores of one query against n
// cached keys): 4 keys at a time with independent FMA chains and one transposing reduction.
void dot_f32_rows(const float* q, const float* K, int64_t stride, int64_t n, int64_t hd, float scale, float* out);
// The same over an fp16 cache: bit-identical to dot_f32_rows on the keys converted to fp32.
void dot_f16_rows(const float* q, const uint16_t* K, int64_t stride, int64_t n, int64_t hd, float scale, float* out);
// Σ_k half(w[k])·x[k]
float dot_f16(const uint16_t* w, const float* x, int64_t n);
// Σ_k w[k]·x[k], w int8
float dot_i8(const int8_t* w, const float* x, int64_t n);
// out[i] = dot_f16(w, x + i·ldx, n) / dot_i8(w, x + i·ldx, n) for i < 4, bit-identical to four
// calls (same per-row summation order) but each weight vector is converted once for the 4 rows
// and 8 independent FMA chains keep both FMA pipes busy: the batched LM head.
void dot4_f16(const uint16_t* w, const float* x, int64_t ldx, int64_t n, float* out);
void dot4_i8(const int8_t* w, const float* x, int64_t ldx, int64_t n, float* out);
// out[i] = dot_f16(w + i·ldw, x, n) / dot_i8(w + i·ldw, x, n) for i < 4, bit-identical to four
// calls: 4 head rows against one activation row (the single-sequence LM head), x loaded once.
void rows4_f16(const uint16_t* w, int64_t ldw, const float* x, int64_t n, float* out);
void rows4_i8(const int8_t* w, int64_t ldw, const float* x, int64_t n, float* out);
// x[j] = exp(x[j] - max x) / Σ exp(...) in place (attention probabilities). The AVX2 twin uses
// a degree-6 polynomial exp (relative error ~2e-7, as good as fp32 needs), not libm's expf.
void softmax_inplace(float* x, int64_t n);
// out[k] = silu(g[k])·u[k] = g[k] / (1 + e^-g[k]) · u[k] (out may alias g or u). The AVX2 twin
// uses softmax's polynomial exp.
void silu_mul(const float* g, const float* u, float* out, int64_t n);
// y[k] += a·x[k]
void axpy(float a, const float* x, float* y, int64_t n);
// out[d] = Σ_j p[j]·V[j·stride + d] for d < hd (attention's weighted sum of values)
void weighted_sum(const float* p, const float* V, int64_t stride, int64_t n, int64_t hd, float* out);
// The same over an fp16 cache: bit-identical to weighted_sum on the values converted to fp32.
void weighted_sum_f16(const float* p, const uint16_t* V, int64_t stride, int64_t n, int64_t hd, float* out);
// out[k] = half(w[k]) (an embedding row)
void f16_to_f32(const uint16_t* w, float* out, int64_t n);
// out[k] = float_to_half(x[k]) (round to nearest even; the fp16 KV cache), the same bits on every path
void f32_to_f16(const float* x, uint16_t* out, int64_t n);
// "avx2+fma+f16c" or "portable": which of the above runs.
const char* simd_name();

}  // namespace engine
}  // namespace bitllm
