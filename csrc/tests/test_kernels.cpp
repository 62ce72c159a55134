// Standalone kernel test (no Python): every variant this CPU runs against the scalar `generic`
// twin, bit for bit, on random odd shapes; `generic` against a direct integer reference; pack /
// unpack round trips. Built and run by
// tests/test_kernels_native.py under ASan+UBSan on x86 and under qemu-aarch64 for NEON.
// Exit status 0 = all passed. Prints one line per variant: "isa <name>: ran|skipped (...)".
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "kernels.h"
#include "kernels_internal.h"

using namespace bitllm;

static int g_failures = 0;
#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            std::printf(__VA_ARGS__);                      \
            std::printf("\n");                             \
            if (++g_failures > 20) std::exit(1);           \
        }                                                  \
    } while (0)

static std::mt19937 rng(1234);

static std::vector<int8_t> random_weights(Format f, int64_t N, int64_t K) {
    std::vector<int8_t> w((size_t)(N * K));
    std::uniform_int_distribution<int> d(0, f == Format::B1 ? 1 : 2);
    for (auto& v : w) v = f == Format::B1 ? int8_t(d(rng) * 2 - 1) : int8_t(d(rng) - 1);
    return w;
}

static void test_pack_roundtrip(Format f, int64_t N, int64_t K) {
    const auto w = random_weights(f, N, K);
    std::vector<uint8_t> p((size_t)packed_bytes(f, N, K));
    pack(f, w.data(), N, K, p.data());
    std::vector<int8_t> back((size_t)(N * K));
    unpack(f, p.data(), N, K, back.data());
    CHECK(back == w, "pack/unpack %s N=%lld K=%lld", format_name(f), (long long)N, (long long)K);
}

// One shape: A8 and F32 for all supported variants vs generic; generic A8 vs the int reference.
static void test_shape(Format f, int64_t M, int64_t N, int64_t K, bool extreme) {
    const auto w = random_weights(f, N, K);
    std::vector<uint8_t> p((size_t)packed_bytes(f, N, K));
    pack(f, w.data(), N, K, p.data());

    std::vector<float> x((size_t)(M * K));  // (M, K)
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto& v : x) v = nd(rng);
    std::vector<int8_t> q((size_t)(M * K));  // (M, K), ldq = K (the front door pads it)
    std::vector<float> xs((size_t)M);
    std::vector<int32_t> qs((size_t)M);
    if (extreme) {  // worst case for every accumulator: all ±127 / -128
        std::uniform_int_distribution<int> d(0, 2);
        for (int64_t m = 0; m < M; ++m) {
            int32_t s = 0;
            for (int64_t k = 0; k < K; ++k) {
                const int r = d(rng);
                const int8_t v = int8_t(r == 0 ? 127 : r == 1 ? -127 : -128);
                q[m * K + k] = v;
                s += v;
            }
            xs[m] = 1.0f;
            qs[m] = s;
        }
    } else {
        quantize_activations(x.data(), M, K, K, q.data(), K, xs.data(), qs.data());
    }
    std::vector<float> ws((size_t)N), bias((size_t)N);
    std::uniform_real_distribution<float> ud(0.5f, 1.5f);
    for (auto& v : ws) v = ud(rng);
    for (auto& v : bias) v = nd(rng);

    // integer reference for generic
    std::vector<float> ref((size_t)(M * N));
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            int64_t acc = 0;
            for (int64_t k = 0; k < K; ++k) acc += int64_t(w[n * K + k]) * q[m * K + k];
            ref[m * N + n] = ((float)(int32_t)acc / xs[m]) * ws[n] + bias[n];
        }
    std::vector<float> g_a8((size_t)(M * N)), g_f32((size_t)(M * N)), o((size_t)(M * N));
    gemm_a8(f, p.data(), N, K, q.data(), K, xs.data(), qs.data(), M, ws.data(), bias.data(), g_a8.data(), Isa::Generic);
    CHECK(std::memcmp(g_a8.data(), ref.data(), sizeof(float) * M * N) == 0,
          "generic a8 vs int reference %s M=%lld N=%lld K=%lld", format_name(f), (long long)M, (long long)N, (long long)K);
    gemm_f32(f, p.data(), N, K, x.data(), K, M, ws.data(), nullptr, g_f32.data(), Isa::Generic);

    for (int i = 1; i < kNumIsas; ++i) {
        const Isa isa = Isa(i);
        if (!isa_supported(isa)) continue;
        gemm_a8(f, p.data(), N, K, q.data(), K, xs.data(), qs.data(), M, ws.data(), bias.data(), o.data(), isa);
        CHECK(std::memcmp(o.data(), g_a8.data(), sizeof(float) * M * N) == 0, "%s a8 vs generic %s M=%lld N=%lld K=%lld",
              isa_name(isa), format_name(f), (long long)M, (long long)N, (long long)K);
        gemm_f32(f, p.data(), N, K, x.data(), K, M, ws.data(), nullptr, o.data(), isa);
        CHECK(std::memcmp(o.data(), g_f32.data(), sizeof(float) * M * N) == 0, "%s f32 vs generic %s M=%lld N=%lld K=%lld",
              isa_name(isa), format_name(f), (long long)M, (long long)N, (long long)K);
    }
}

