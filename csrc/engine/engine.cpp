// bitllm native engine: config / weights / run state, then the forward pass (see engine.h).
// Every linear layer runs through csrc/kernels.h; norms, RoPE, softmax and the head run in fp32.
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "simd.h"

namespace bitllm {
namespace engine {

// ============================================================================================
// fp16
// ============================================================================================

float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                ++e;
                mant <<= 1;
            } while (!(mant & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN / inf
    if (ax >= 0x477FF000u) return sign | 0x7C00u;                                   // overflow -> inf
    if (ax < 0x38800000u) {                                                         // subnormal or 0
        if (ax < 0x33000000u) return sign;
        const uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
        const int shift = 126 - (int)e;  // 14 + (113 - e) - ... : value = m * 2^(e-150), unit 2^-24
        const uint32_t q = m >> (shift - 0), rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        uint32_t r = q;
        if (rem > half || (rem == half && (q & 1u))) ++r;
        return sign | (uint16_t)r;
    }
    uint32_t r = ax - 0x38000000u;  // rebias exponent 127 -> 15
    const uint32_t rem = r & 0x1FFFu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return sign | (uint16_t)r;
}

// ============================================================================================
// Config
// ============================================================================================

static const std::string& need_key(const Config& c, const std::string& k) {
    auto it = c.find(k);
    if (it == c.end()) throw EngineError("engine config: missing key '" + k + "'");
    return it->second;
}
static int64_t get_int(const Config& c, const std::string& k) {
    const std::string& v = need_key(c, k);
    try {
        size_t pos = 0;
        const long long r = std::stoll(v, &pos);
        if (pos != v.size()) throw std::invalid_argument(v);
        return r;
    } catch (const std::exception&) {
        throw EngineError("engine config: '" + k + "' = '" + v + "' is not an integer");
    }
}
static float get_float(const Config& c, const std::string& k, float dflt) {
    auto it = c.find(k);
    if (it == c.end()) return dflt;
    float r = 0.f;
    try {
        r = std::stof(it->second);
    } catch (const std::exception&) {
        throw EngineError("engine config: '" + k + "' = '" + it->second + "' is not a number");
    }
    if (!std::isfinite(r)) throw EngineError("engine config: '" + k + "' = '" + it->second + "' is not finite");
    return r;
}
static std::string get_str(const Config& c, const std::string& k, const std::string& dflt) {
    auto it = c.find(k);
    return it == c.end() ? dflt : it->second;
}

ModelConfig ModelConfig::parse(const Config& c) {
    ModelConfig m;
    const std::string fam = need_key(c, "family");
    if (fam == "llama") m.family = Family::Llama;
    else if (fam == "bitnet") m.family = Family::BitNet;
    else if (fam == "phi") m.family = Family::Phi;
    else throw EngineError("engine config: family '" + fam + "' is not one of llama, bitnet, phi");
    m.vocab = get_int(c, "vocab");
    m.hidden = get_int(c, "hidden");
    m.layers = get_int(c, "layers");
    m.heads = get_int(c, "heads");
    m.kv_heads = get_int(c, "kv_heads");
    m.head_dim = get_int(c, "head_dim");
    m.ffn = get_int(c, "ffn");
    m.max_pos = get_int(c, "max_pos");
    m.rotary_dim = get_int(c, "rotary_dim");
    m.norm_eps = get_float(c, "norm_eps", 1e-6f);
    m.rope_theta = get_float(c, "rope_theta", 10000.f);
    m.linear_norm_eps = get_float(c, "linear_norm_eps", 1e-6f);
    m.onebit_ln_eps = get_float(c, "onebit_ln_eps", 1e-5f);
    m.tied = get_str(c, "tied", "0") == "1";
    if (m.vocab <= 0 || m.hidden <= 0 || m.layers <= 0 || m.heads <= 0 || m.kv_heads <= 0 || m.head_dim <= 0 ||
        m.ffn <= 0 || m.max_pos <= 0)
        throw EngineError("engine config: every dimension must be positive");
    // Upper bounds far above any real model, so that a corrupt config fails here instead of in an
    // allocation (layers, RoPE table) or an overflowing product (heads * head_dim, vocab * hidden).
    const struct { const char* name; int64_t v, max; } lim[] = {
        {"vocab", m.vocab, INT32_MAX},  {"hidden", m.hidden, 1 << 20},     {"layers", m.layers, 1 << 12},
        {"heads", m.heads, 1 << 14},    {"kv_heads", m.kv_heads, 1 << 14}, {"head_dim", m.head_dim, 1 << 14},
        {"ffn", m.ffn, 1 << 22},        {"max_pos", m.max_pos, INT32_MAX},
    };
    for (const auto& d : lim)
        if (d.v > d.max)
            throw EngineError("engine config: " + std::string(d.name) + " = " + std::to_string(d.v) +
                              " is larger than the engine supports (" + std::to_string(d.max) + ")");
    if (m.heads % m.kv_heads) throw EngineError("engine config: heads must be a multiple of kv_heads");
    if (m.rotary_dim < 0 || m.rotary_dim > m.head_dim || m.rotary_dim % 2)
        throw EngineError("engine config: rotary_dim must be even and <= head_dim");

    const std::string act = need_key(c, "act");
    if (act == "silu" || act == "swish") m.act = Act::SiLU;
    else if (act == "relu2") m.act = Act::ReLU2;
    else if (act == "gelu_new" || act == "gelu_python_tanh") m.act = Act::GeluNew;
    else if (act == "gelu" || act == "gelu_python") m.act = Act::GeluErf;
    else if (act == "gelu_pytorch_tanh") m.act = Act::GeluTanh;
    else if (act == "relu") m.act = Act::ReLU;
    else throw EngineError("engine config: activation '" + act + "' is not supported");

    const std::string method = need_key(c, "method");
    if (method == "ternary" || method == "binary") m.method = Method::A8;
    else if (method == "ternary-wo") m.method = Method::WeightOnly;
    else if (method == "onebit") m.method = Method::OneBit;
    else throw EngineError("engine config: method '" + method + "' is not supported");
    const bool binary = method == "binary" || method == "onebit";

    const std::string layout = need_key(c, "layout");
    if (layout == "i2") m.layout = Layout::I2;
    else if (layout == "t1") m.layout = Layout::T1;
    else if (layout == "b1") m.layout = Layout::B1;
    else if (layout == "hf") m.layout = Layout::HF;
    else if (layout == "int8") m.layout = Layout::Int8;
    else throw EngineError("engine config: layout '" + layout + "' is not one of i2, t1, b1, hf, int8");

    const std::string kf = get_str(c, "kernel_format", binary ? "b1" : (layout == "t1" ? "t1" : "i2"));
    if (!parse_format(kf.c_str(), &m.kernel_format)) throw EngineError("engine config: bad kernel_format '" + kf + "'");
    if (binary != (m.kernel_format == Format::B1))
        throw EngineError("engine config: kernel_format '" + kf + "' does not hold " + (binary ? "binary" : "ternary") +
                          " weights");
    const std::string head = get_str(c, "head", "f16");
    if (head == "f16") m.head = HeadMode::F16;
    else if (head == "i8") m.head = HeadMode::I8;
    else throw EngineError("engine config: head '" + head + "' is not f16 or i8");
    const std::string kv = get_str(c, "kv_dtype", "f32");
    if (kv != "f32" && kv != "f16") throw EngineError("engine config: kv_dtype '" + kv + "' is not f32 or f16");
    m.kv_f16 = kv == "f16";
    if (m.family == Family::Phi && m.kv_heads != m.heads) throw EngineError("engine config: phi has no GQA");
    return m;
}

// ============================================================================================
// Weights: building
// ============================================================================================

Engine::Engine(const Config& config) : cfg_(ModelConfig::parse(config)) {
    layers_.resize((size_t)cfg_.layers);
    const int64_t qd = cfg_.heads * cfg_.head_dim, kvd = cfg_.kv_heads * cfg_.head_dim, H = cfg_.hidden;
    for (auto& L : layers_) {
        L.q.N = qd, L.q.K = H;
        L.k.N = kvd, L.k.K = H;
        L.v.N = kvd, L.v.K = H;
        L.o.N = H, L.o.K = qd;
        L.gate.N = cfg_.ffn, L.gate.K = H;
        L.up.N = cfg_.ffn, L.up.K = H;
        L.down.N = H, L.down.K = cfg_.ffn;
    }
    // RoPE inverse frequencies as transformers computes them: 1 / base^(arange(0, d, 2) / d) in fp32
    for (int64_t i = 0; i < cfg_.rotary_dim; i += 2)
        inv_freq_.push_back(1.0f / std::pow(cfg_.rope_theta, (float)i / (float)cfg_.rotary_dim));
}

static const char* kLinearNames[] = {"q", "k", "v", "o", "gate", "up", "down"};

std::vector<std::string> Engine::expected_tensors() const {
    std::vector<std::string> r{"embed", "norm.w"};
    const bool phi = cfg_.family == Family::Phi;
    if (phi) r.push_back("norm.b");
    if (!cfg_.tied) r.push_back("head.w");
    for (int64_t l = 0; l < cfg_.layers; ++l) {
        const std::string p = "L." + std::to_string(l) + ".";
        r.push_back(p + "attn_norm.w");
        if (phi) r.push_back(p + "attn_norm.b");
        else r.push_back(p + "ffn_norm.w");
        if (cfg_.family == Family::BitNet) {
            r.push_back(p + "attn_sub_norm.w");
            r.push_back(p + "ffn_sub_norm.w");
        }
        for (const char* n : kLinearNames) {
            if (phi && std::string(n) == "gate") continue;
            r.push_back(p + n + ".weight");
            r.push_back(p + n + ".scale");
            if (cfg_.method == Method::OneBit) r.push_back(p + n + ".g");
        }
    }
    return r;
}

static int64_t numel(const std::vector<int64_t>& s) {
    int64_t n = 1;
    for (auto d : s) n *= d;
    return n;
}
static std::string shape_str(const std::vector<int64_t>& s) {
    std::ostringstream o;
    o << "(";
    for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
    o << (s.size() == 1 ? ",)" : ")");
    return o.str();
}

// fp32 copy of a float tensor of `n` elements (f32 or f16 input), NaN/inf rejected.
static std::vector<float> floats(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
                                 const void* data, int64_t n) {
    if (numel(shape) != n)
        throw EngineError("tensor '" + name + "': shape " + shape_str(shape) + " should hold " + std::to_string(n) +
                          " values");
    std::vector<float> v((size_t)n);
    if (dtype == "f32") std::memcpy(v.data(), data, (size_t)n * 4);
    else if (dtype == "f16")
        for (int64_t i = 0; i < n; ++i) v[i] = half_to_float(((const uint16_t*)data)[i]);
    else throw EngineError("tensor '" + name + "': dtype " + dtype + " is not f32 or f16");
    for (float f : v)
        if (!std::isfinite(f)) throw EngineError("tensor '" + name + "' holds NaN/inf");
    return v;
}

static std::vector<uint16_t> halves(const std::string& name, const std::string& dtype,
                                    const std::vector<int64_t>& shape, const void* data, int64_t rows, int64_t cols) {
    if (shape.size() != 2 || shape[0] != rows || shape[1] != cols)
        throw EngineError("tensor '" + name + "': shape " + shape_str(shape) + ", expected (" + std::to_string(rows) +
                          ", " + std::to_string(cols) + ")");
    std::vector<uint16_t> v((size_t)(rows * cols));
    if (dtype == "f16") std::memcpy(v.data(), data, v.size() * 2);
    else if (dtype == "f32")
        for (size_t i = 0; i < v.size(); ++i) v[i] = float_to_half(((const float*)data)[i]);
    else throw EngineError("tensor '" + name + "': dtype " + dtype + " is not f16 or f32");
    for (uint16_t h : v)
        if ((h & 0x7C00u) == 0x7C00u) throw EngineError("tensor '" + name + "' holds NaN/inf (in fp16)");
    return v;
}

// File layouts (docs/formats.md) -> int8 (N, K). Throws on invalid codes.
static std::vector<int8_t> unpack_file(Layout layout, const std::string& name, const std::string& dtype,
                                       const std::vector<int64_t>& shape, const uint8_t* d, int64_t N, int64_t K) {
    std::vector<int8_t> w((size_t)(N * K));
    auto expect = [&](int64_t rows, int64_t cols, const char* want) {
        if (dtype != want || shape.size() != 2 || shape[0] != rows || shape[1] != cols)
            throw EngineError("tensor '" + name + "': " + dtype + " " + shape_str(shape) + ", expected " + want + " (" +
                              std::to_string(rows) + ", " + std::to_string(cols) + ")");
    };
    auto bad = [&](int64_t n, int64_t k) {
        throw EngineError("tensor '" + name + "': invalid packed code at row " + std::to_string(n) + ", column " +
                          std::to_string(k));
    };
    switch (layout) {
        case Layout::I2: {
            const int64_t nb = (K + 3) / 4;
            expect(N, nb, "u8");
            // byte -> its 4 weights (first column in the low bits); code 3 is invalid
            int8_t lut[256][4];
            bool ok[256];
            for (int b = 0; b < 256; ++b) {
                ok[b] = true;
                for (int i = 0; i < 4; ++i) {
                    const int c = (b >> (2 * i)) & 3;
                    ok[b] = ok[b] && c != 3;
                    lut[b][i] = (int8_t)(c - 1);
                }
            }
            for (int64_t n = 0; n < N; ++n) {
                const uint8_t* row = d + n * nb;
                int8_t* wr = w.data() + n * K;
                for (int64_t j = 0; j < nb; ++j) {
                    const uint8_t b = row[j];
                    if (!ok[b]) {
                        for (int i = 0; i < 4; ++i)
                            if (((b >> (2 * i)) & 3) == 3 && 4 * j + i < K) bad(n, 4 * j + i);
                    }
                    if (4 * j + 4 <= K) std::memcpy(wr + 4 * j, lut[b], 4);
                    else
                        for (int64_t i = 0; 4 * j + i < K; ++i) wr[4 * j + i] = lut[b][i];
                }
            }
            break;
        }
        case Layout::T1: {
            const int64_t nb = (K + 4) / 5;
            expect(N, nb, "u8");
            int8_t lut[243][5];  // byte -> its 5 weights (first column = least significant trit)
            for (int b = 0; b < 243; ++b)
                for (int i = 0, v = b; i < 5; ++i, v /= 3) lut[b][i] = (int8_t)(v % 3 - 1);
            for (int64_t n = 0; n < N; ++n) {
                const uint8_t* row = d + n * nb;
                int8_t* wr = w.data() + n * K;
                for (int64_t j = 0; j < nb; ++j) {
                    const uint8_t b = row[j];
                    if (b >= 243) bad(n, 5 * j);
                    for (int64_t i = 0; i < 5 && 5 * j + i < K; ++i) wr[5 * j + i] = lut[b][i];
                }
            }
            break;
        }
        case Layout::B1: {
            const int64_t nb = (K + 7) / 8;
            expect(N, nb, "u8");
            for (int64_t n = 0; n < N; ++n)
                for (int64_t k = 0; k < K; ++k) w[n * K + k] = ((d[n * nb + k / 8] >> (k % 8)) & 1) ? -1 : 1;
            break;
        }
        case Layout::HF: {  // 4 values per byte along the output axis, in 4 row blocks
            const int64_t rp = (N + 3) / 4;
            expect(rp, K, "u8");
            for (int64_t n = 0; n < N; ++n) {
                const int64_t i = n / rp, r = n % rp;
                for (int64_t k = 0; k < K; ++k) {
                    const int c = (d[r * K + k] >> (2 * i)) & 3;
                    if (c == 3) bad(n, k);
                    w[n * K + k] = (int8_t)(c - 1);
                }
            }
            break;
        }
        case Layout::Int8: {
            expect(N, K, "i8");
            std::memcpy(w.data(), d, w.size());
            break;
        }
    }
    return w;
}

void Engine::set_linear_tensor(Linear& L, const std::string& what, const std::string& name, const std::string& dtype,
                               const std::vector<int64_t>& shape, const void* data) {
    if (what == "weight") {
        const Layout layout = dtype == "i8" ? Layout::Int8 : cfg_.layout;
        std::vector<int8_t> w = unpack_file(layout, name, dtype, shape, (const uint8_t*)data, L.N, L.K);
        // ternary files hold only {-1,0,1}; a binary kernel format (or raw int8) needs the check
        if (layout == Layout::Int8 || cfg_.kernel_format == Format::B1) {
            const int64_t bad = find_invalid_weight(cfg_.kernel_format, w.data(), (int64_t)w.size());
            if (bad >= 0)
                throw EngineError("tensor '" + name + "': weight " + std::to_string((int)w[bad]) + " at row " +
                                  std::to_string(bad / L.K) + " does not fit kernel format " +
                                  format_name(cfg_.kernel_format));
        }
        L.packed.assign((size_t)packed_bytes(cfg_.kernel_format, L.N, L.K), 0);
        pack(cfg_.kernel_format, w.data(), L.N, L.K, L.packed.data());  // on the thread pool
        L.has_weight = true;
    } else if (what == "scale") {
        const int64_t n = numel(shape);
        if (n != 1 && n != L.N)
            throw EngineError("tensor '" + name + "': " + std::to_string(n) + " scales, expected 1 or " + std::to_string(L.N));
        std::vector<float> s = floats(name, dtype, shape, data, n);
        L.wscale.assign((size_t)L.N, s[0]);
        if (n == L.N) L.wscale = s;
        L.has_scale = true;
    } else if (what == "bias") {
        L.bias = floats(name, dtype, shape, data, L.N);
    } else if (what == "g") {
        L.input_factor = floats(name, dtype, shape, data, L.K);
    } else if (what == "norm") {
        L.norm = floats(name, dtype, shape, data, L.K);
    } else {
        throw EngineError("unknown tensor '" + name + "'");
    }
}

Linear* Engine::linear_by_name(const std::string& part, int64_t l) {
    Layer& L = layers_[(size_t)l];
    if (part == "q") return &L.q;
    if (part == "k") return &L.k;
    if (part == "v") return &L.v;
    if (part == "o") return &L.o;
    if (part == "gate" && cfg_.family != Family::Phi) return &L.gate;
    if (part == "up") return &L.up;
    if (part == "down") return &L.down;
    return nullptr;
}

void Engine::set_tensor(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
                        const void* data) {
    if (finalized_) throw EngineError("set_tensor after finalize()");
    const int64_t H = cfg_.hidden;
    if (name == "embed") {
        embed_ = halves(name, dtype, shape, data, cfg_.vocab, H);
        return;
    }
    if (name == "head.w") {
        if (cfg_.tied) throw EngineError("tensor 'head.w' given but the config says the head is tied");
        head16_ = halves(name, dtype, shape, data, cfg_.vocab, H);
        return;
    }
    if (name == "head.b") {
        head_bias_ = floats(name, dtype, shape, data, cfg_.vocab);
        return;
    }
    if (name == "norm.w") {
        final_norm_.w = floats(name, dtype, shape, data, H);
        return;
    }
    if (name == "norm.b") {
        final_norm_.b = floats(name, dtype, shape, data, H);
        return;
    }
    // L.<i>.<part>.<what>
    if (name.rfind("L.", 0) == 0) {
        const size_t d1 = name.find('.', 2);
        const size_t d2 = d1 == std::string::npos ? d1 : name.find('.', d1 + 1);
        if (d2 != std::string::npos) {
            int64_t l = -1;
            try {
                l = std::stoll(name.substr(2, d1 - 2));
            } catch (const std::exception&) {
            }
            if (l < 0 || l >= cfg_.layers) throw EngineError("tensor '" + name + "': no such layer");
            const std::string part = name.substr(d1 + 1, d2 - d1 - 1), what = name.substr(d2 + 1);
            Layer& Ly = layers_[(size_t)l];
            const int64_t sub_ffn = cfg_.ffn;
            if (what == "w" || what == "b") {
                Norm* nrm = nullptr;
                int64_t dim = H;
                if (part == "attn_norm") nrm = &Ly.attn_norm;
                else if (part == "ffn_norm") nrm = &Ly.ffn_norm;
                else if (part == "attn_sub_norm") nrm = &Ly.attn_sub_norm;
                else if (part == "ffn_sub_norm") nrm = &Ly.ffn_sub_norm, dim = sub_ffn;
                if (nrm) {
                    (what == "w" ? nrm->w : nrm->b) = floats(name, dtype, shape, data, dim);
                    return;
                }
            }
            if (Linear* L = linear_by_name(part, l)) {
                set_linear_tensor(*L, what, name, dtype, shape, data);
                return;
            }
        }
    }
    throw EngineError("unknown tensor '" + name + "' for a " + std::to_string(cfg_.layers) + "-layer model");
}

// Stack linears that share their input into one (rows one after another). The row-major layout
// (I2) concatenates its packed bytes; the tiled ones (T1, B1) are unpacked and packed again, once,
// at load. The parts are emptied.
static bool fuse(std::vector<Linear*> parts, Format f, Linear& out) {
    for (const Linear* p : parts)
        if (!p->norm.empty() || !p->input_factor.empty() || p->K != parts[0]->K) return false;
    // rows one after another: the matrix of N rows is N rows long (the tiled layouts pad to whole tiles)
    const bool row_major = packed_bytes(f, 1, parts[0]->K) == row_bytes(f, parts[0]->K);
    std::vector<int8_t> rows;  // (Σ N, K) int8, for the tiled layouts
    if (!row_major) {
        int64_t n = 0;
        for (const Linear* p : parts) n += p->N;
        rows.resize((size_t)(n * parts[0]->K));
        n = 0;
        for (const Linear* p : parts) {
            unpack(f, p->packed.data(), p->N, p->K, rows.data() + n * p->K);
            n += p->N;
        }
    }
    bool any_bias = false;
    for (Linear* p : parts) any_bias = any_bias || !p->bias.empty();
    out = Linear();
    out.K = parts[0]->K;
    for (Linear* p : parts) {
        out.N += p->N;
        if (row_major) out.packed.insert(out.packed.end(), p->packed.begin(), p->packed.end());
        out.wscale.insert(out.wscale.end(), p->wscale.begin(), p->wscale.end());
        if (any_bias) {
            if (p->bias.empty()) out.bias.insert(out.bias.end(), (size_t)p->N, 0.f);
            else out.bias.insert(out.bias.end(), p->bias.begin(), p->bias.end());
        }
        std::vector<uint8_t>().swap(p->packed);
    }
    if (!row_major) {
        out.packed.assign((size_t)packed_bytes(f, out.N, out.K), 0);
        pack(f, rows.data(), out.N, out.K, out.packed.data());
    }
    out.has_weight = out.has_scale = true;
    return true;
}

void Engine::finalize() {
    std::vector<std::string> missing;
    auto chk = [&](bool ok, const std::string& n) {
        if (!ok) missing.push_back(n);
    };
    const bool phi = cfg_.family == Family::Phi, bitnet = cfg_.family == Family::BitNet;
    chk(!embed_.empty(), "embed");
    chk(!final_norm_.w.empty(), "norm.w");
    if (phi) chk(!final_norm_.b.empty(), "norm.b");
    if (!cfg_.tied) chk(!head16_.empty(), "head.w");
    for (int64_t l = 0; l < cfg_.layers; ++l) {
        const std::string p = "L." + std::to_string(l) + ".";
        Layer& L = layers_[(size_t)l];
        chk(!L.attn_norm.w.empty(), p + "attn_norm.w");
        if (phi) chk(!L.attn_norm.b.empty(), p + "attn_norm.b");
        else chk(!L.ffn_norm.w.empty(), p + "ffn_norm.w");
        if (bitnet) {
            chk(!L.attn_sub_norm.w.empty(), p + "attn_sub_norm.w");
            chk(!L.ffn_sub_norm.w.empty(), p + "ffn_sub_norm.w");
        }
        for (const char* n : kLinearNames) {
            Linear* lin = linear_by_name(n, l);
            if (!lin) continue;
            chk(lin->has_weight, p + n + ".weight");
            chk(lin->has_scale, p + n + ".scale");
            if (cfg_.method == Method::OneBit) chk(!lin->input_factor.empty(), p + n + ".g");
        }
    }
    if (!missing.empty()) {
        std::string m = "engine: " + std::to_string(missing.size()) + " tensor(s) missing, e.g.";
        for (size_t i = 0; i < missing.size() && i < 5; ++i) m += " '" + missing[i] + "'";
        throw EngineError(m);
    }
    if (cfg_.method != Method::OneBit)
        for (auto& L : layers_) {
            L.fused_qkv = fuse({&L.q, &L.k, &L.v}, cfg_.kernel_format, L.qkv);
            if (cfg_.family != Family::Phi) L.fused_gate_up = fuse({&L.gate, &L.up}, cfg_.kernel_format, L.gate_up);
        }
    if (cfg_.head == HeadMode::I8) {  // int8 per row: scale = max|w| / 127, q = round(w / scale)
        const std::vector<uint16_t>& src = cfg_.tied ? embed_ : head16_;
        const int64_t V = cfg_.vocab, H = cfg_.hidden;
        head8_.resize((size_t)(V * H));
        head8_scale_.resize((size_t)V);
        std::vector<float> row((size_t)H);
        for (int64_t n = 0; n < V; ++n) {
            float amax = 0.f;
            for (int64_t k = 0; k < H; ++k) amax = std::max(amax, std::fabs(row[k] = half_to_float(src[n * H + k])));
            const float s = amax > 0.f ? amax / 127.f : 1.f;
            head8_scale_[n] = s;
            for (int64_t k = 0; k < H; ++k)
                head8_[n * H + k] = (int8_t)std::max(-127.f, std::min(127.f, std::nearbyint(row[k] / s)));
        }
        std::vector<uint16_t>().swap(head16_);  // the fp16 head is no longer needed
    }
    finalized_ = true;
}

size_t Engine::weight_bytes() const {
    size_t b = embed_.size() * 2 + head16_.size() * 2 + head8_.size() + head8_scale_.size() * 4 + head_bias_.size() * 4;
    auto lin = [](const Linear& L) {
        return L.packed.size() + 4 * (L.wscale.size() + L.bias.size() + L.input_factor.size() + L.norm.size());
    };
    for (const auto& L : layers_)
        b += lin(L.q) + lin(L.k) + lin(L.v) + lin(L.o) + lin(L.gate) + lin(L.up) + lin(L.down) + lin(L.qkv) +
             lin(L.gate_up) +
             4 * (L.attn_norm.w.size() + L.attn_norm.b.size() + L.ffn_norm.w.size() + L.attn_sub_norm.w.size() +
                  L.ffn_sub_norm.w.size());
    return b;
}

size_t Engine::bytes_per_token() const {
    size_t b = 0;
    for (const auto& L : layers_)
        b += L.q.packed.size() + L.k.packed.size() + L.v.packed.size() + L.o.packed.size() + L.gate.packed.size() +
             L.up.packed.size() + L.down.packed.size() + L.qkv.packed.size() + L.gate_up.packed.size();
    const size_t VH = (size_t)(cfg_.vocab * cfg_.hidden);
    b += cfg_.head == HeadMode::I8 ? VH : 2 * VH;
    return b;
}

size_t Engine::kv_bytes() const {
    size_t b = 0;
    for (const auto& s : seqs_)
        if (s) b += (s->k.size() + s->v.size()) * 4 + (s->k16.size() + s->v16.size()) * 2;
    return b;
}

// ============================================================================================
// Sequences
// ============================================================================================

int Engine::add_sequence(int64_t capacity) {
    if (capacity <= 0 || capacity > cfg_.max_pos)
        throw EngineError("sequence capacity " + std::to_string(capacity) + " is outside 1.." +
                          std::to_string(cfg_.max_pos) + " (the model's context)");
    // (layers, kv_heads, capacity, head_dim) values per cache; checked so a huge capacity cannot wrap
    int64_t n64 = 0;
    if (__builtin_mul_overflow(cfg_.layers * cfg_.kv_heads * cfg_.head_dim, capacity, &n64) ||
        n64 > (INT64_MAX / 8))
        throw EngineError("sequence capacity " + std::to_string(capacity) + ": the KV cache would not fit in memory");
    auto s = std::make_unique<Sequence>();
    s->cap = capacity;
    const size_t n = (size_t)n64;
    if (cfg_.kv_f16) {
        s->k16.allocate(n);
        s->v16.allocate(n);
    } else {
        s->k.allocate(n);
        s->v.allocate(n);
    }
    for (size_t i = 0; i < seqs_.size(); ++i)
        if (!seqs_[i]) {
            seqs_[i] = std::move(s);
            return (int)i;
        }
    seqs_.push_back(std::move(s));
    return (int)seqs_.size() - 1;
}

static Sequence& seq_at(std::vector<std::unique_ptr<Sequence>>& v, int id) {
    if (id < 0 || id >= (int)v.size() || !v[(size_t)id]) throw EngineError("no sequence " + std::to_string(id));
    return *v[(size_t)id];
}

void Engine::remove_sequence(int id) {
    seq_at(seqs_, id);
    seqs_[(size_t)id].reset();
}
int64_t Engine::sequence_length(int id) const {
    return seq_at(const_cast<std::vector<std::unique_ptr<Sequence>>&>(seqs_), id).len;
}
void Engine::truncate_sequence(int id, int64_t len) {
    Sequence& s = seq_at(seqs_, id);
    if (len < 0 || len > s.len) throw EngineError("truncate_sequence: length out of range");
    s.len = len;
}
int Engine::num_sequences() const {
    int n = 0;
    for (const auto& s : seqs_) n += s != nullptr;
    return n;
}

// ============================================================================================
// Forward pass: elementwise pieces (fp32, in transformers' op order where it matters)
// ============================================================================================

// Rows per chunk so that a chunk holds at least ~32k elements (below that a thread costs more
// than it brings).
static int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D)); }

