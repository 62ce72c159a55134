// Kernel front door: CPU probe + ISA table (picked once), packing, the activation quantizer,
// threading over output rows, and the bandwidth probe. The per-ISA math lives in kernels_<isa>.cpp.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "kernels_internal.h"

namespace bitllm {

// ============================================================================================
// Names
// ============================================================================================

static const char* const kIsaNames[kNumIsas] = {"generic", "avx2", "avx512", "neon", "neon_dotprod"};
static const char* const kFormatNames[kNumFormats] = {"i2", "t1", "b1"};

const char* format_name(Format f) { return kFormatNames[int(f)]; }
const char* isa_name(Isa isa) { return isa == Isa::Best ? isa_name(active_isa()) : kIsaNames[int(isa)]; }

static std::string lower(const char* s) {
    std::string r(s);
    for (auto& c : r) c = (char)std::tolower((unsigned char)c);
    return r;
}
bool parse_isa(const char* name, Isa* out) {
    const std::string s = lower(name);
    for (int i = 0; i < kNumIsas; ++i)
        if (s == kIsaNames[i]) { *out = Isa(i); return true; }
    return false;
}
bool parse_format(const char* name, Format* out) {
    const std::string s = lower(name);
    for (int i = 0; i < kNumFormats; ++i)
        if (s == kFormatNames[i]) { *out = Format(i); return true; }
    return false;
}

// ============================================================================================
// CPU probe and the table (once)
// ============================================================================================

bool isa_compiled(Isa isa) {
    switch (isa) {
        case Isa::Generic: return true;
#if defined(__x86_64__)
        case Isa::AVX2: return true;
        case Isa::AVX512: return true;
#endif
#if defined(__aarch64__)
        case Isa::NEON: return true;
        case Isa::NEON_DOTPROD: return true;
#endif
        default: return false;
    }
}

static bool probe(Isa isa) {
    if (!isa_compiled(isa)) return false;
    switch (isa) {
        case Isa::Generic: return true;
#if defined(__x86_64__)
        case Isa::AVX2:
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case Isa::AVX512:
#if defined(BITLLM_SIMDE_AVX512)
            return true;  // test-only build: the AVX-512 file is compiled against SIMDe's emulation
#endif
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
#if defined(__aarch64__)
        case Isa::NEON: return true;  // Advanced SIMD is mandatory on AArch64
        case Isa::NEON_DOTPROD:
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
            return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
            return false;
#endif
#endif
        default: return false;
    }
}

struct Dispatch {
    bool supported[kNumIsas];
    Isa best;
    std::string error;  // set when BITLLM_ISA is invalid
};

static const Dispatch& dispatch() {
    static const Dispatch d = [] {
        Dispatch r{};
        for (int i = 0; i < kNumIsas; ++i) r.supported[i] = probe(Isa(i));
        const Isa order[] = {Isa::AVX512, Isa::AVX2, Isa::NEON_DOTPROD, Isa::NEON, Isa::Generic};
        r.best = Isa::Generic;
        for (Isa i : order)
            if (r.supported[int(i)]) { r.best = i; break; }
        if (const char* env = std::getenv("BITLLM_ISA"); env && *env) {
            Isa forced;
            if (!parse_isa(env, &forced))
                r.error = std::string("BITLLM_ISA=") + env +
                          " is not a kernel variant (expected generic, avx2, avx512, neon or neon_dotprod)";
            else if (!r.supported[int(forced)])
                r.error = std::string("BITLLM_ISA=") + env + " is not supported by this CPU/build";
            else
                r.best = forced;
        }
        return r;
    }();
    return d;
}

bool isa_supported(Isa isa) { return isa != Isa::Best && dispatch().supported[int(isa)]; }

Isa active_isa() {
    const Dispatch& d = dispatch();
    if (!d.error.empty()) throw std::runtime_error(d.error);
    return d.best;
}

static const KernelTable& table_for(Isa isa) {
    if (isa == Isa::Best) isa = active_isa();
    if (!isa_supported(isa))
        throw std::runtime_error(std::string("kernel variant '") + kIsaNames[int(isa)] +
                                 "' is not supported by this CPU/build");
    switch (isa) {
#if defined(__x86_64__)
        case Isa::AVX2: return kTableAVX2;
        case Isa::AVX512: return kTableAVX512;
#endif
#if defined(__aarch64__)
        case Isa::NEON: return kTableNEON;
        case Isa::NEON_DOTPROD: return kTableNEONDotprod;
#endif
        default: return kTableGeneric;
    }
}

// ============================================================================================
// Threads
// ============================================================================================

static std::atomic<int> g_threads{(int)std::max(1u, std::thread::hardware_concurrency())};

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1");
    g_threads = n;
}
int get_num_threads() { return g_threads; }

