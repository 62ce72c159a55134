// bitllm native inference engine: the forward pass of the llama, bitnet and phi families over the
// packed 1/1.58-bit kernels (csrc/kernels.h), with a KV cache and several sequences per step.
// Pure C++17: no Python, no torch. The nanobind module (bind_engine.cpp) and the standalone test
// (test_engine_main.cpp) are thin shells over this header.
//
// Building a model:
//   Engine e(config);                 // config: string -> string (keys in docs/engine.md)
//   e.set_tensor("L.0.q.weight", ...) // every tensor, canonical names (docs/engine.md)
//   e.finalize();                     // checks that nothing is missing, builds the LM head
// Running it:
//   int s = e.add_sequence(capacity); // a KV-cache slot of `capacity` positions
//   e.forward(ids, n, tokens, offsets, last, logits);  // one batched step (prefill and/or decode)
//   e.remove_sequence(s);
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace bitllm {
namespace engine {

using Config = std::map<std::string, std::string>;

// Thrown for bad configs/tensors (Python maps it to FormatError / UnsupportedModelError).
struct EngineError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

enum class Family { Llama, BitNet, Phi };
enum class Act { SiLU, ReLU2, GeluNew, GeluErf, GeluTanh, ReLU };
enum class Method { A8, WeightOnly, OneBit };   // ternary/binary W×A8 | ternary weight-only | OneBit
enum class Layout { I2, T1, B1, HF, Int8 };     // file layout of the packed weights handed over
enum class HeadMode { F16, I8 };

// ---- config --------------------------------------------------------------------------------
struct ModelConfig {
    Family family = Family::Llama;
    int64_t vocab = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, ffn = 0;
    int64_t max_pos = 0;
    float norm_eps = 1e-6f;      // RMSNorm (llama, bitnet) or LayerNorm (phi) epsilon
    float rope_theta = 10000.f;
    int64_t rotary_dim = 0;      // leading dims of each head that RoPE rotates (phi: partial)
    Act act = Act::SiLU;
    Method method = Method::A8;
    Layout layout = Layout::I2;
    Format kernel_format = Format::I2;
    float linear_norm_eps = 1e-6f;  // PackedLinear's optional input RMSNorm
    float onebit_ln_eps = 1e-5f;    // OneBit's output LayerNorm (no affine)
    bool tied = false;
    HeadMode head = HeadMode::F16;
    bool kv_f16 = false;  // config "kv_dtype": "f32" (default) or "f16" (half the cache, rounded once)

    static ModelConfig parse(const Config& c);
};

// ---- weights -------------------------------------------------------------------------------
struct Linear {
    int64_t N = 0, K = 0;
    std::vector<uint8_t> packed;      // kernel layout, packed_bytes(kernel_format, N, K)
    std::vector<float> wscale;        // (N,) multiplier
    std::vector<float> bias;          // (N,) or empty
    std::vector<float> input_factor;  // OneBit g (K,) or empty
    std::vector<float> norm;          // input RMSNorm weight (K,) or empty
    bool has_weight = false, has_scale = false;
};

struct Norm {
    std::vector<float> w, b;  // (dim,), b only for LayerNorm
};

struct Layer {
    Norm attn_norm, ffn_norm, attn_sub_norm, ffn_sub_norm;
    Linear q, k, v, o, gate, up, down;  // phi: o = dense, up = fc1, down = fc2, no gate
    // q|k|v and gate|up stacked into one matrix (same input: one activation quantization, one GEMM)
    // when the layers have no per-layer input transform (input RMSNorm, OneBit g).
    Linear qkv, gate_up;
    bool fused_qkv = false, fused_gate_up = false;
};

// ---- per-sequence state --------------------------------------------------------------------
// A KV cache buffer left uninitialized: the OS hands out its pages as positions are written, so a
// sequence opened for 2048 tokens that stops after 20 costs 20 positions of memory, not 2048 (a
// zero fill touched every page up front: ~300 MB per 1k-token request on the 700M shape). The
// engine only reads positions it has written (< Sequence::len).
template <class T>
class KvBuffer {
public:
    void allocate(size_t n) {
        p_.reset(new T[n]);  // default-initialized: no write, no page touched
        n_ = n;
    }
    T* data() { return p_.get(); }
    const T* data() const { return p_.get(); }
    size_t size() const { return n_; }

private:
    std::unique_ptr<T[]> p_;
    size_t n_ = 0;
};

struct Sequence {
    int64_t len = 0, cap = 0;
    // (layers, kv_heads, cap, head_dim) each: one head's keys are contiguous. fp32 in k/v, or fp16
    // in k16/v16 when the config asks for kv_dtype f16 (the other pair stays empty).
    KvBuffer<float> k, v;
    KvBuffer<uint16_t> k16, v16;
};

class Engine {
public:
    explicit Engine(const Config& config);
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    const ModelConfig& config() const { return cfg_; }

    // dtype: "u8", "i8", "f16" (raw IEEE half bits), "f32". data is read during the call only.
    void set_tensor(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
                    const void* data);
    void finalize();
    bool finalized() const { return finalized_; }
    // Names of the tensors this config expects (for loaders and error messages).
    std::vector<std::string> expected_tensors() const;

    int add_sequence(int64_t capacity);
    void remove_sequence(int id);
    int64_t sequence_length(int id) const;
    // Forget positions >= len (e.g. to re-score a different continuation of a shared prefix).
    void truncate_sequence(int id, int64_t len);
    int num_sequences() const;

    // One step over n sequences: sequence ids[i] consumes tokens[offsets[i] .. offsets[i+1]).
    // logits: (Σ last[i], vocab), the rows of the last last[i] tokens of each sequence in order
    // (1 <= last[i] <= its token count; last = nullptr: 1 each, the next-token logits of a step).
    // The LM head runs on those rows only. Throws EngineError on a full cache, bad token ids, a bad
    // `last` or non-finite logits.
    void forward(const int* ids, int n, const int32_t* tokens, const int64_t* offsets, const int64_t* last,
                 float* logits);

    // Bytes held by weights (packed linears + embeddings + head + norms) and by KV caches.
    size_t weight_bytes() const;
    size_t kv_bytes() const;
    // Weight bytes read per decoded token (all linears + head), for roofline figures.
    size_t bytes_per_token() const;

private:
    ModelConfig cfg_;
    std::vector<uint16_t> embed_;    // (vocab, hidden) fp16
    std::vector<uint16_t> head16_;   // (vocab, hidden) fp16, empty if tied (then embed_ is used)
    std::vector<int8_t> head8_;      // (vocab, hidden) int8 per-row when head == I8
    std::vector<float> head8_scale_; // (vocab,)
    std::vector<float> head_bias_;   // (vocab,) or empty
    Norm final_norm_;
    std::vector<Layer> layers_;
    std::vector<std::unique_ptr<Sequence>> seqs_;
    bool finalized_ = false;

    // workspace (grown on demand)
    std::vector<float> x_, h_, qb_, kb_, vb_, ab_, ob_, f1_, f2_, tmp_, scores_, fz_;
    std::vector<int8_t> qact_;
    std::vector<float> xscale_;
    std::vector<int32_t> qsum_;
    std::vector<float> inv_freq_;

    Linear* linear_by_name(const std::string& layer_part, int64_t layer);
    void set_linear_tensor(Linear& L, const std::string& what, const std::string& name, const std::string& dtype,
                           const std::vector<int64_t>& shape, const void* data);
    void linear(const Linear& L, const float* x, int64_t M, float* out);
    void attention(const int* ids, int n, const int64_t* offsets, const std::vector<int64_t>& pos0, int64_t layer,
                   int64_t M);
    void head(const float* x, const int64_t* rows, int64_t nrows, float* logits);
};

// fp16 <-> fp32 (IEEE binary16, round to nearest even), portable.
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

// Load a model from an engine file: a safetensors file whose __metadata__ is the engine Config
// and whose tensors carry the canonical names (written by bitllm.engine.export_engine_file).
// `meta` receives the metadata (it may hold extra keys such as a golden token sequence).
std::unique_ptr<Engine> load_engine_file(const std::string& path, Config* meta = nullptr);

}  // namespace engine
}  // namespace bitllm
