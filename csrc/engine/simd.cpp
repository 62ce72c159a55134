// Vector helpers of the engine (see simd.h). Portable bodies use 8 independent partial sums so
// that the compiler can vectorise them without reassociating (no -ffast-math anywhere).
#include "simd.h"

#include <cmath>
#include <cstring>

#include "engine.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BITLLM_X86 1
#endif

namespace bitllm {
namespace engine {

// ============================================================================================
// Portable bodies
// ============================================================================================

static float hsum8(const float* l) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

#if defined(__aarch64__)
using hw_half = __fp16;  // hardware conversion on every ARMv8 core
static inline float h2f(uint16_t h) {
    hw_half v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
#else
static inline float h2f(uint16_t h) { return half_to_float(h); }
#endif

static inline float to_f32(float x) { return x; }
static inline float to_f32(uint16_t h) { return h2f(h); }
static inline float to_f32(int8_t w) { return (float)w; }

// Σ_k q[k]·K[k], K fp32, fp16 or int8 (converted exactly): 8 partial sums, then hsum8 and the tail
template <class T>
static float dot_portable(const float* q, const T* K, int64_t n) {
    float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; ++j) l[j] += q[k + j] * to_f32(K[k + j]);
    float s = hsum8(l);
    for (; k < n; ++k) s += q[k] * to_f32(K[k]);
    return s;
}

static float dot_f32_portable(const float* a, const float* b, int64_t n) { return dot_portable(a, b, n); }

template <class T>
static void dot_rows_portable(const float* q, const T* K, int64_t stride, int64_t n, int64_t hd, float scale, float* out) {
    for (int64_t j = 0; j < n; ++j) out[j] = dot_portable(q, K + j * stride, hd) * scale;
}
static void dot_f32_rows_portable(const float* q, const float* K, int64_t stride, int64_t n, int64_t hd, float scale,
                                  float* out) {
    dot_rows_portable(q, K, stride, n, hd, scale, out);
}
static void dot_f16_rows_portable(const float* q, const uint16_t* K, int64_t stride, int64_t n, int64_t hd, float scale,
                                  float* out) {
    dot_rows_portable(q, K, stride, n, hd, scale, out);
}

static void softmax_inplace_portable(float* x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - mx));
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; ++j) x[j] *= inv;
}

// (products commute exactly: the same bits as w·x)
static float dot_f16_portable(const uint16_t* w, const float* x, int64_t n) { return dot_portable(x, w, n); }
static float dot_i8_portable(const int8_t* w, const float* x, int64_t n) { return dot_portable(x, w, n); }

static void dot4_f16_portable(const uint16_t* w, const float* x, int64_t ldx, int64_t n, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = dot_f16_portable(w, x + i * ldx, n);
}
static void dot4_i8_portable(const int8_t* w, const float* x, int64_t ldx, int64_t n, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = dot_i8_portable(w, x + i * ldx, n);
}

static void rows4_f16_portable(const uint16_t* w, int64_t ldw, const float* x, int64_t n, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = dot_f16_portable(w + i * ldw, x, n);
}
static void rows4_i8_portable(const int8_t* w, int64_t ldw, const float* x, int64_t n, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = dot_i8_portable(w + i * ldw, x, n);
}

static void silu_mul_portable(const float* g, const float* u, float* out, int64_t n) {
    for (int64_t k = 0; k < n; ++k) out[k] = g[k] / (1.0f + std::exp(-g[k])) * u[k];
}

static void axpy_portable(float a, const float* x, float* y, int64_t n) {
    for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

template <class T>
static void weighted_sum_any_portable(const float* p, const T* V, int64_t stride, int64_t n, int64_t hd, float* out) {
    for (int64_t d = 0; d < hd; ++d) out[d] = 0.f;
    for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < hd; ++d) out[d] += p[j] * to_f32(V[j * stride + d]);
}
static void weighted_sum_portable(const float* p, const float* V, int64_t stride, int64_t n, int64_t hd, float* out) {
    weighted_sum_any_portable(p, V, stride, n, hd, out);
}
static void weighted_sum_f16_portable(const float* p, const uint16_t* V, int64_t stride, int64_t n, int64_t hd,
                                      float* out) {
    weighted_sum_any_portable(p, V, stride, n, hd, out);
}