namespace {

// A job is a number of chunks; whoever is free claims the next one. The calling thread works too
// and waits only for chunks that were claimed, so a worker the OS has not scheduled yet (a busy
// machine) delays nothing: a fork-join barrier (OpenMP) would wait for it a whole time slice.
struct Job {
    void (*call)(void* ctx, int64_t chunk, int tid);
    void* ctx;
    int64_t total;
    std::atomic<int64_t> next{0}, done{0};
};

inline void cpu_relax() {
#if defined(__x86_64__)
    _mm_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// How long an idle worker spins before it sleeps: a decode step calls the pool every few tens of
// µs, and waking a sleeping thread costs 5-50 µs on a VM — as long as a small GEMV. BITLLM_SPIN_US.
int spin_us() {
    static const int us = [] {
        const char* e = std::getenv("BITLLM_SPIN_US");
        return e ? std::max(0, std::atoi(e)) : 300;
    }();
    return us;
}

thread_local bool t_in_pool = false;  // a worker (or a caller inside run) runs nested work inline

class Pool {
public:
    // Returns false (and does nothing) when another thread is using the pool: the caller then runs
    // the job alone instead of waiting.
    bool run(int nt, Job& job) {
        std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        ensure(nt - 1);
        wanted_.store(nt - 1);
        job_.store(&job);
        gen_.fetch_add(1);
        {
            std::lock_guard<std::mutex> l(mu_);
            if (sleepers_ > 0) cv_.notify_all();
        }
        t_in_pool = true;
        work(job, 0);
        t_in_pool = false;
        while (job.done.load(std::memory_order_acquire) < job.total) cpu_relax();
        job_.store(nullptr);
        while (holding_.load() > 0) cpu_relax();  // nobody may still read `job` (the caller's stack)
        return true;
    }

private:
    static void work(Job& j, int tid) {
        for (;;) {
            const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
            if (c >= j.total) return;
            j.call(j.ctx, c, tid);
            j.done.fetch_add(1, std::memory_order_release);
        }
    }
    void ensure(int n) {
        while ((int)threads_.size() < n) {
            const int id = (int)threads_.size();
            threads_.emplace_back([this, id] { loop(id); });
            threads_.back().detach();  // the pool lives for the whole process
        }
    }
    void loop(int id) {
        t_in_pool = true;
        uint64_t seen = gen_.load();
        for (;;) {
            // spin a while for the next job, then sleep
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
            for (int i = 0; gen_.load(std::memory_order_acquire) == seen; ++i) {
                cpu_relax();
                if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) {
                    std::unique_lock<std::mutex> l(mu_);
                    ++sleepers_;
                    cv_.wait(l, [&] { return gen_.load() != seen; });
                    --sleepers_;
                    break;
                }
            }
            seen = gen_.load();
            if (id >= wanted_.load()) continue;
            holding_.fetch_add(1);
            if (Job* j = job_.load()) work(*j, id + 1);
            holding_.fetch_sub(1);
        }
    }
    std::mutex run_mu_, mu_;
    std::condition_variable cv_;
    std::vector<std::thread> threads_;  // guarded by run_mu_
    std::atomic<Job*> job_{nullptr};
    std::atomic<uint64_t> gen_{0};
    std::atomic<int> wanted_{0}, holding_{0};
    int sleepers_ = 0;  // guarded by mu_
};

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: detached workers may still wait on it at exit
    return *p;
}