// HF RMSNorm: w * (x * rsqrt(mean(x^2) + eps))
static void rmsnorm(const float* x, const float* w, float eps, int64_t M, int64_t D, float* out) {
    parallel_for(M, row_grain(D), [&](int64_t m0, int64_t m1, int) {
        for (int64_t m = m0; m < m1; ++m) {
            const float* xr = x + m * D;
            float* o = out + m * D;
            double ss = 0;
            for (int64_t d = 0; d < D; ++d) ss += (double)xr[d] * xr[d];
            const float r = 1.0f / std::sqrt((float)(ss / D) + eps);
            for (int64_t d = 0; d < D; ++d) o[d] = w[d] * (xr[d] * r);
        }
    });
}

// torch LayerNorm: (x - mean) / sqrt(var + eps) * w + b (biased variance); w, b may be null
static void layernorm(const float* x, const float* w, const float* b, float eps, int64_t M, int64_t D, float* out) {
    parallel_for(M, row_grain(D), [&](int64_t m0, int64_t m1, int) {
        for (int64_t m = m0; m < m1; ++m) {
            const float* xr = x + m * D;
            float* o = out + m * D;
            double s = 0, ss = 0;
            for (int64_t d = 0; d < D; ++d) s += xr[d];
            const double mean = s / D;
            for (int64_t d = 0; d < D; ++d) ss += (xr[d] - mean) * (xr[d] - mean);
            const float rstd = 1.0f / std::sqrt((float)(ss / D) + eps);
            const float mf = (float)mean;
            for (int64_t d = 0; d < D; ++d) {
                float y = (xr[d] - mf) * rstd;
                if (w) y = y * w[d];
                if (b) y = y + b[d];
                o[d] = y;
            }
        }
    });
}