static void f16_to_f32_portable(const uint16_t* w, float* out, int64_t n) {
    for (int64_t k = 0; k < n; ++k) out[k] = h2f(w[k]);
}

static void f32_to_f16_portable(const float* x, uint16_t* out, int64_t n) {
    for (int64_t k = 0; k < n; ++k) out[k] = float_to_half(x[k]);
}

// ============================================================================================
// x86: AVX2 + FMA + F16C twins
// ============================================================================================
#ifdef BITLLM_X86
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))

AVX2_FN static float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

// 8 elements of a cache row as fp32 (fp16: exact F16C conversion)
AVX2_FN static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2_FN static inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

template <class T>
AVX2_FN static float dot_avx2(const float* a, const T* b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), load8(b + k + 8), s1);
    }
    for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), s0);
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; k < n; ++k) s += a[k] * to_f32(b[k]);
    return s;
}
AVX2_FN static float dot_f32_avx2(const float* a, const float* b, int64_t n) { return dot_avx2(a, b, n); }

template <class T>
AVX2_FN static void dot_rows_avx2(const float* q, const T* K, int64_t stride, int64_t n, int64_t hd, float scale,
                                  float* out) {
    const int64_t h8 = hd / 8 * 8;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const T* k0 = K + j * stride;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < h8; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qv, load8(k0 + d), a0);
            a1 = _mm256_fmadd_ps(qv, load8(k0 + stride + d), a1);
            a2 = _mm256_fmadd_ps(qv, load8(k0 + 2 * stride + d), a2);
            a3 = _mm256_fmadd_ps(qv, load8(k0 + 3 * stride + d), a3);
        }
        // (a0, a1, a2, a3) -> their 4 horizontal sums in one vector
        const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
        const __m256 h = _mm256_hadd_ps(h01, h23);  // lanes: [s0 s1 s2 s3 | s0' s1' s2' s3'] (per 128-bit half)
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        float r[4];
        _mm_storeu_ps(r, s);
        for (int i = 0; i < 4; ++i) {
            float t = r[i];
            for (int64_t d = h8; d < hd; ++d) t += q[d] * to_f32(k0[i * stride + d]);
            out[j + i] = t * scale;
        }
    }
    for (; j < n; ++j) out[j] = dot_avx2(q, K + j * stride, hd) * scale;
}
AVX2_FN static void dot_f32_rows_avx2(const float* q, const float* K, int64_t stride, int64_t n, int64_t hd,
                                      float scale, float* out) {
    dot_rows_avx2(q, K, stride, n, hd, scale, out);
}
AVX2_FN static void dot_f16_rows_avx2(const float* q, const uint16_t* K, int64_t stride, int64_t n, int64_t hd,
                                      float scale, float* out) {
    dot_rows_avx2(q, K, stride, n, hd, scale, out);
}

// exp(x) for x <= 0 (softmax arguments): 2^k · e^r with k = round(x·log2 e), r = x − k·ln 2 in two
// parts (Cody-Waite), e^r by its Taylor polynomial to degree 6 (|r| <= ln2/2: error < 2e-7).
AVX2_FN static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below: e^x underflows; the result is ~0 either way
    x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));   // above: it overflows (SiLU of a very negative input)
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

AVX2_FN static void softmax_inplace_avx2(float* x, int64_t n) {
    int64_t j = 0;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, vm);
    float mx = -INFINITY;
    for (float v : lanes) mx = v > mx ? v : mx;
    for (; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
    const __m256 m = _mm256_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
        _mm256_storeu_ps(x + j, e);
        vs = _mm256_add_ps(vs, e);
    }
    float sum = hsum256(vs);
    for (; j < n; ++j) {
        float t[8] = {x[j] - mx, 0, 0, 0, 0, 0, 0, 0};
        _mm256_storeu_ps(t, exp_avx2(_mm256_loadu_ps(t)));
        sum += (x[j] = t[0]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), inv));
    for (; j < n; ++j) x[j] *= 1.0f / sum;
}