// Run fn(c, tid) for c in [0, chunks) on `nt` threads (the caller included, tid 0; tid < nt).
template <class Fn>
void parallel_chunks_tid(int nt, int64_t chunks, Fn& fn) {
    if (nt <= 1 || chunks <= 1 || t_in_pool) {
        for (int64_t c = 0; c < chunks; ++c) fn(c, 0);
        return;
    }
    Job job;
    job.call = [](void* ctx, int64_t c, int tid) { (*static_cast<Fn*>(ctx))(c, tid); };
    job.ctx = &fn;
    job.total = chunks;
    if (!pool().run(nt, job))
        for (int64_t c = 0; c < chunks; ++c) fn(c, 0);
}

template <class Fn>
void parallel_chunks(int nt, int64_t chunks, Fn& fn) {
    auto with_tid = [&](int64_t c, int) { fn(c); };
    parallel_chunks_tid(nt, chunks, with_tid);
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, void (*fn)(void* ctx, int64_t begin, int64_t end, int tid),
                  void* ctx) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    int nt = g_threads.load(std::memory_order_relaxed);
    nt = (int)std::min<int64_t>(nt, (n + grain - 1) / grain);
    if (nt <= 1) {
        fn(ctx, 0, n, 0);
        return;
    }
    // about 4 chunks per thread, claimed dynamically, each at least `grain`
    const int64_t chunk = std::max(grain, (n + 4 * nt - 1) / (4 * nt));
    const int64_t chunks = (n + chunk - 1) / chunk;
    auto body = [&](int64_t c, int tid) { fn(ctx, c * chunk, std::min(n, (c + 1) * chunk), tid); };
    parallel_chunks_tid(nt, chunks, body);
}

// fn(n0, n1, tid) for rows [0, N) in contiguous chunks aligned to `align` rows (a tiled format's
// tile), claimed dynamically (a thread the OS parks finds the rest taken; at worst the caller runs
// them all, the 1-thread time). Each chunk starts a new DRAM stream whose first KBs miss the
// prefetchers. At 2 threads, 1 chunk per thread: on a Zen 4 (session 10, interleaved A/B, 2 threads,
// DRAM) 1 against 2 per thread took I2 1536x1536 20.8 -> 18.6 µs, 1536x4096 35.4 -> 32.2, 8640x3200
// 119.6 -> 115.9; T1 4-10 % and B1 6-15 % less; engine decode +2-3 %. On a Zen 3 earlier, 1, 2,
// 4, 8, 16 per thread gave 1536x1536 80/78/77/67/59 % of the roofline and 4096x1536 83/89/87/83/77 %.
// More threads keep 2 per thread, for balance.
template <class Fn>
static void parallel_rows(int64_t N, int64_t work_per_row, int64_t align, Fn fn) {
    int nt = g_threads.load(std::memory_order_relaxed);
    if (N * work_per_row < (1 << 16)) nt = 1;  // below ~64k weights a thread costs more than it brings
    nt = (int)std::min<int64_t>(nt, (N + align - 1) / align);
    if (nt <= 1) {
        fn(0, N, 0);
        return;
    }
    const int per = nt <= 2 ? 1 : 2;  // chunks per thread (see above)
    const int64_t chunk = ((N + per * nt - 1) / (per * nt) + align - 1) / align * align;
    const int64_t chunks = (N + chunk - 1) / chunk;
    auto body = [&](int64_t c, int tid) { fn(c * chunk, std::min(N, (c + 1) * chunk), tid); };
    parallel_chunks_tid(nt, chunks, body);
}

// ============================================================================================
// Packing
// ============================================================================================

