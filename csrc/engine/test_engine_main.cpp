// Standalone engine test (no Python): load an engine file, greedy-decode from the prompt stored in
// its metadata and compare with the golden token ids stored beside it. Built for x86 and for
// AArch64 (run under qemu-aarch64) by tests/test_engine_native.py.
//   usage: test_engine <model.engine> [threads]
// Prints "isa=<variant> tokens=<ids...>" and exits 0 when the tokens match, 1 otherwise.
//   usage: test_engine --simd
// Checks the engine's vector helpers (simd.h) against their contracts; prints "SIMD OK" and exits 0.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "engine.h"
#include "simd.h"

using namespace bitllm;

static std::vector<int32_t> ids_of(const std::string& s) {
    std::vector<int32_t> r;
    std::istringstream in(s);
    int32_t v;
    while (in >> v) r.push_back(v);
    return r;
}

// rows4_* bit-identical to 4 dot_* calls and dot4_* to 4 calls, on lengths around the vector
// widths; silu_mul within 1e-6 of a double reference (finite at the extremes, out aliasing g).
static int simd_selftest() {
    using namespace bitllm::engine;
    int bad = 0;
    uint32_t st = 12345;
    auto rnd = [&] { return (st = st * 1664525u + 1013904223u) >> 8; };
    for (int64_t n : {1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1536, 1541}) {
        const int64_t ld = n + 3;
        std::vector<int8_t> w8((size_t)(4 * ld));
        std::vector<uint16_t> w16((size_t)(4 * ld));
        std::vector<float> x((size_t)(4 * ld));
        for (auto& v : w8) v = (int8_t)((int)(rnd() % 255) - 127);
        for (auto& v : w16) v = float_to_half(((int)(rnd() % 2001) - 1000) / 257.0f);
        for (auto& v : x) v = ((int)(rnd() % 2001) - 1000) / 311.0f;
        float a[4], b[4];
        rows4_i8(w8.data(), ld, x.data(), n, a);
        rows4_f16(w16.data(), ld, x.data(), n, b);
        for (int i = 0; i < 4; ++i) {
            bad += a[i] != dot_i8(w8.data() + i * ld, x.data(), n);
            bad += b[i] != dot_f16(w16.data() + i * ld, x.data(), n);
        }
        dot4_i8(w8.data(), x.data(), ld, n, a);
        dot4_f16(w16.data(), x.data(), ld, n, b);
        for (int i = 0; i < 4; ++i) {
            bad += a[i] != dot_i8(w8.data(), x.data() + i * ld, n);
            bad += b[i] != dot_f16(w16.data(), x.data() + i * ld, n);
        }
        if (bad) {
            std::printf("dot/rows4/dot4 differ at n=%lld\n", (long long)n);
            return 1;
        }
        // fp16 KV cache: f32_to_f16 is float_to_half's bits; the fp16 attention helpers equal the
        // fp32 ones on the converted cache (n keys of head_dim hd = n, stride ld)
        std::vector<float> xs = x;
        xs[0] = 65520.0f, xs[1] = -1e-8f, xs[2] = 6.1e-5f, xs[3] = 5.96e-8f;  // overflow, underflow, (sub)normal edges
        std::vector<uint16_t> h((size_t)(4 * ld));
        f32_to_f16(xs.data(), h.data(), 4 * ld);
        std::vector<float> hf((size_t)(4 * ld));
        for (int64_t k = 0; k < 4 * ld; ++k) {
            bad += h[(size_t)k] != float_to_half(xs[(size_t)k]);
            hf[(size_t)k] = half_to_float(h[(size_t)k]);
        }
        const int64_t keys = std::min<int64_t>(4, n);
        std::vector<float> s16((size_t)keys), s32((size_t)keys), o16((size_t)n), o32((size_t)n);
        dot_f16_rows(x.data() + 3 * ld, h.data(), ld, keys, n, 0.125f, s16.data());
        dot_f32_rows(x.data() + 3 * ld, hf.data(), ld, keys, n, 0.125f, s32.data());
        weighted_sum_f16(x.data(), h.data(), ld, keys, n, o16.data());
        weighted_sum(x.data(), hf.data(), ld, keys, n, o32.data());
        for (int64_t j = 0; j < keys; ++j) bad += s16[(size_t)j] != s32[(size_t)j];
        for (int64_t d = 0; d < n; ++d) bad += o16[(size_t)d] != o32[(size_t)d];
        if (bad) {
            std::printf("fp16 KV helpers differ at n=%lld\n", (long long)n);
            return 1;
        }
        std::vector<float> g((size_t)n), u((size_t)n), want((size_t)n);
        for (int64_t k = 0; k < n; ++k) g[(size_t)k] = ((int)(rnd() % 4001) - 2000) / 100.0f, u[(size_t)k] = x[(size_t)k];
        g[0] = n % 2 ? -200.0f : 200.0f;
        for (int64_t k = 0; k < n; ++k) want[(size_t)k] = (float)(g[k] / (1.0 + std::exp(-(double)g[k])) * u[k]);
        silu_mul(g.data(), u.data(), g.data(), n);  // out aliases g
        for (int64_t k = 0; k < n; ++k)
            if (!std::isfinite(g[k]) || std::fabs(g[k] - want[k]) > 1e-6f * std::fabs(want[k]) + 1e-30f) {
                std::printf("silu_mul n=%lld k=%lld: %g, want %g\n", (long long)n, (long long)k, g[k], want[k]);
                return 1;
            }
    }
    std::printf("simd=%s SIMD OK\n", simd_name());
    return 0;
}

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "--simd") return simd_selftest();
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s <model.engine> [threads]\n", argv[0]);
        return 2;
    }
    set_num_threads(argc > 2 ? std::atoi(argv[2]) : 1);
    try {
        engine::Config meta;
        auto eng = engine::load_engine_file(argv[1], &meta);
        const std::vector<int32_t> prompt = ids_of(meta["golden.prompt"]), want = ids_of(meta["golden.tokens"]);
        if (prompt.empty() || want.empty()) {
            std::fprintf(stderr, "engine file has no golden.prompt / golden.tokens metadata\n");
            return 2;
        }
        const int64_t V = eng->config().vocab;
        const int s = eng->add_sequence((int64_t)(prompt.size() + want.size()));
        std::vector<float> logits((size_t)V);
        std::vector<int32_t> got;
        std::vector<int32_t> step = prompt;
        for (size_t t = 0; t < want.size(); ++t) {
            const int64_t off[2] = {0, (int64_t)step.size()};
            eng->forward(&s, 1, step.data(), off, nullptr, logits.data());
            int32_t best = 0;
            for (int64_t v = 1; v < V; ++v)
                if (logits[v] > logits[best]) best = (int32_t)v;
            got.push_back(best);
            step.assign(1, best);
        }
        std::printf("isa=%s tokens=", isa_name(active_isa()));
        for (auto t : got) std::printf("%d ", t);
        std::printf("\n");
        if (got != want) {
            std::printf("MISMATCH: expected ");
            for (auto t : want) std::printf("%d ", t);
            std::printf("\n");
            return 1;
        }
        std::printf("OK %zu tokens match\n", got.size());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 2;
    }
}