// out[k] = g[k] / (1 + e^-g[k]) · u[k] (the SwiGLU gate); IEEE division, exp_avx2's exponential.
AVX2_FN static void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        const __m256 x = _mm256_loadu_ps(g + k);
        const __m256 e = exp_avx2(_mm256_sub_ps(zero, x));
        _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + k)));
    }
    for (; k < n; ++k) {
        float t[8] = {-g[k], 0, 0, 0, 0, 0, 0, 0};
        _mm256_storeu_ps(t, exp_avx2(_mm256_loadu_ps(t)));
        out[k] = g[k] / (1.0f + t[0]) * u[k];
    }
}

// (FMA's product commutes exactly: the same bits as w·x)
AVX2_FN static float dot_f16_avx2(const uint16_t* w, const float* x, int64_t n) { return dot_avx2(x, w, n); }

AVX2_FN static float dot_i8_avx2(const int8_t* w, const float* x, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m128i b = _mm_loadu_si128((const __m128i*)(w + k));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
        s0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), s0);
        s1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), s1);
    }
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; k < n; ++k) s += (float)w[k] * x[k];
    return s;
}

// 4 weight rows (ldw apart) against one x, each row summed in exactly dot_f16_avx2's /
// dot_i8_avx2's order (so bit-identical to 4 calls): 8 independent FMA chains instead of 2, and x
// is loaded once for the 4 rows — the single-sequence LM head was latency-bound on 2 chains.
template <class Load>
AVX2_FN static inline void rows4_avx2(Load wv, const char* ahead, int64_t line_step, const float* x, int64_t n16,
                                      int64_t n8, float* out) {
    __m256 s0[4], s1[4];
    for (int i = 0; i < 4; ++i) s0[i] = s1[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < n16; k += 16, ahead += line_step) {
        _mm_prefetch(ahead, _MM_HINT_T0);
        if (line_step > 64) _mm_prefetch(ahead + 64, _MM_HINT_T0);
        const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        for (int i = 0; i < 4; ++i) {
            s0[i] = _mm256_fmadd_ps(wv(i, k), x0, s0[i]);
            s1[i] = _mm256_fmadd_ps(wv(i, k + 8), x1, s1[i]);
        }
    }
    for (; k < n8; k += 8) {
        const __m256 x0 = _mm256_loadu_ps(x + k);
        for (int i = 0; i < 4; ++i) s0[i] = _mm256_fmadd_ps(wv(i, k), x0, s0[i]);
    }
    for (int i = 0; i < 4; ++i) out[i] = hsum256(_mm256_add_ps(s0[i], s1[i]));
}

AVX2_FN static void rows4_f16_avx2(const uint16_t* w, int64_t ldw, const float* x, int64_t n, float* out) {
    const int64_t n16 = n / 16 * 16, n8 = n / 8 * 8;
    rows4_avx2([w, ldw](int i, int64_t k) AVX2_FN { return load8(w + i * ldw + k); }, (const char*)(w + 8 * ldw), 128,
               x, n16, n8, out);
    for (int i = 0; i < 4; ++i)
        for (int64_t k = n8; k < n; ++k) out[i] += half_to_float(w[i * ldw + k]) * x[k];
}

AVX2_FN static void rows4_i8_avx2(const int8_t* w, int64_t ldw, const float* x, int64_t n, float* out) {
    const int64_t n16 = n / 16 * 16;  // dot_i8_avx2 has no 8-wide tail loop
    rows4_avx2([w, ldw](int i, int64_t k) AVX2_FN {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + i * ldw + k))));
    }, (const char*)(w + 8 * ldw), 64, x, n16, n16, out);
    for (int i = 0; i < 4; ++i)
        for (int64_t k = n16; k < n; ++k) out[i] += (float)w[i * ldw + k] * x[k];
}