int64_t block_weights(Format f) {
    switch (f) {
        case Format::I2: return kI2Weights;
        case Format::T1: return kT1Weights;
        case Format::B1: return kB1Weights;
    }
    return 0;
}
int64_t block_bytes(Format f) { return f == Format::T1 ? (int64_t)sizeof(BlockT1) : 32; }
int64_t padded_k(Format f, int64_t K) {
    // T1: whole pairs of 48-column blocks, so that Kp is also a multiple of 32 (the byte-code GEMM
    // runs 32 columns per maddubs)
    const int64_t b = f == Format::T1 ? 2 * kT1Weights : block_weights(f);
    return std::max<int64_t>(1, (K + b - 1) / b) * b;
}
int64_t row_bytes(Format f, int64_t K) { return padded_k(f, K) / block_weights(f) * block_bytes(f); }
int64_t packed_bytes(Format f, int64_t N, int64_t K) {
    // T1: one int32 per stored row after the blocks (its count of set sign bits)
    return stored_rows(f, N) * (row_bytes(f, K) + (f == Format::T1 ? 4 : 0));
}

int64_t find_invalid_weight(Format f, const int8_t* w, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
        const int8_t v = w[i];
        const bool ok = f == Format::B1 ? (v == 1 || v == -1) : (v >= -1 && v <= 1);
        if (!ok) return i;
    }
    return -1;
}

void pack(Format f, const int8_t* w, int64_t N, int64_t K, uint8_t* out) {
    const int64_t Kp = padded_k(f, K), rb = row_bytes(f, K);
    // padding rows of a partial last tile stay zero (T1 interleaves the last tile with the others)
    if (is_tiled(f)) std::memset(out, 0, (size_t)packed_bytes(f, N, K));
    // rows are independent (each writes its own bytes): on the pool, in chunks of rows
    parallel_for(N, 64, [&](int64_t n0, int64_t n1, int) {
        std::vector<uint8_t> codes((size_t)Kp);  // (Kp,) codes w+1 of one row, padding = weight 0 (+1 for B1)
        std::vector<uint8_t> tiled;              // (rb,) one row of a tiled format before it is interleaved
        if (is_tiled(f)) tiled.resize((size_t)rb);
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t* wr = w + n * K;
            uint8_t* o = is_tiled(f) ? tiled.data() : out + n * rb;
            for (int64_t k = 0; k < Kp; ++k) codes[k] = k < K ? uint8_t(wr[k] + 1) : (f == Format::B1 ? 2 : 1);
            std::memset(o, 0, (size_t)rb);
            switch (f) {
                case Format::I2:
                    for (int64_t b = 0; b < Kp / kI2Weights; ++b)
                        for (int i = 0; i < 4; ++i)
                            for (int j = 0; j < 32; ++j)
                                o[32 * b + j] |= uint8_t(codes[kI2Weights * b + 32 * i + j] << (2 * i));
                    break;
                case Format::T1: {
                    int32_t signs = 0;
                    for (int64_t b = 0; b < Kp / kT1Weights; ++b) {
                        uint8_t* blk = o + (int64_t)sizeof(BlockT1) * b;
                        for (int g = 0; g < 16; ++g) {
                            const uint8_t* c = &codes[kT1Weights * b + 3 * g];
                            const int x = t1_code_of(c[0] + 3 * c[1] + 9 * c[2]);  // sign-folded
                            blk[2 * (g >> 2) + (g & 1)] |= uint8_t((x & 15) << (4 * ((g >> 1) & 1)));
                            blk[8 + (g & 1)] |= uint8_t((x >> 4) << (g >> 1));
                            signs += x >> 4;
                        }
                    }
                    std::memcpy(out + stored_rows(f, N) * rb + 4 * n, &signs, 4);  // padding rows: 0
                    break;
                }
                case Format::B1:
                    for (int64_t p = 0; p < rb; ++p)
                        for (int i = 0; i < 8; ++i) o[p] |= uint8_t((codes[8 * p + i] == 0 ? 1 : 0) << i);
                    break;
            }
            if (is_tiled(f)) store_row(f, N, Kp, n, o, out);
        }
    });
}

void unpack(Format f, const uint8_t* packed, int64_t N, int64_t K, int8_t* out) {
    const int64_t Kp = padded_k(f, K), rb = row_bytes(f, K);
    std::vector<uint8_t> codes((size_t)Kp), buf((size_t)rb);
    const PackedView w{f, packed, N, K, Kp, rb};
    for (int64_t n = 0; n < N; ++n) {
        decode_row_codes_generic(f, row_of(w, n, buf.data()), Kp, codes.data());
        for (int64_t k = 0; k < K; ++k) out[n * K + k] = int8_t(int(codes[k]) - 1);
    }
}

