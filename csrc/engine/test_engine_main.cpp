// Standalone engine test (no Python): load an engine file, greedy-decode from the prompt stored in
// its metadata and compare with the golden token ids stored beside it. Built for x86 and for
// AArch64 (run under qemu-aarch64) by tests/test_engine_native.py.
//   usage: test_engine <model.engine> [threads]
// Prints "isa=<variant> tokens=<ids...>" and exits 0 when the tokens match, 1 otherwise.
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "engine.h"

using namespace bitllm;

static std::vector<int32_t> ids_of(const std::string& s) {
    std::vector<int32_t> r;
    std::istringstream in(s);
    int32_t v;
    while (in >> v) r.push_back(v);
    return r;
}

int main(int argc, char** argv) {
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
            eng->forward(&s, 1, step.data(), off, false, logits.data());
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
