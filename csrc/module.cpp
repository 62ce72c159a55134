// bitllm._core: the binding layer. It holds no math (STYLE.md "C++"): it checks shapes, releases
// the GIL and forwards raw pointers to csrc/kernels.h. Outputs are allocated by the caller
// (src/bitllm/kernels.py) so that torch tensors and numpy arrays pass through without copies.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace nb = nanobind;
using namespace bitllm;

template <class T, class... Extra>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;

static Format fmt_of(const std::string& s) {
    Format f;
    if (!parse_format(s.c_str(), &f)) throw std::invalid_argument("unknown format '" + s + "' (expected i2, t1 or b1)");
    return f;
}
static Isa isa_of(const std::optional<std::string>& s) {
    if (!s) return Isa::Best;
    Isa i;
    if (!parse_isa(s->c_str(), &i))
        throw std::invalid_argument("unknown kernel variant '" + *s + "' (expected generic, avx2, avx512, neon or neon_dotprod)");
    if (!isa_supported(i)) throw std::invalid_argument("kernel variant '" + *s + "' is not supported by this CPU/build");
    return i;
}
static void need(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
}

// Shape checks shared by the matmul bindings: packed (N, K) weights, wscale/bias (N,), out (M, N).
// Matrix dims the size helpers accept: non-negative and small enough that packed_bytes() cannot
// overflow (2^32 rows of 2^32 columns is far beyond any layer).
static void need_dims(const std::string& fn, int64_t N, int64_t K) {
    const int64_t kMax = int64_t(1) << 32;
    need(N >= 0 && K >= 0 && N <= kMax && K <= kMax,
         fn + ": N and K must lie in 0.." + std::to_string(kMax) + ", got N=" + std::to_string(N) + ", K=" + std::to_string(K));
}

static void need_linear_shapes(const char* fn, Format fm, int64_t packed_len, int64_t N, int64_t K, int64_t M,
                               int64_t wscale_len, const int64_t* bias_len, int64_t out_rows, int64_t out_cols) {
    const std::string f = fn;
    need_dims(f, N, K);
    need(packed_len == packed_bytes(fm, N, K), f + ": packed has the wrong size");
    need(wscale_len == N, f + ": wscale must be (N,)");
    need(!bias_len || *bias_len == N, f + ": bias must be (N,)");
    need(out_rows == M && out_cols == N, f + ": out must be (M, N)");
}