// ============================================================================================
// Activation quantizer (pinned: fp32, s = 127/max(max|x|, 1e-5), q = clamp(rint(x*s), -128, 127))
// ============================================================================================

void quantize_generic(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                      float* scale, int32_t* sums) {
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * ldx;
        int8_t* qr = q + m * ldq;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            const float a = std::fabs(xr[k]);
            amax = a > amax ? a : amax;
        }
        // torch evaluates `127 / t` as t.reciprocal() * 127: two fp32 roundings, reproduced here.
        const float s = (1.0f / (amax > 1e-5f ? amax : 1e-5f)) * 127.0f;
        int32_t sum = 0;
        for (int64_t k = 0; k < K; ++k) {
            // Round half to even without libm calls: |x*s| <= 127.0001 < 2^22, so adding and
            // subtracting 1.5·2^23 rounds to an integer in the default rounding mode (= torch.round).
            float r = xr[k] * s;
            r = (r + 12582912.0f) - 12582912.0f;
            // Clamp written so that NaN lands on -128 (like _mm256_max_ps(r, -128) does): NaN/inf
            // inputs give unspecified but identical results in every variant, never UB.
            r = r >= -128.0f ? r : -128.0f;
            r = r <= 127.0f ? r : 127.0f;
            const int8_t v = (int8_t)(int)r;
            qr[k] = v;
            sum += v;
        }
        for (int64_t k = K; k < ldq; ++k) qr[k] = 0;
        scale[m] = s;
        sums[m] = sum;
    }
}

void quantize_activations(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, int64_t ldq,
                          float* scale, int32_t* sums, Isa isa) {
    const KernelTable& t = table_for(isa);
    (t.quantize ? t.quantize : quantize_generic)(x, M, K, ldx, q, ldq, scale, sums);
}

// ============================================================================================
// Matmuls
// ============================================================================================

// Rows per thread chunk: whole tiles of a tiled format (the table kernels work tile by tile).
static int64_t row_align(Format f) { return is_tiled(f) ? tile_rows(f) : 16; }

static PackedView view(Format f, const uint8_t* packed, int64_t N, int64_t K) {
    return PackedView{f, packed, N, K, padded_k(f, K), row_bytes(f, K)};
}

