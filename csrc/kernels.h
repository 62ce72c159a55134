// bitllm native kernels: the public C++ API (no Python, no torch; raw pointers only).
//
// A future C++ inference engine includes this header and links the kernel objects. The nanobind
// module (csrc/module.cpp) is a thin shell over exactly these functions.
//
// Semantics (pinned, DESIGN.md §2; every ISA variant is bit-exact with the scalar `generic` one):
//   quantize_activations: per row, s = 127 / max(max|x|, 1e-5) (fp32), q = clamp(rint(x*s), -128, 127)
//                         where 127 / m is evaluated as torch does it: (1.0f / m) * 127.0f
//   gemm_a8:  acc[m,n] = Σ_k W[n,k]·q[m,k] (int32, exact);
//             out[m,n] = ((float)acc / xscale[m]) * wscale[n] + bias[n]   (this op order, no FMA)
//   gemm_f32: acc[m,n] = Σ_k W[n,k]·x[m,k] without multiplications, in the canonical order below;
//             out[m,n] = acc * wscale[n] + bias[n]                        (no FMA)
//   Canonical fp32 summation order (all variants): 16 partial sums, lane j accumulates
//   k ≡ j (mod 16) in increasing k, each step adding +x (w=+1), -x (w=-1) or +0.0f (w=0), starting
//   from +0.0f; then the fixed tree l[j] += l[j+8] (j<8), l[j] += l[j+4] (j<4), l[j] += l[j+2]
//   (j<2), l[0] += l[1].
//
// Formats (in-memory kernel layouts; byte-level spec in docs/formats.md, "Native kernels"):
//   I2: ternary, 2 bits/weight (blocks of 128 weights in 32 bytes), rows one after another
//   T1: ternary, 1.67 bits/weight (blocks of 48 weights in 10 bytes: a nibble and a sign bit per
//       3 weights), rows interleaved in tiles of 16, tile-blocks grouped in K chunks of 768, then
//       one int32 per stored row: the row's count of set sign bits
//   B1: binary ±1, 1 bit/weight (blocks of 256 weights in 32 bytes), rows interleaved in tiles of 64,
//       tile-blocks grouped in K chunks of 1024
// Rows are padded to whole blocks; packed_bytes() is the size of the whole matrix.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace bitllm {

enum class Format : int { I2 = 0, T1 = 1, B1 = 2 };
constexpr int kNumFormats = 3;

// Kernel variants. `Best` means: the variant picked once at start-up (or forced by BITLLM_ISA).
enum class Isa : int { Generic = 0, AVX2 = 1, AVX512 = 2, NEON = 3, NEON_DOTPROD = 4, Best = -1 };
constexpr int kNumIsas = 5;

const char* format_name(Format f);
const char* isa_name(Isa isa);  // "generic", "avx2", "avx512", "neon", "neon_dotprod"
bool parse_isa(const char* name, Isa* out);
bool parse_format(const char* name, Format* out);  // "i2", "t1", "b1" (case-insensitive)

// Variants compiled into this build AND supported by the running CPU.
bool isa_supported(Isa isa);
// Variants compiled into this build (whether or not this CPU runs them).
bool isa_compiled(Isa isa);
// The variant used for Isa::Best. Throws std::runtime_error at first use if BITLLM_ISA names an
// unknown variant or one this CPU cannot run.
Isa active_isa();

// ---- threads (over output rows) ----
void set_num_threads(int n);  // n >= 1
int get_num_threads();
// Runs fn(ctx, begin, end, tid) over [0, n) in dynamically claimed chunks of at least `grain`
// items on the kernel thread pool (the caller works too, as tid 0; tid < get_num_threads()).
// Everything native (kernels and engine) uses this one pool, so threads never oversubscribe the
// cores. Called from inside a chunk it runs inline; a second thread calling while the pool is
// busy runs its work alone rather than waiting.
void parallel_for(int64_t n, int64_t grain, void (*fn)(void* ctx, int64_t begin, int64_t end, int tid),
                  void* ctx);
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
    using Fn = typename std::remove_reference<F>::type;
    parallel_for(
        n, grain, [](void* c, int64_t b, int64_t e, int tid) { (*static_cast<Fn*>(c))(b, e, tid); },
        const_cast<void*>(static_cast<const void*>(&f)));
}

// ---- packing ----
// Weights per block and bytes per block of each format's kernel layout.
int64_t block_weights(Format f);
int64_t block_bytes(Format f);
int64_t padded_k(Format f, int64_t K);      // K rounded up to whole blocks
int64_t row_bytes(Format f, int64_t K);     // bytes per output row
int64_t packed_bytes(Format f, int64_t N, int64_t K);
// Checks the alphabet: {-1,0,1} (I2, T1) or {-1,1} (B1). Returns the index of the first bad value,
// or -1 when all are valid.
int64_t find_invalid_weight(Format f, const int8_t* w, int64_t count);
// w: (N, K) int8 row-major, values already validated; out: packed_bytes(f, N, K) bytes.
void pack(Format f, const int8_t* w, int64_t N, int64_t K, uint8_t* out);
// Inverse of pack: out (N, K) int8.
void unpack(Format f, const uint8_t* packed, int64_t N, int64_t K, int8_t* out);

// ---- activations ----
// x: (M, K) fp32 with row stride ldx; q: (M, ldq) int8, ldq >= K; positions K..ldq-1 are zeroed
// (so q can be handed to gemm_a8 as padded activations); scale: (M,); sums: (M,) = Σ_k q[m,k].
void quantize_activations(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                          float* scale, int32_t* sums, Isa isa = Isa::Best);

// ---- matmuls ----
// packed: pack()'s output for (N, K). q: (M, K) int8 rows with stride ldq >= K (if ldq >=
// padded_k(f, K) and the padding is zero, no copy is made). xscale/qsum: (M,). wscale: (N,).
// bias: (N,) or nullptr. out: (M, N) fp32, row-major. Threads over N; isa=Best uses active_isa().
void gemm_a8(Format f, const uint8_t* packed, int64_t N, int64_t K, const int8_t* q, int64_t ldq,
             const float* xscale, const int32_t* qsum, int64_t M, const float* wscale,
             const float* bias, float* out, Isa isa = Isa::Best);
// x: (M, K) fp32 rows with stride ldx >= K.
void gemm_f32(Format f, const uint8_t* packed, int64_t N, int64_t K, const float* x, int64_t ldx,
              int64_t M, const float* wscale, const float* bias, float* out, Isa isa = Isa::Best);

// ---- measurement helpers ----
// Best-of-`reps` read-only streaming bandwidth in bytes/s over `bytes` bytes with `threads` threads.
double stream_read_bandwidth(size_t bytes, int threads, int reps);
// CPU model string (from /proc/cpuinfo), or "unknown".
const char* cpu_model();

}  // namespace bitllm