// Every variant's quantizer against the scalar one, bit for bit (scales, q, sums, zero padding).
static void test_quantizer(int64_t M, int64_t K, float spread) {
    std::vector<float> x((size_t)(M * K));
    std::normal_distribution<float> nd(0.0f, spread);
    for (auto& v : x) v = nd(rng);
    if (K > 3) x[1] = 0.5f, x[2] = -2.5f;  // ties when max|x| makes s = 1
    if (K > 40 && M > 1) x[K + 5] = std::numeric_limits<float>::quiet_NaN(), x[K + 33] = -x[K + 34];  // row 1: NaN
    if (K > 40 && M > 2) x[2 * K + 9] = std::numeric_limits<float>::infinity();                      // row 2: inf
    const int64_t ldq = K + 7;
    std::vector<int8_t> q0((size_t)(M * ldq), 5), q1((size_t)(M * ldq), 5);
    std::vector<float> s0((size_t)M), s1((size_t)M);
    std::vector<int32_t> t0((size_t)M), t1((size_t)M);
    quantize_activations(x.data(), M, K, K, q0.data(), ldq, s0.data(), t0.data(), Isa::Generic);
    for (int i = 1; i < kNumIsas; ++i) {
        if (!isa_supported(Isa(i))) continue;
        std::fill(q1.begin(), q1.end(), 5);
        quantize_activations(x.data(), M, K, K, q1.data(), ldq, s1.data(), t1.data(), Isa(i));
        CHECK(q0 == q1 && std::memcmp(s0.data(), s1.data(), 4 * M) == 0 && t0 == t1,
              "%s quantizer vs generic M=%lld K=%lld", isa_name(Isa(i)),
              (long long)M, (long long)K);
    }
}