void gemm_a8(Format f, const uint8_t* packed, int64_t N, int64_t K, const int8_t* q, int64_t ldq,
             const float* xscale, const int32_t* qsum, int64_t M, const float* wscale,
             const float* bias, float* out, Isa isa) {
    const KernelTable& t = table_for(isa);
    const PackedView w = view(f, packed, N, K);
    if (M <= 0 || N <= 0) return;
    // Padded activations: reuse the caller's buffer when it already has zeros in [K, Kp).
    bool ok = ldq >= w.Kp;
    for (int64_t m = 0; ok && m < M; ++m)
        for (int64_t k = K; k < w.Kp; ++k)
            if (q[m * ldq + k] != 0) { ok = false; break; }
    std::vector<int8_t> qpad;
    A8Acts a{q, ldq, qsum, xscale, M};
    if (!ok) {
        qpad.assign((size_t)(M * w.Kp), 0);  // (M, Kp)
        for (int64_t m = 0; m < M; ++m) std::memcpy(&qpad[m * w.Kp], q + m * ldq, (size_t)K);
        a.q = qpad.data();
        a.ldq = w.Kp;
    }
    A8Fn fn = t.a8[int(f)] ? t.a8[int(f)] : kTableGeneric.a8[int(f)];
    A8PrepFn prep = t.a8[int(f)] ? t.a8_prep[int(f)] : nullptr;
    if (!prep) {
        parallel_rows(N, w.Kp * M, row_align(f), [&](int64_t n0, int64_t n1, int) { fn(w, a, wscale, bias, out, n0, n1); });
        return;
    }
    // Every thread builds its own tables (a8_prep) on its first chunk. Built once and shared, they
    // were written by one core and read by the other: on a 2-vCPU Zen 4 guest that cost ~20 µs per
    // call at K = 4096 (T1, B1; building them takes ~2-3 µs), as much as the GEMV itself. A prep that
    // leaves a.lut unset (more activation rows than tables serve) returns at once, so it may run again.
    const int nt = g_threads.load(std::memory_order_relaxed);
    const size_t slots = (size_t)std::max(1, nt) + 1;
    std::vector<A8Acts> acts(slots, a);
    std::vector<std::vector<uint8_t>> luts(slots);
    const int64_t nb = w.Kp / block_weights(f);
    A8SumsFn sums = t.a8[int(f)] ? t.a8_sums[int(f)] : nullptr;
    // K parts on whole K chunks (a part that starts inside a chunk reads a strided stream): chunk
    // boundaries b_p, used for a GEMV (M = 1) with long rows (K >= 2N) when the largest part has at
    // most 1.3x its share of the blocks. Zen 4, 2 threads, from DRAM, interleaved against the row
    // split: 1536x4096 B1 31.0 / 33.8 µs, T1 53.1 / 57.1; 3200x8640 B1 99.3 / 103.5, T1 185.1 / 195.7;
    // but 4096x1536 T1 53.8 / 48.5, 8640x3200 B1 (parts of 8 and 5 blocks) 108.8 / 90.5, and at M = 4
    // 1536x4096 B1 105.7 / 90.1, T1 177.9 / 160.7: hence the conditions.
    std::vector<int64_t> bound;
    if (sums && nt >= 2 && M == 1 && w.Kp >= 2 * N && N * w.Kp >= (1 << 16)) {
        const int64_t C = chunk_blocks(f), nc = (nb + C - 1) / C;
        if (nc >= nt) {
            int64_t largest = 0;
            for (int p = 0; p <= nt; ++p) bound.push_back(std::min(nb, (nc * p + nt / 2) / nt * C));
            for (int p = 0; p < nt; ++p) largest = std::max(largest, bound[p + 1] - bound[p]);
            if (10 * largest * nt > 13 * nb) bound.clear();
        }
    }
    if (!bound.empty()) {
        // The table kernels split K, not rows, between the threads: part p is the blocks
        // [b_p, b_p+1) of every row. A thread then reads one sequential stream per K chunk and builds
        // only its part's tables, at the price of adding the parts' int32 sums.
        const int parts = nt;
        const int64_t SR = stored_rows(f, N);
        std::vector<int32_t> acc((size_t)(parts * M * SR));  // (parts, M, SR)
        auto part = [&](int64_t p, int tid) {
            A8Acts& mine = acts[(size_t)tid];
            prep(w, mine, luts[(size_t)tid], bound[p], bound[p + 1]);
            sums(w, mine, 0, N, bound[p], bound[p + 1], &acc[(size_t)(p * M * SR)], SR);
        };
        parallel_chunks_tid(nt, parts, part);
        parallel_rows(N, M * 64, row_align(f), [&](int64_t n0, int64_t n1, int) {
            std::vector<int32_t> s((size_t)(n1 - n0));
            for (int64_t m = 0; m < M; ++m) {
                const int32_t* a0 = &acc[(size_t)(m * SR)];
                for (int64_t n = n0; n < n1; ++n) s[n - n0] = a0[n];
                for (int p = 1; p < parts; ++p) {
                    const int32_t* ap = &acc[(size_t)((p * M + m) * SR)];
                    for (int64_t n = n0; n < n1; ++n) s[n - n0] += ap[n];
                }
                for (int64_t n = n0; n < n1; ++n)
                    out[m * N + n] = a8_epilogue(table_finish(w, s[n - n0], a.qsum[m], n), a.xscale[m], wscale[n], bias, n);
            }
        });
        return;
    }
    parallel_rows(N, w.Kp * M, row_align(f), [&](int64_t n0, int64_t n1, int tid) {
        A8Acts& mine = acts[(size_t)tid];
        if (!mine.lut) prep(w, mine, luts[(size_t)tid], 0, nb);
        fn(w, mine, wscale, bias, out, n0, n1);
    });
}