static inline float act_fn(Act a, float x) {
    switch (a) {
        case Act::SiLU: return x / (1.0f + std::exp(-x));
        case Act::ReLU2: {
            const float r = x > 0.f ? x : 0.f;
            return r * r;
        }
        case Act::ReLU: return x > 0.f ? x : 0.f;
        case Act::GeluNew:
        case Act::GeluTanh:
            return 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * (x * x * x))));
        case Act::GeluErf: return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
    }
    return x;
}

// out[k] = act(g[k]) · u[k] (a gated FFN; out may alias g or u): SiLU through the vector helper.
static void gated_act(Act a, const float* g, const float* u, float* out, int64_t n) {
    if (a == Act::SiLU) return silu_mul(g, u, out, n);
    for (int64_t k = 0; k < n; ++k) out[k] = act_fn(a, g[k]) * u[k];
}

// Where position p of KV head kh of layer l starts in a sequence's k / v: (layers, kv_heads, cap, head_dim).
static int64_t kv_offset(const Sequence& s, int64_t kv_heads, int64_t hd, int64_t l, int64_t kh, int64_t p) {
    return ((l * kv_heads + kh) * s.cap + p) * hd;
}

static float* grow(std::vector<float>& v, int64_t n) {
    if ((int64_t)v.size() < n) v.resize((size_t)n);
    return v.data();
}