// The per-row order of dot_f16_avx2 / dot_i8_avx2 (s0: k mod 16 < 8, s1: the rest, then the tail),
// for 4 rows at once.
template <class Load>
AVX2_FN static inline void dot4_avx2(Load wv, const float* x, int64_t ldx, int64_t n, int64_t n16, int64_t n8,
                                     float* out) {
    __m256 s0[4], s1[4];
    for (int i = 0; i < 4; ++i) s0[i] = s1[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < n16; k += 16) {
        const __m256 w0 = wv(k), w1 = wv(k + 8);
        for (int i = 0; i < 4; ++i) {
            s0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * ldx + k), s0[i]);
            s1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * ldx + k + 8), s1[i]);
        }
    }
    for (; k < n8; k += 8) {
        const __m256 w0 = wv(k);
        for (int i = 0; i < 4; ++i) s0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * ldx + k), s0[i]);
    }
    for (int i = 0; i < 4; ++i) out[i] = hsum256(_mm256_add_ps(s0[i], s1[i]));
}

AVX2_FN static void dot4_f16_avx2(const uint16_t* w, const float* x, int64_t ldx, int64_t n, float* out) {
    const int64_t n16 = n / 16 * 16, n8 = n / 8 * 8;
    dot4_avx2([w](int64_t k) AVX2_FN { return load8(w + k); }, x, ldx, n, n16, n8, out);
    for (int64_t k = n8; k < n; ++k)
        for (int i = 0; i < 4; ++i) out[i] += half_to_float(w[k]) * x[i * ldx + k];
}

AVX2_FN static void dot4_i8_avx2(const int8_t* w, const float* x, int64_t ldx, int64_t n, float* out) {
    // dot_i8_avx2 has no 8-wide tail loop: n8 = n16
    const int64_t n16 = n / 16 * 16;
    dot4_avx2([w](int64_t k) AVX2_FN {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k))));
    }, x, ldx, n, n16, n16, out);
    for (int64_t k = n16; k < n; ++k)
        for (int i = 0; i < 4; ++i) out[i] += (float)w[k] * x[i * ldx + k];
}

AVX2_FN static void axpy_avx2(float a, const float* x, float* y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
    for (; k < n; ++k) y[k] += a * x[k];
}

// Accumulators stay in registers: 64 output dims (8 vectors) at a time over every key.
template <class T>
AVX2_FN static void weighted_sum_any_avx2(const float* p, const T* V, int64_t stride, int64_t n, int64_t hd, float* out) {
    int64_t c = 0;
    for (; c + 64 <= hd; c += 64) {
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const T* v = V + j * stride + c;
            for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(pj, load8(v + 8 * i), a[i]);
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + c + 8 * i, a[i]);
    }
    for (; c + 32 <= hd; c += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < n; ++j) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const T* v = V + j * stride + c;
            a0 = _mm256_fmadd_ps(pj, load8(v), a0);
            a1 = _mm256_fmadd_ps(pj, load8(v + 8), a1);
            a2 = _mm256_fmadd_ps(pj, load8(v + 16), a2);
            a3 = _mm256_fmadd_ps(pj, load8(v + 24), a3);
        }
        _mm256_storeu_ps(out + c, a0);
        _mm256_storeu_ps(out + c + 8, a1);
        _mm256_storeu_ps(out + c + 16, a2);
        _mm256_storeu_ps(out + c + 24, a3);
    }
    for (; c + 8 <= hd; c += 8) {
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; ++j) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(V + j * stride + c), a0);
        _mm256_storeu_ps(out + c, a0);
    }
    for (; c < hd; ++c) {
        float a = 0.f;
        for (int64_t j = 0; j < n; ++j) a += p[j] * to_f32(V[j * stride + c]);
        out[c] = a;
    }
}
AVX2_FN static void weighted_sum_avx2(const float* p, const float* V, int64_t stride, int64_t n, int64_t hd, float* out) {
    weighted_sum_any_avx2(p, V, stride, n, hd, out);
}
AVX2_FN static void weighted_sum_f16_avx2(const float* p, const uint16_t* V, int64_t stride, int64_t n, int64_t hd,
                                          float* out) {
    weighted_sum_any_avx2(p, V, stride, n, hd, out);
}