int main() {
    for (int i = 0; i < kNumIsas; ++i)
        std::printf("isa %s: %s\n", isa_name(Isa(i)),
                    isa_supported(Isa(i)) ? "ran" : isa_compiled(Isa(i)) ? "skipped (CPU lacks it)" : "skipped (not compiled for this target)");
    for (int64_t K : {1, 7, 31, 32, 33, 100, 1000, 4099}) test_quantizer(3, K, 1.0f);
    test_quantizer(2, 300, 1e-7f);
    test_quantizer(2, 300, 1e4f);
    std::uniform_int_distribution<int> dm(1, 9), dn(1, 70), dk(1, 1200);
    for (int fi = 0; fi < kNumFormats; ++fi) {
        const Format f = Format(fi);
        test_pack_roundtrip(f, 1, 1);
        test_pack_roundtrip(f, 13, 333);
        const int64_t fixed[][3] = {{1, 1, 1}, {1, 1, 5}, {4, 3, 1}, {1, 5, 127}, {2, 7, 129}, {5, 9, 161},
                                    {1, 17, 255}, {6, 4, 257}, {3, 21, 320}, {1, 33, 1000},
                                    {16, 19, 700}, {17, 18, 1100}, {33, 5, 600}};
        for (const auto& s : fixed) test_shape(f, s[0], s[1], s[2], false);
        for (int t = 0; t < 12; ++t) test_shape(f, dm(rng), dn(rng), dk(rng), false);
        test_shape(f, 1, 5, 16384, true);  // int16/int32 headroom at the largest K
        test_shape(f, 4, 3, 16383, true);   // 4-row GEMV path, odd K
        test_shape(f, 11, 3, 16383, true);  // grouped path (5..16 rows)
        test_shape(f, 18, 3, 16383, true);  // code-tile GEMM (> 16 rows)
    }
    // The thread pool: 1, 2 and 3 threads give identical outputs; the bandwidth probe runs.
    // (N = 40, K = 4000: the table kernels' GEMV splits K between the threads, gemm_a8's K parts.)
    for (int fi = 0; fi < 2 * kNumFormats; ++fi) {
        const Format f = Format(fi % kNumFormats);
        const int64_t M = 3, N = fi < kNumFormats ? 301 : 40, K = fi < kNumFormats ? 700 : 4000;
        const auto w = random_weights(f, N, K);
        std::vector<uint8_t> p((size_t)packed_bytes(f, N, K));
        pack(f, w.data(), N, K, p.data());
        std::vector<float> x((size_t)(M * K)), ws((size_t)N, 1.0f), o1((size_t)(M * N)), o2((size_t)(M * N));
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (auto& v : x) v = nd(rng);
        // A8 with one activation row: the GEMV paths (B1: one table per call, read by every thread)
        std::vector<int8_t> q((size_t)K);
        float xs;
        int32_t qs;
        quantize_activations(x.data(), 1, K, K, q.data(), K, &xs, &qs);
        std::vector<float> a1((size_t)N), a2((size_t)N);
        set_num_threads(1);
        gemm_f32(f, p.data(), N, K, x.data(), K, M, ws.data(), nullptr, o1.data());
        gemm_a8(f, p.data(), N, K, q.data(), K, &xs, &qs, 1, ws.data(), nullptr, a1.data());
        for (int nt : {2, 3}) {
            set_num_threads(nt);
            for (int rep = 0; rep < 20; ++rep) {
                gemm_f32(f, p.data(), N, K, x.data(), K, M, ws.data(), nullptr, o2.data());
                CHECK(o1 == o2, "threads=%d changed gemm_f32 %s", nt, format_name(f));
                gemm_a8(f, p.data(), N, K, q.data(), K, &xs, &qs, 1, ws.data(), nullptr, a2.data());
                CHECK(a1 == a2, "threads=%d changed gemm_a8 %s", nt, format_name(f));
            }
        }
    }
    // Two caller threads at once (the pool serves one; the other runs its chunks alone) and a
    // parallel_for nested in a chunk (runs inline): same results, nothing lost (TSan runs this too).
    {
        const Format f = Format::I2;
        const int64_t M = 2, N = 517, K = 900;
        const auto w = random_weights(f, N, K);
        std::vector<uint8_t> p((size_t)packed_bytes(f, N, K));
        pack(f, w.data(), N, K, p.data());
        std::vector<float> x((size_t)(M * K)), ws((size_t)N, 1.0f), ref((size_t)(M * N));
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (auto& v : x) v = nd(rng);
        set_num_threads(1);
        gemm_f32(f, p.data(), N, K, x.data(), K, M, ws.data(), nullptr, ref.data());
        set_num_threads(2);
        std::atomic<int> bad{0};
        auto caller = [&] {
            std::vector<float> o((size_t)(M * N));
            for (int rep = 0; rep < 30; ++rep) {
                gemm_f32(f, p.data(), N, K, x.data(), K, M, ws.data(), nullptr, o.data());
                if (o != ref) ++bad;
            }
        };
        std::thread t1(caller), t2(caller);
        t1.join();
        t2.join();
        CHECK(bad == 0, "concurrent callers changed results (%d bad)", bad.load());
        std::atomic<int64_t> items{0};
        parallel_for(64, 1, [&](int64_t b0, int64_t b1, int tid) {
            CHECK(tid >= 0 && tid < 2, "tid %d out of range", tid);
            for (int64_t i = b0; i < b1; ++i)
                parallel_for(10, 1, [&](int64_t c0, int64_t c1, int) { items += c1 - c0; });
        });
        CHECK(items == 640, "nested parallel_for covered %lld of 640 items", (long long)items.load());
    }
    CHECK(stream_read_bandwidth(32 << 20, 2, 1) > 1e8, "stream_read_bandwidth");
    std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "OK", g_failures);
    return g_failures ? 1 : 0;
}