// One PackedLinear: [input RMSNorm] -> kernel (A8 / weight-only / OneBit g,h + LayerNorm) -> bias.
void Engine::linear(const Linear& L, const float* x, int64_t M, float* out) {
    const int64_t K = L.K, N = L.N;
    const Format f = cfg_.kernel_format;
    if (!L.norm.empty()) {
        float* t = grow(tmp_, M * K);
        rmsnorm(x, L.norm.data(), cfg_.linear_norm_eps, M, K, t);
        x = t;
    }
    switch (cfg_.method) {
        case Method::A8: {
            const int64_t Kp = padded_k(f, K);
            if ((int64_t)qact_.size() < M * Kp) qact_.resize((size_t)(M * Kp));
            if ((int64_t)xscale_.size() < M) xscale_.resize((size_t)M), qsum_.resize((size_t)M);
            quantize_activations(x, M, K, K, qact_.data(), Kp, xscale_.data(), qsum_.data());
            gemm_a8(f, L.packed.data(), N, K, qact_.data(), Kp, xscale_.data(), qsum_.data(), M, L.wscale.data(),
                    L.bias.empty() ? nullptr : L.bias.data(), out);
            break;
        }
        case Method::WeightOnly:
            gemm_f32(f, L.packed.data(), N, K, x, K, M, L.wscale.data(), L.bias.empty() ? nullptr : L.bias.data(), out);
            break;
        case Method::OneBit: {
            // y = LayerNorm_noaffine(h ⊙ (sign(W) · (g ⊙ x))) + bias
            std::vector<float> gx((size_t)(M * K));  // (M, K)
            for (int64_t m = 0; m < M; ++m)
                for (int64_t k = 0; k < K; ++k) gx[m * K + k] = x[m * K + k] * L.input_factor[k];
            gemm_f32(f, L.packed.data(), N, K, gx.data(), K, M, L.wscale.data(), nullptr, out);
            layernorm(out, nullptr, L.bias.empty() ? nullptr : L.bias.data(), cfg_.onebit_ln_eps, M, N, out);
            break;
        }
    }
}