AVX2_FN static void f16_to_f32_avx2(const uint16_t* w, float* out, int64_t n) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(out + k, load8(w + k));
    for (; k < n; ++k) out[k] = half_to_float(w[k]);
}

// F16C rounds to nearest even like float_to_half (a NaN stays a NaN; its payload may differ)
AVX2_FN static void f32_to_f16_avx2(const float* x, uint16_t* out, int64_t n) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm_storeu_si128((__m128i*)(out + k), _mm256_cvtps_ph(_mm256_loadu_ps(x + k), _MM_FROUND_TO_NEAREST_INT));
    for (; k < n; ++k) out[k] = float_to_half(x[k]);
}

static bool has_avx2() {
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
    return ok;
}
#endif

// ============================================================================================
// Dispatch (decided once, by the CPU)
// ============================================================================================
#ifdef BITLLM_X86
#define DISPATCH(fn, ...) return has_avx2() ? fn##_avx2(__VA_ARGS__) : fn##_portable(__VA_ARGS__)
#else
#define DISPATCH(fn, ...) return fn##_portable(__VA_ARGS__)
#endif

float dot_f32(const float* a, const float* b, int64_t n) { DISPATCH(dot_f32, a, b, n); }
float dot_f16(const uint16_t* w, const float* x, int64_t n) { DISPATCH(dot_f16, w, x, n); }
void dot_f32_rows(const float* q, const float* K, int64_t stride, int64_t n, int64_t hd, float scale, float* out) {
    DISPATCH(dot_f32_rows, q, K, stride, n, hd, scale, out);
}
float dot_i8(const int8_t* w, const float* x, int64_t n) { DISPATCH(dot_i8, w, x, n); }
void dot4_f16(const uint16_t* w, const float* x, int64_t ldx, int64_t n, float* out) { DISPATCH(dot4_f16, w, x, ldx, n, out); }
void dot4_i8(const int8_t* w, const float* x, int64_t ldx, int64_t n, float* out) { DISPATCH(dot4_i8, w, x, ldx, n, out); }
void rows4_f16(const uint16_t* w, int64_t ldw, const float* x, int64_t n, float* out) {
    DISPATCH(rows4_f16, w, ldw, x, n, out);
}
void rows4_i8(const int8_t* w, int64_t ldw, const float* x, int64_t n, float* out) { DISPATCH(rows4_i8, w, ldw, x, n, out); }
void silu_mul(const float* g, const float* u, float* out, int64_t n) { DISPATCH(silu_mul, g, u, out, n); }
void axpy(float a, const float* x, float* y, int64_t n) { DISPATCH(axpy, a, x, y, n); }
void softmax_inplace(float* x, int64_t n) { DISPATCH(softmax_inplace, x, n); }
void f16_to_f32(const uint16_t* w, float* out, int64_t n) { DISPATCH(f16_to_f32, w, out, n); }
void f32_to_f16(const float* x, uint16_t* out, int64_t n) { DISPATCH(f32_to_f16, x, out, n); }
void weighted_sum(const float* p, const float* V, int64_t stride, int64_t n, int64_t hd, float* out) {
    DISPATCH(weighted_sum, p, V, stride, n, hd, out);
}
void weighted_sum_f16(const float* p, const uint16_t* V, int64_t stride, int64_t n, int64_t hd, float* out) {
    DISPATCH(weighted_sum_f16, p, V, stride, n, hd, out);
}
void dot_f16_rows(const float* q, const uint16_t* K, int64_t stride, int64_t n, int64_t hd, float scale, float* out) {
    DISPATCH(dot_f16_rows, q, K, stride, n, hd, scale, out);
}

const char* simd_name() {
#ifdef BITLLM_X86
    return has_avx2() ? "avx2+fma+f16c" : "portable";
#elif defined(__aarch64__)
    return "neon (compiler)";
#else
    return "portable";
#endif
}

}  // namespace engine
}  // namespace bitllm
