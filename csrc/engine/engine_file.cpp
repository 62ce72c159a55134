// Engine files: a safetensors file (8-byte LE header length, JSON header, raw data) whose
// __metadata__ is the engine Config and whose tensors carry canonical engine names. Written by
// bitllm.engine.export_engine_file; read here without any JSON library (a minimal parser that
// accepts exactly what the safetensors header needs: objects, arrays, strings, integers).
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "engine.h"

namespace bitllm {
namespace engine {

namespace {

struct Json {
    enum Kind { Null, Str, Num, Arr, Obj } kind = Null;
    std::string s;
    double num = 0;
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;
    const Json* get(const std::string& k) const {
        for (const auto& kv : obj)
            if (kv.first == k) return &kv.second;
        return nullptr;
    }
};

class Parser {
public:
    Parser(const char* p, const char* end) : p_(p), end_(end) {}
    Json parse() {
        Json j = value();
        ws();
        if (p_ != end_) fail("trailing bytes");
        return j;
    }

private:
    const char *p_, *end_;
    [[noreturn]] void fail(const char* why) { throw EngineError(std::string("engine file: bad JSON header (") + why + ")"); }
    void ws() {
        while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
    }
    char peek() {
        ws();
        if (p_ >= end_) fail("unexpected end");
        return *p_;
    }
    void expect(char c) {
        if (peek() != c) fail("unexpected character");
        ++p_;
    }
    std::string str() {
        expect('"');
        std::string r;
        while (true) {
            if (p_ >= end_) fail("unterminated string");
            char c = *p_++;
            if (c == '"') break;
            if (c == '\\') {
                if (p_ >= end_) fail("bad escape");
                char e = *p_++;
                switch (e) {
                    case 'n': r += '\n'; break;
                    case 't': r += '\t'; break;
                    case 'r': r += '\r'; break;
                    case 'b': r += '\b'; break;
                    case 'f': r += '\f'; break;
                    case 'u': {
                        if (end_ - p_ < 4) fail("bad \\u escape");
                        unsigned cp = (unsigned)std::stoul(std::string(p_, 4), nullptr, 16);
                        p_ += 4;
                        if (cp < 0x80) r += (char)cp;
                        else if (cp < 0x800) r += (char)(0xC0 | (cp >> 6)), r += (char)(0x80 | (cp & 0x3F));
                        else r += (char)(0xE0 | (cp >> 12)), r += (char)(0x80 | ((cp >> 6) & 0x3F)), r += (char)(0x80 | (cp & 0x3F));
                        break;
                    }
                    default: r += e;
                }
            } else {
                r += c;
            }
        }
        return r;
    }
    Json value() {
        Json j;
        const char c = peek();
        if (c == '{') {
            j.kind = Json::Obj;
            ++p_;
            if (peek() == '}') return ++p_, j;
            while (true) {
                std::string k = str();
                expect(':');
                j.obj.emplace_back(k, value());
                if (peek() == ',') {
                    ++p_;
                    continue;
                }
                expect('}');
                return j;
            }
        }
        if (c == '[') {
            j.kind = Json::Arr;
            ++p_;
            if (peek() == ']') return ++p_, j;
            while (true) {
                j.arr.push_back(value());
                if (peek() == ',') {
                    ++p_;
                    continue;
                }
                expect(']');
                return j;
            }
        }
        if (c == '"') {
            j.kind = Json::Str;
            j.s = str();
            return j;
        }
        if (c == '-' || (c >= '0' && c <= '9')) {
            const char* b = p_;
            while (p_ < end_ && (std::strchr("+-.eE", *p_) || (*p_ >= '0' && *p_ <= '9'))) ++p_;
            j.kind = Json::Num;
            j.num = std::stod(std::string(b, p_));
            return j;
        }
        if (end_ - p_ >= 4 && std::strncmp(p_, "null", 4) == 0) return p_ += 4, j;
        fail("unsupported value");
    }
};

}  // namespace

std::unique_ptr<Engine> load_engine_file(const std::string& path, Config* meta_out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw EngineError("engine file '" + path + "': cannot open");
    f.seekg(0, std::ios::end);
    const int64_t size = (int64_t)f.tellg();
    f.seekg(0);
    uint8_t len8[8];
    if (size < 8 || !f.read((char*)len8, 8)) throw EngineError("engine file '" + path + "': truncated");
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | len8[i];  // little endian
    if (hlen > (uint64_t)(size - 8) || hlen > (1u << 30)) throw EngineError("engine file '" + path + "': bad header length");
    std::string header((size_t)hlen, '\0');
    f.read(&header[0], (std::streamsize)hlen);
    const Json root = Parser(header.data(), header.data() + header.size()).parse();
    if (root.kind != Json::Obj) throw EngineError("engine file '" + path + "': header is not an object");
    Config cfg;
    if (const Json* m = root.get("__metadata__"))
        for (const auto& kv : m->obj) cfg[kv.first] = kv.second.s;
    if (meta_out) *meta_out = cfg;
    auto eng = std::make_unique<Engine>(cfg);
    const int64_t data0 = 8 + (int64_t)hlen;
    std::vector<char> buf;
    for (const auto& kv : root.obj) {
        if (kv.first == "__metadata__") continue;
        const Json& t = kv.second;
        const Json *dt = t.get("dtype"), *sh = t.get("shape"), *off = t.get("data_offsets");
        if (!dt || !sh || !off || off->arr.size() != 2)
            throw EngineError("engine file '" + path + "': tensor '" + kv.first + "' has an incomplete entry");
        std::string dtype;
        size_t esize = 0;
        if (dt->s == "U8") dtype = "u8", esize = 1;
        else if (dt->s == "I8") dtype = "i8", esize = 1;
        else if (dt->s == "F16") dtype = "f16", esize = 2;
        else if (dt->s == "F32") dtype = "f32", esize = 4;
        else throw EngineError("engine file '" + path + "': tensor '" + kv.first + "' has unsupported dtype " + dt->s);
        std::vector<int64_t> shape;
        int64_t n = 1;
        for (const auto& d : sh->arr) shape.push_back((int64_t)d.num), n *= (int64_t)d.num;
        const int64_t a = (int64_t)off->arr[0].num, b = (int64_t)off->arr[1].num;
        if (a < 0 || b < a || data0 + b > size || (b - a) != n * (int64_t)esize)
            throw EngineError("engine file '" + path + "': tensor '" + kv.first + "' has bad offsets");
        buf.resize((size_t)(b - a) + 1);
        f.seekg(data0 + a);
        if (!f.read(buf.data(), b - a)) throw EngineError("engine file '" + path + "': truncated data");
        eng->set_tensor(kv.first, dtype, shape, buf.data());
    }
    eng->finalize();
    return eng;
}

}  // namespace engine
}  // namespace bitllm