// RoPE (rotate_half convention) on the first `rd` dims of each of `nh` heads of one row.
static void rope_row(float* x, int64_t nh, int64_t hd, int64_t rd, const float* cs, const float* sn) {
    const int64_t h2 = rd / 2;
    for (int64_t h = 0; h < nh; ++h) {
        float* v = x + h * hd;
        for (int64_t i = 0; i < h2; ++i) {
            const float a = v[i], b = v[i + h2];
            v[i] = a * cs[i] - b * sn[i];
            v[i + h2] = b * cs[i] + a * sn[i];
        }
    }
}

// Causal attention of every new row against its sequence's cache (which already holds the rows).
void Engine::attention(const int* ids, int n, const int64_t* offsets, const std::vector<int64_t>& pos0, int64_t l,
                       int64_t M) {
    const int64_t nh = cfg_.heads, hd = cfg_.head_dim, group = cfg_.heads / cfg_.kv_heads;
    const float scale = 1.0f / std::sqrt((float)hd);
    std::vector<int64_t> row_seq((size_t)M);  // (M,) which sequence each row belongs to
    for (int i = 0; i < n; ++i)
        for (int64_t r = offsets[i]; r < offsets[i + 1]; ++r) row_seq[(size_t)r] = i;
    int64_t maxlen = 0;
    for (int i = 0; i < n; ++i) maxlen = std::max(maxlen, pos0[(size_t)i] + offsets[i + 1] - offsets[i]);
    const int nt = get_num_threads();
    float* scores_all = grow(scores_, (int64_t)nt * maxlen);
    const int64_t work = M * nh;
    // one (row, head) item costs ~maxlen*hd; chunks of at least ~8k of that (a decode step's 16-32
    // heads split evenly over the threads from ~100 cached positions on)
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, maxlen * hd));
    parallel_for(work, grain, [&](int64_t t0, int64_t t1, int tid) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t r = t / nh, h = t % nh;
            const int i = (int)row_seq[(size_t)r];
            const Sequence& s = *seqs_[(size_t)ids[i]];
            const int64_t p = pos0[(size_t)i] + (r - offsets[i]);  // absolute position of row r
            const float* q = qb_.data() + r * nh * hd + h * hd;
            const int64_t at = kv_offset(s, cfg_.kv_heads, hd, l, h / group, 0);  // this head's (cap, hd) block
            float* sc = scores_all + (int64_t)tid * maxlen;
            float* o = ab_.data() + r * nh * hd + h * hd;
            if (cfg_.kv_f16) {
                dot_f16_rows(q, s.k16.data() + at, hd, p + 1, hd, scale, sc);
                softmax_inplace(sc, p + 1);
                weighted_sum_f16(sc, s.v16.data() + at, hd, p + 1, hd, o);
            } else {
                dot_f32_rows(q, s.k.data() + at, hd, p + 1, hd, scale, sc);
                softmax_inplace(sc, p + 1);
                weighted_sum(sc, s.v.data() + at, hd, p + 1, hd, o);
            }
        }
    });
}