void gemm_f32(Format f, const uint8_t* packed, int64_t N, int64_t K, const float* x, int64_t ldx,
              int64_t M, const float* wscale, const float* bias, float* out, Isa isa) {
    const KernelTable& t = table_for(isa);
    const PackedView w = view(f, packed, N, K);
    if (M <= 0 || N <= 0) return;
    std::vector<float> xpad;
    F32Acts a{x, ldx, M};
    if (K != w.Kp) {
        xpad.assign((size_t)(M * w.Kp), 0.0f);  // (M, Kp)
        for (int64_t m = 0; m < M; ++m) std::memcpy(&xpad[m * w.Kp], x + m * ldx, sizeof(float) * K);
        a.x = xpad.data();
        a.ldx = w.Kp;
    }
    F32Fn fn = t.f32[int(f)] ? t.f32[int(f)] : kTableGeneric.f32[int(f)];
    parallel_rows(N, w.Kp * M, row_align(f), [&](int64_t n0, int64_t n1, int) { fn(w, a, wscale, bias, out, n0, n1); });
}

// ============================================================================================
// Measurement helpers
// ============================================================================================

double stream_read_bandwidth(size_t bytes, int threads, int reps) {
    constexpr size_t kChunk = 8 << 20;  // 8 MiB per claimed chunk
    bytes = std::max<size_t>(bytes / kChunk * kChunk, kChunk);
    threads = std::max(1, threads);
    uint8_t* buf = static_cast<uint8_t*>(std::aligned_alloc(64, bytes));
    if (!buf) throw std::bad_alloc();
    const int64_t chunks = (int64_t)(bytes / kChunk);
    auto touch = [&](int64_t c) { std::memset(buf + c * kChunk, 1, kChunk); };  // first touch
    parallel_chunks(threads, chunks, touch);
    std::vector<uint64_t> partial((size_t)chunks);
    auto read = [&](int64_t c) {
        const uint8_t* p = buf + c * kChunk;
#if defined(__x86_64__)
        __m128i s0 = _mm_setzero_si128(), s1 = s0, s2 = s0, s3 = s0;
        for (size_t i = 0; i < kChunk; i += 64) {
            s0 = _mm_add_epi64(s0, _mm_load_si128((const __m128i*)(p + i)));
            s1 = _mm_add_epi64(s1, _mm_load_si128((const __m128i*)(p + i + 16)));
            s2 = _mm_add_epi64(s2, _mm_load_si128((const __m128i*)(p + i + 32)));
            s3 = _mm_add_epi64(s3, _mm_load_si128((const __m128i*)(p + i + 48)));
        }
        s0 = _mm_add_epi64(_mm_add_epi64(s0, s1), _mm_add_epi64(s2, s3));
        uint64_t lanes[2];
        _mm_storeu_si128((__m128i*)lanes, s0);
        partial[c] = lanes[0] + lanes[1];
#else
        uint64_t s[4] = {0, 0, 0, 0};
        for (size_t i = 0; i < kChunk; i += 32) {
            uint64_t v[4];
            std::memcpy(v, p + i, 32);
            for (int j = 0; j < 4; ++j) s[j] += v[j];
        }
        partial[c] = s[0] + s[1] + s[2] + s[3];
#endif
    };
    double best = 1e30;
    volatile uint64_t sink = 0;
    for (int r = 0; r < std::max(1, reps); ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        parallel_chunks(threads, chunks, read);
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        for (uint64_t v : partial) sink = sink + v;
        best = std::min(best, dt);
    }
    std::free(buf);
    return double(bytes) / best;
}

const char* cpu_model() {
    static const std::string model = [] {
        std::ifstream f("/proc/cpuinfo");
        std::string line;
        while (std::getline(f, line)) {
            if (line.rfind("model name", 0) == 0 || line.rfind("Model", 0) == 0 ||
                line.rfind("CPU part", 0) == 0) {
                const auto p = line.find(':');
                if (p != std::string::npos) return line.substr(p + 2);
            }
        }
        return std::string("unknown");
    }();
    return model.c_str();
}

}  // namespace bitllm
