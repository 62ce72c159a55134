// bitllm._core: the binding layer. It holds no math (STYLE.md "C++").
#include <nanobind/nanobind.h>

namespace nb = nanobind;

NB_MODULE(_core, m) {
    m.doc() = "bitllm native core";
    m.def("version", []() { return 1; });
}