// logits[i] = head · x[rows[i]] (+ bias), parallel over the vocabulary so each head row is read once.
void Engine::head(const float* x, const int64_t* rows, int64_t nr, float* logits) {
    const int64_t V = cfg_.vocab, H = cfg_.hidden;
    const uint16_t* w16 = cfg_.tied ? embed_.data() : head16_.data();
    const bool i8 = cfg_.head == HeadMode::I8;
    bool contiguous = true;  // the forward pass passes rows 0..nr-1: 4 of them at once then
    for (int64_t i = 1; i < nr; ++i) contiguous = contiguous && rows[i] == rows[0] + i;
    const int64_t n4 = contiguous ? nr / 4 * 4 : 0;  // rows taken 4 at a time (a batched step)
    auto emit = [&](int64_t i, int64_t v, float y) {
        float t = i8 ? y * head8_scale_[v] : y;
        if (!head_bias_.empty()) t += head_bias_[v];
        logits[i * V + v] = t;
    };
    // Batched rows, 4 at a time: a block of head rows (kHeadBlock x H: 96-192 KB at H = 1536, in L2)
    // against each group of 4 rows (24 KB at H = 1536, in L1), so the rows are not re-read from L2
    // for every head row (16 rows: 96 KB per head row).
    constexpr int64_t kHeadBlock = 64;
    parallel_for(V, 256, [&](int64_t v0, int64_t v1, int) {
        for (int64_t bb = v0; bb < v1 && n4 > 0; bb += kHeadBlock) {
            const int64_t be = std::min(v1, bb + kHeadBlock);
            for (int64_t i = 0; i < n4; i += 4)
                for (int64_t v = bb; v < be; ++v) {
                    float y[4];
                    if (i8) dot4_i8(head8_.data() + v * H, x + rows[i] * H, H, H, y);
                    else dot4_f16(w16 + v * H, x + rows[i] * H, H, H, y);
                    for (int j = 0; j < 4; ++j) emit(i + j, v, y[j]);
                }
        }
        for (int64_t vb = v0; vb < v1; vb += 4) {
            const int64_t ve = std::min(v1, vb + 4);
            for (int64_t i = n4; i < nr; ++i) {  // the other rows (decode: the only one): 4 head rows at once
                const float* xr = x + rows[i] * H;
                if (ve - vb == 4) {
                    float y[4];
                    if (i8) rows4_i8(head8_.data() + vb * H, H, xr, H, y);
                    else rows4_f16(w16 + vb * H, H, xr, H, y);
                    for (int j = 0; j < 4; ++j) emit(i, vb + j, y[j]);
                } else {
                    for (int64_t v = vb; v < ve; ++v)
                        emit(i, v, i8 ? dot_i8(head8_.data() + v * H, xr, H) : dot_f16(w16 + v * H, xr, H));
                }
            }
        }
    });
}

