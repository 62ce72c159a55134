// bitllm._engine: the binding layer of the native engine. No math: it checks arguments, releases
// the GIL and forwards to engine.h. (A module of its own so that the kernel module stays small.)
#include <algorithm>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include "engine.h"
#include "simd.h"

namespace nb = nanobind;
using namespace bitllm;
using engine::Engine;

template <class T, class... Extra>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;

static std::string dtype_name(const nb::ndarray<nb::c_contig, nb::device::cpu>& a) {
    const nb::dlpack::dtype d = a.dtype();
    if (d == nb::dtype<uint8_t>()) return "u8";
    if (d == nb::dtype<int8_t>()) return "i8";
    if (d == nb::dtype<float>()) return "f32";
    if (d.code == (uint8_t)nb::dlpack::dtype_code::Float && d.bits == 16 && d.lanes == 1) return "f16";
    throw engine::EngineError("set_tensor: unsupported dtype (expected uint8, int8, float16 or float32)");
}

NB_MODULE(_engine, m) {
    m.doc() = "bitllm native inference engine (see csrc/engine/engine.h)";
    nb::exception<engine::EngineError>(m, "EngineError", PyExc_ValueError);

    m.def("set_num_threads", &set_num_threads, nb::arg("n"));
    m.def("get_num_threads", &get_num_threads);
    m.def("active_isa", []() { return std::string(isa_name(active_isa())); });
    m.def("simd_name", []() { return std::string(engine::simd_name()); });

    nb::class_<Engine>(m, "Engine")
        .def(nb::init<const engine::Config&>(), nb::arg("config"))
        .def("set_tensor", [](Engine& e, const std::string& name, nb::ndarray<nb::c_contig, nb::device::cpu> a) {
            std::vector<int64_t> shape;
            for (size_t i = 0; i < a.ndim(); ++i) shape.push_back((int64_t)a.shape(i));
            const std::string dt = dtype_name(a);
            const void* p = a.data();
            nb::gil_scoped_release g;
            e.set_tensor(name, dt, shape, p);
        }, nb::arg("name"), nb::arg("array"))
        .def("finalize", &Engine::finalize)
        .def("expected_tensors", &Engine::expected_tensors)
        .def("add_sequence", &Engine::add_sequence, nb::arg("capacity"))
        .def("remove_sequence", &Engine::remove_sequence, nb::arg("id"))
        .def("sequence_length", &Engine::sequence_length, nb::arg("id"))
        .def("truncate_sequence", &Engine::truncate_sequence, nb::arg("id"), nb::arg("length"))
        .def("num_sequences", &Engine::num_sequences)
        .def("forward", [](Engine& e, Arr<const int32_t, nb::ndim<1>> ids, Arr<const int32_t, nb::ndim<1>> tokens,
                           Arr<const int64_t, nb::ndim<1>> offsets, Arr<const int64_t, nb::ndim<1>> last,
                           Arr<float, nb::ndim<2>> out) {
            const int n = (int)ids.shape(0);
            if ((int64_t)offsets.shape(0) != n + 1) throw engine::EngineError("forward: offsets must have n+1 entries");
            const int64_t M = offsets.data()[n];
            if (offsets.data()[0] != 0 || M != (int64_t)tokens.shape(0))
                throw engine::EngineError("forward: offsets must run from 0 to len(tokens)");
            for (int i = 0; i < n; ++i)
                if (offsets.data()[i + 1] <= offsets.data()[i]) throw engine::EngineError("forward: offsets must increase");
            if ((int64_t)last.shape(0) != n) throw engine::EngineError("forward: last must have one entry per sequence");
            int64_t rows = 0;  // Engine::forward checks 1 <= last[i] <= the sequence's tokens
            for (int i = 0; i < n; ++i) rows += std::min(std::max<int64_t>(last.data()[i], 0), M);
            if ((int64_t)out.shape(0) != rows || (int64_t)out.shape(1) != e.config().vocab)
                throw engine::EngineError("forward: logits buffer must be (sum(last), vocab)");
            static_assert(sizeof(int) == sizeof(int32_t), "int is 32-bit");
            nb::gil_scoped_release g;
            e.forward((const int*)ids.data(), n, tokens.data(), offsets.data(), last.data(), out.data());
        }, nb::arg("ids").noconvert(), nb::arg("tokens").noconvert(), nb::arg("offsets").noconvert(),
           nb::arg("last").noconvert(), nb::arg("out").noconvert())  // noconvert: a converted copy of `out`
                                                                      // would swallow the logits; of tokens, wrap ids
        .def_prop_ro("vocab", [](const Engine& e) { return e.config().vocab; })
        .def_prop_ro("max_pos", [](const Engine& e) { return e.config().max_pos; })
        .def("weight_bytes", &Engine::weight_bytes)
        .def("kv_bytes", &Engine::kv_bytes)
        .def("bytes_per_token", &Engine::bytes_per_token);

    m.def("load_engine_file", [](const std::string& path) {
        engine::Config meta;
        std::unique_ptr<Engine> e;
        {
            nb::gil_scoped_release g;
            e = engine::load_engine_file(path, &meta);
        }
        return std::make_pair(std::move(e), meta);
    }, nb::arg("path"));
}