NB_MODULE(_core, m) {
    m.doc() = "bitllm native core: 1-bit / 1.58-bit CPU kernels (see csrc/kernels.h)";
    m.def("version", []() { return 1; });

    // ---- variants and threads ----
    m.def("available_isas", []() {
        std::vector<std::string> r;
        for (int i = 0; i < kNumIsas; ++i)
            if (isa_supported(Isa(i))) r.emplace_back(isa_name(Isa(i)));
        return r;
    }, "Kernel variants this build has and this CPU runs.");
    m.def("compiled_isas", []() {
        std::vector<std::string> r;
        for (int i = 0; i < kNumIsas; ++i)
            if (isa_compiled(Isa(i))) r.emplace_back(isa_name(Isa(i)));
        return r;
    }, "Kernel variants compiled into this build (whether or not this CPU runs them).");
    m.def("active_isa", []() { return std::string(isa_name(active_isa())); },
          "The variant used by default (best supported, or BITLLM_ISA).");
    m.def("set_num_threads", &set_num_threads, nb::arg("n"));
    m.def("get_num_threads", &get_num_threads);

    // ---- layout facts ----
    m.def("block_weights", [](const std::string& f) { return block_weights(fmt_of(f)); }, nb::arg("fmt"));
    m.def("padded_k", [](const std::string& f, int64_t K) { need_dims("padded_k", 0, K); return padded_k(fmt_of(f), K); }, nb::arg("fmt"), nb::arg("K"));
    m.def("row_bytes", [](const std::string& f, int64_t K) { need_dims("row_bytes", 0, K); return row_bytes(fmt_of(f), K); }, nb::arg("fmt"), nb::arg("K"));
    m.def("packed_bytes", [](const std::string& f, int64_t N, int64_t K) {
        need_dims("packed_bytes", N, K);
        return packed_bytes(fmt_of(f), N, K);
    },
          nb::arg("fmt"), nb::arg("N"), nb::arg("K"));

    // ---- packing ----
    m.def("find_invalid_weight", [](const std::string& f, Arr<const int8_t> w) {
        return find_invalid_weight(fmt_of(f), w.data(), (int64_t)w.size());
    }, nb::arg("fmt"), nb::arg("w").noconvert());
    m.def("pack", [](const std::string& f, Arr<const int8_t, nb::ndim<2>> w, Arr<uint8_t, nb::ndim<1>> out) {
        const Format fm = fmt_of(f);
        const int64_t N = (int64_t)w.shape(0), K = (int64_t)w.shape(1);
        need((int64_t)out.shape(0) == packed_bytes(fm, N, K), "pack: out has the wrong size");
        const int64_t bad = find_invalid_weight(fm, w.data(), N * K);
        if (bad >= 0)
            throw std::invalid_argument("pack: weight " + std::to_string((int)w.data()[bad]) + " at flat index " +
                                        std::to_string(bad) + " is outside the " + f + " alphabet");
        nb::gil_scoped_release g;
        pack(fm, w.data(), N, K, out.data());
    }, nb::arg("fmt"), nb::arg("w").noconvert(), nb::arg("out").noconvert());
    m.def("unpack", [](const std::string& f, Arr<const uint8_t, nb::ndim<1>> packed, Arr<int8_t, nb::ndim<2>> out) {
        const Format fm = fmt_of(f);
        const int64_t N = (int64_t)out.shape(0), K = (int64_t)out.shape(1);
        need((int64_t)packed.shape(0) == packed_bytes(fm, N, K), "unpack: packed has the wrong size");
        nb::gil_scoped_release g;
        unpack(fm, packed.data(), N, K, out.data());
    }, nb::arg("fmt"), nb::arg("packed").noconvert(), nb::arg("out").noconvert());

    // ---- activations ----
    m.def("quantize_activations", [](Arr<const float, nb::ndim<2>> x, Arr<int8_t, nb::ndim<2>> q,
                                     Arr<float, nb::ndim<1>> scale, Arr<int32_t, nb::ndim<1>> sums,
                                     std::optional<std::string> isa) {
        const Isa is = isa_of(isa);
        const int64_t M = (int64_t)x.shape(0), K = (int64_t)x.shape(1);
        need((int64_t)q.shape(0) == M && (int64_t)q.shape(1) >= K, "quantize_activations: q must be (M, >=K)");
        need((int64_t)scale.shape(0) == M && (int64_t)sums.shape(0) == M, "quantize_activations: scale/sums must be (M,)");
        nb::gil_scoped_release g;
        quantize_activations(x.data(), M, K, K, q.data(), (int64_t)q.shape(1), scale.data(), sums.data(), is);
    }, nb::arg("x").noconvert(), nb::arg("q").noconvert(), nb::arg("scale").noconvert(), nb::arg("sums").noconvert(),
       nb::arg("isa").none() = nb::none());

    // ---- matmuls ----
    m.def("gemm_a8", [](const std::string& f, Arr<const uint8_t, nb::ndim<1>> packed, int64_t N, int64_t K,
                        Arr<const int8_t, nb::ndim<2>> q, Arr<const float, nb::ndim<1>> xscale,
                        Arr<const int32_t, nb::ndim<1>> qsum, Arr<const float, nb::ndim<1>> wscale,
                        std::optional<Arr<const float, nb::ndim<1>>> bias, Arr<float, nb::ndim<2>> out,
                        std::optional<std::string> isa) {
        const Format fm = fmt_of(f);
        const Isa is = isa_of(isa);
        const int64_t M = (int64_t)q.shape(0);
        const int64_t bias_len = bias ? (int64_t)bias->shape(0) : 0;
        need_linear_shapes("gemm_a8", fm, (int64_t)packed.shape(0), N, K, M, (int64_t)wscale.shape(0),
                           bias ? &bias_len : nullptr, (int64_t)out.shape(0), (int64_t)out.shape(1));
        need((int64_t)q.shape(1) >= K, "gemm_a8: q must be (M, >=K)");
        need((int64_t)xscale.shape(0) == M && (int64_t)qsum.shape(0) == M, "gemm_a8: xscale/qsum must be (M,)");
        const float* b = bias ? bias->data() : nullptr;
        nb::gil_scoped_release g;
        gemm_a8(fm, packed.data(), N, K, q.data(), (int64_t)q.shape(1), xscale.data(), qsum.data(), M,
                wscale.data(), b, out.data(), is);
    }, nb::arg("fmt"), nb::arg("packed").noconvert(), nb::arg("N"), nb::arg("K"), nb::arg("q").noconvert(),
       nb::arg("xscale").noconvert(), nb::arg("qsum").noconvert(), nb::arg("wscale").noconvert(),
       nb::arg("bias").noconvert().none(), nb::arg("out").noconvert(), nb::arg("isa").none() = nb::none());

    m.def("linear_a8", [](const std::string& f, Arr<const uint8_t, nb::ndim<1>> packed, int64_t N, int64_t K,
                          Arr<const float, nb::ndim<2>> x, Arr<const float, nb::ndim<1>> wscale,
                          std::optional<Arr<const float, nb::ndim<1>>> bias, Arr<float, nb::ndim<2>> out,
                          std::optional<std::string> isa) {
        const Format fm = fmt_of(f);
        const Isa is = isa_of(isa);
        const int64_t M = (int64_t)x.shape(0);
        const int64_t bias_len = bias ? (int64_t)bias->shape(0) : 0;
        need_linear_shapes("linear_a8", fm, (int64_t)packed.shape(0), N, K, M, (int64_t)wscale.shape(0),
                           bias ? &bias_len : nullptr, (int64_t)out.shape(0), (int64_t)out.shape(1));
        need((int64_t)x.shape(1) == K, "linear_a8: x must be (M, K)");
        const float* b = bias ? bias->data() : nullptr;
        nb::gil_scoped_release g;
        const int64_t Kp = padded_k(fm, K);
        std::vector<int8_t> q((size_t)(M * Kp));  // (M, Kp), zero padded by the quantizer
        std::vector<float> s((size_t)M);
        std::vector<int32_t> sums((size_t)M);
        quantize_activations(x.data(), M, K, K, q.data(), Kp, s.data(), sums.data(), is);
        gemm_a8(fm, packed.data(), N, K, q.data(), Kp, s.data(), sums.data(), M, wscale.data(), b, out.data(), is);
    }, nb::arg("fmt"), nb::arg("packed").noconvert(), nb::arg("N"), nb::arg("K"), nb::arg("x").noconvert(),
       nb::arg("wscale").noconvert(), nb::arg("bias").noconvert().none(), nb::arg("out").noconvert(),
       nb::arg("isa").none() = nb::none());

    m.def("linear_f32", [](const std::string& f, Arr<const uint8_t, nb::ndim<1>> packed, int64_t N, int64_t K,
                           Arr<const float, nb::ndim<2>> x, Arr<const float, nb::ndim<1>> wscale,
                           std::optional<Arr<const float, nb::ndim<1>>> bias, Arr<float, nb::ndim<2>> out,
                           std::optional<std::string> isa) {
        const Format fm = fmt_of(f);
        const Isa is = isa_of(isa);
        const int64_t M = (int64_t)x.shape(0);
        const int64_t bias_len = bias ? (int64_t)bias->shape(0) : 0;
        need_linear_shapes("linear_f32", fm, (int64_t)packed.shape(0), N, K, M, (int64_t)wscale.shape(0),
                           bias ? &bias_len : nullptr, (int64_t)out.shape(0), (int64_t)out.shape(1));
        need((int64_t)x.shape(1) == K, "linear_f32: x must be (M, K)");
        const float* b = bias ? bias->data() : nullptr;
        nb::gil_scoped_release g;
        gemm_f32(fm, packed.data(), N, K, x.data(), K, M, wscale.data(), b, out.data(), is);
    }, nb::arg("fmt"), nb::arg("packed").noconvert(), nb::arg("N"), nb::arg("K"), nb::arg("x").noconvert(),
       nb::arg("wscale").noconvert(), nb::arg("bias").noconvert().none(), nb::arg("out").noconvert(),
       nb::arg("isa").none() = nb::none());

    // ---- raw-pointer twins of linear_a8 / linear_f32 for bitllm.kernels' hot path ----
    // A torch tensor costs ~3 us to cross nanobind via DLPack; a GEMV is 10-500 us. The Python
    // wrapper validates dtype/shape/contiguity/device first, then passes data_ptr()s here.
    // isa: -1 = active variant, else the Isa enum value. bias = 0 means no bias.
    m.def("linear_ptr", [](bool a8, int fmt, uintptr_t packed, int64_t N, int64_t K, uintptr_t x, int64_t M,
                           uintptr_t wscale, uintptr_t bias, uintptr_t out, int isa) {
        need(fmt >= 0 && fmt < kNumFormats, "linear_ptr: bad format");
        need(isa >= -1 && isa < kNumIsas, "linear_ptr: bad isa");
        need(packed && x && wscale && out && N > 0 && K > 0 && M >= 0, "linear_ptr: null pointer or bad shape");
        const Format fm = Format(fmt);
        const Isa is = Isa(isa);
        if (is != Isa::Best && !isa_supported(is)) throw std::invalid_argument("linear_ptr: variant not supported here");
        const float* xb = reinterpret_cast<const float*>(x);
        const float* b = bias ? reinterpret_cast<const float*>(bias) : nullptr;
        nb::gil_scoped_release g;
        if (a8) {
            const int64_t Kp = padded_k(fm, K);
            std::vector<int8_t> q((size_t)(M * Kp));  // (M, Kp), zero padded by the quantizer
            std::vector<float> s((size_t)M);
            std::vector<int32_t> sums((size_t)M);
            quantize_activations(xb, M, K, K, q.data(), Kp, s.data(), sums.data(), is);
            gemm_a8(fm, reinterpret_cast<const uint8_t*>(packed), N, K, q.data(), Kp, s.data(), sums.data(), M,
                    reinterpret_cast<const float*>(wscale), b, reinterpret_cast<float*>(out), is);
        } else {
            gemm_f32(fm, reinterpret_cast<const uint8_t*>(packed), N, K, xb, K, M, reinterpret_cast<const float*>(wscale),
                     b, reinterpret_cast<float*>(out), is);
        }
    }, nb::arg("a8"), nb::arg("fmt"), nb::arg("packed"), nb::arg("N"), nb::arg("K"), nb::arg("x"), nb::arg("M"),
       nb::arg("wscale"), nb::arg("bias"), nb::arg("out"), nb::arg("isa"));

    // ---- measurement ----
    m.def("stream_read_bandwidth", [](size_t bytes, int threads, int reps) {
        nb::gil_scoped_release g;
        return stream_read_bandwidth(bytes, threads, reps);
    }, nb::arg("bytes") = size_t(1) << 30, nb::arg("threads") = 1, nb::arg("reps") = 5,
       "Best-of-reps read-only streaming bandwidth (bytes/s) with `threads` threads.");
    m.def("cpu_model", []() { return std::string(cpu_model()); });
}