// ============================================================================================
// Forward pass
// ============================================================================================

void Engine::forward(const int* ids, int n, const int32_t* tokens, const int64_t* offsets, const int64_t* last,
                     float* logits) {
    if (!finalized_) throw EngineError("forward before finalize()");
    if (n <= 0) return;
    const int64_t M = offsets[n], H = cfg_.hidden, nh = cfg_.heads, hd = cfg_.head_dim;
    const int64_t qd = nh * hd, kvd = cfg_.kv_heads * hd, F = cfg_.ffn, V = cfg_.vocab;
    std::vector<int64_t> pos0((size_t)n);  // (n,) first new position of each sequence
    for (int i = 0; i < n; ++i) {
        Sequence& s = seq_at(seqs_, ids[i]);
        for (int j = 0; j < i; ++j)
            if (ids[j] == ids[i]) throw EngineError("sequence " + std::to_string(ids[i]) + " appears twice in one step");
        const int64_t add = offsets[i + 1] - offsets[i];
        if (add <= 0) throw EngineError("every sequence in a step needs at least one token");
        if (last && (last[i] < 1 || last[i] > add))
            throw EngineError("sequence " + std::to_string(ids[i]) + ": logits of its last " + std::to_string(last[i]) +
                              " tokens asked for, it has " + std::to_string(add) + " in this step");
        if (s.len + add > s.cap)
            throw EngineError("sequence " + std::to_string(ids[i]) + " would hold " + std::to_string(s.len + add) +
                              " positions, its cache holds " + std::to_string(s.cap));
        pos0[(size_t)i] = s.len;
    }
    for (int64_t r = 0; r < M; ++r)
        if (tokens[r] < 0 || tokens[r] >= V)
            throw EngineError("token id " + std::to_string(tokens[r]) + " is outside the vocabulary (0.." +
                              std::to_string(V - 1) + ")");

    // ---- buffers, all (M, ·) row-major ----
    float* x = grow(x_, M * H);      // residual stream (M, H)
    float* h = grow(h_, M * H);      // normed input (M, H)
    grow(qb_, M * qd);               // (M, nh*hd)
    float* kb = grow(kb_, M * kvd);  // (M, kv*hd)
    float* vb = grow(vb_, M * kvd);
    grow(ab_, M * qd);               // attention output (M, nh*hd)
    float* ob = grow(ob_, M * H);    // (M, H)
    float* f1 = grow(f1_, M * F);    // (M, F)
    float* f2 = grow(f2_, M * std::max(F, H));
    float* qb = qb_.data();
    float* ab = ab_.data();

    for (int64_t r = 0; r < M; ++r) f16_to_f32(embed_.data() + (int64_t)tokens[r] * H, x + r * H, H);

    // RoPE tables per row (M, rotary_dim/2)
    const int64_t h2 = cfg_.rotary_dim / 2;
    std::vector<float> cs((size_t)(M * h2)), sn((size_t)(M * h2));
    for (int i = 0; i < n; ++i)
        for (int64_t r = offsets[i]; r < offsets[i + 1]; ++r) {
            const float p = (float)(pos0[(size_t)i] + r - offsets[i]);
            for (int64_t j = 0; j < h2; ++j) {
                const float fr = p * inv_freq_[(size_t)j];
                cs[r * h2 + j] = std::cos(fr);
                sn[r * h2 + j] = std::sin(fr);
            }
        }

    const bool phi = cfg_.family == Family::Phi, bitnet = cfg_.family == Family::BitNet;
    for (int64_t l = 0; l < cfg_.layers; ++l) {
        Layer& Ly = layers_[(size_t)l];
        // ---- attention ----
        if (phi) layernorm(x, Ly.attn_norm.w.data(), Ly.attn_norm.b.data(), cfg_.norm_eps, M, H, h);
        else rmsnorm(x, Ly.attn_norm.w.data(), cfg_.norm_eps, M, H, h);
        if (Ly.fused_qkv) {
            const int64_t Nt = qd + 2 * kvd;
            float* z = grow(fz_, M * Nt);  // (M, qd | kvd | kvd)
            linear(Ly.qkv, h, M, z);
            for (int64_t r = 0; r < M; ++r) {
                std::memcpy(qb + r * qd, z + r * Nt, (size_t)qd * 4);
                std::memcpy(kb + r * kvd, z + r * Nt + qd, (size_t)kvd * 4);
                std::memcpy(vb + r * kvd, z + r * Nt + qd + kvd, (size_t)kvd * 4);
            }
        } else {
            linear(Ly.q, h, M, qb);
            linear(Ly.k, h, M, kb);
            linear(Ly.v, h, M, vb);
        }
        for (int64_t r = 0; r < M; ++r) {
            rope_row(qb + r * qd, nh, hd, cfg_.rotary_dim, cs.data() + r * h2, sn.data() + r * h2);
            rope_row(kb + r * kvd, cfg_.kv_heads, hd, cfg_.rotary_dim, cs.data() + r * h2, sn.data() + r * h2);
        }
        for (int i = 0; i < n; ++i) {  // append the new rows to the cache
            Sequence& s = *seqs_[(size_t)ids[i]];
            for (int64_t r = offsets[i]; r < offsets[i + 1]; ++r) {
                const int64_t p = pos0[(size_t)i] + r - offsets[i];
                for (int64_t kh = 0; kh < cfg_.kv_heads; ++kh) {
                    const int64_t at = kv_offset(s, cfg_.kv_heads, hd, l, kh, p);
                    const float* kr = kb + r * kvd + kh * hd;
                    const float* vr = vb + r * kvd + kh * hd;
                    if (cfg_.kv_f16) {
                        f32_to_f16(kr, s.k16.data() + at, hd);
                        f32_to_f16(vr, s.v16.data() + at, hd);
                    } else {
                        std::memcpy(s.k.data() + at, kr, (size_t)hd * 4);
                        std::memcpy(s.v.data() + at, vr, (size_t)hd * 4);
                    }
                }
            }
        }
        attention(ids, n, offsets, pos0, l, M);
        if (bitnet) rmsnorm(ab, Ly.attn_sub_norm.w.data(), cfg_.norm_eps, M, qd, ab);
        linear(Ly.o, ab, M, ob);

        // ---- MLP ----
        if (phi) {  // parallel: x = (attn + mlp(h)) + x
            linear(Ly.up, h, M, f1);
            parallel_for(M * F, 65536, [&](int64_t i0, int64_t i1, int) {
                for (int64_t i = i0; i < i1; ++i) f1[i] = act_fn(cfg_.act, f1[i]);
            });
            linear(Ly.down, f1, M, f2);
            for (int64_t i = 0; i < M * H; ++i) x[i] = (ob[i] + f2[i]) + x[i];
        } else {
            for (int64_t i = 0; i < M * H; ++i) x[i] = x[i] + ob[i];
            rmsnorm(x, Ly.ffn_norm.w.data(), cfg_.norm_eps, M, H, h);
            if (Ly.fused_gate_up) {
                float* z = grow(fz_, M * 2 * F);  // (M, gate F | up F)
                linear(Ly.gate_up, h, M, z);
                parallel_for(M, std::max<int64_t>(1, 65536 / F), [&](int64_t r0, int64_t r1, int) {
                    for (int64_t r = r0; r < r1; ++r) gated_act(cfg_.act, z + r * 2 * F, z + r * 2 * F + F, f1 + r * F, F);
                });
            } else {
                linear(Ly.gate, h, M, f1);
                linear(Ly.up, h, M, f2);
                parallel_for(M * F, 65536, [&](int64_t i0, int64_t i1, int) {
                    gated_act(cfg_.act, f1 + i0, f2 + i0, f1 + i0, i1 - i0);
                });
            }
            if (bitnet) rmsnorm(f1, Ly.ffn_sub_norm.w.data(), cfg_.norm_eps, M, F, f1);
            linear(Ly.down, f1, M, ob);
            for (int64_t i = 0; i < M * H; ++i) x[i] = x[i] + ob[i];
        }
    }
    for (int i = 0; i < n; ++i) seqs_[(size_t)ids[i]]->len += offsets[i + 1] - offsets[i];

    // ---- final norm + head ----
    std::vector<int64_t> rows;  // the rows whose logits were asked for, sequence by sequence
    for (int i = 0; i < n; ++i)
        for (int64_t r = offsets[i + 1] - (last ? last[i] : 1); r < offsets[i + 1]; ++r) rows.push_back(r);
    const int64_t nr = (int64_t)rows.size();
    std::vector<float> xn((size_t)(nr * H));  // (nr, H)
    std::vector<float> xs((size_t)(nr * H));
    for (int64_t i = 0; i < nr; ++i) std::memcpy(xs.data() + i * H, x + rows[(size_t)i] * H, (size_t)H * 4);
    if (phi) layernorm(xs.data(), final_norm_.w.data(), final_norm_.b.data(), cfg_.norm_eps, nr, H, xn.data());
    else rmsnorm(xs.data(), final_norm_.w.data(), cfg_.norm_eps, nr, H, xn.data());
    std::vector<int64_t> idx((size_t)nr);
    for (int64_t i = 0; i < nr; ++i) idx[(size_t)i] = i;
    head(xn.data(), idx.data(), nr, logits);
    for (int64_t i = 0; i < nr * V; ++i)
        if (!std::isfinite(logits[i]))
            throw EngineError("non-finite logits (NaN/inf) at output row " + std::to_string(i / V) +
                              ": the model's weights or activations overflowed");
}

}  // namespace engine
}  // namespace bitllm
