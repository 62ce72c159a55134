// Engine files: a safetensors file (8-byte LE header length, JSON header, raw data) whose
// __metadata__ is the engine Config and whose tensors carry canonical engine names. Written by
// bitllm.engine.export_engine_file; read here without any JSON library (a minimal parser that
// accepts exactly what the safetensors header needs: objects, arrays, strings, integers).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
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

// Strict UTF-8 (no overlong forms, no surrogates): names and metadata become Python str.
static bool valid_utf8(const std::string& s) {
    const auto* p = (const unsigned char*)s.data();
    const auto* end = p + s.size();
    while (p < end) {
        const unsigned c = *p++;
        int n = 0;
        unsigned cp = 0, min = 0;
        if (c < 0x80) continue;
        if ((c & 0xE0) == 0xC0) n = 1, cp = c & 0x1F, min = 0x80;
        else if ((c & 0xF0) == 0xE0) n = 2, cp = c & 0x0F, min = 0x800;
        else if ((c & 0xF8) == 0xF0) n = 3, cp = c & 0x07, min = 0x10000;
        else return false;
        if (end - p < n) return false;
        for (int i = 0; i < n; ++i) {
            if ((p[i] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (p[i] & 0x3F);
        }
        p += n;
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    }
    return true;
}

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
    int depth_ = 0;  // nesting of objects/arrays: bounded, so a corrupt header cannot overflow the stack
    static constexpr int kMaxDepth = 64;
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
                        unsigned cp = 0;
                        for (int i = 0; i < 4; ++i) {
                            const char h = p_[i];
                            const int v = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10
                                        : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
                            if (v < 0) fail("bad \\u escape");
                            cp = cp * 16 + (unsigned)v;
                        }
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
        if (!valid_utf8(r)) fail("a string is not valid UTF-8");
        return r;
    }
    Json value() {
        if (++depth_ > kMaxDepth) fail("nested too deeply");
        Json j = value_inner();
        --depth_;
        return j;
    }
    Json value_inner() {
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
            const std::string t(b, p_);
            char* e = nullptr;
            j.num = std::strtod(t.c_str(), &e);
            if (t.empty() || e != t.c_str() + t.size() || !std::isfinite(j.num)) fail("bad number");
            return j;
        }
        if (end_ - p_ >= 4 && std::strncmp(p_, "null", 4) == 0) return p_ += 4, j;
        fail("unsupported value");
    }
};

}  // namespace

// A non-negative integer field of the header (shape dims, data offsets), or an EngineError naming it.
// JSON numbers are doubles here: integers up to 2^53 are exact, which covers any real file.
static int64_t header_int(const Json& j, const std::string& path, const std::string& tensor, const char* what) {
    if (j.kind != Json::Num || !(j.num >= 0) || j.num > 9007199254740992.0 || j.num != std::floor(j.num))
        throw EngineError("engine file '" + path + "': tensor '" + tensor + "' has a bad " + what +
                          " (expected a non-negative integer)");
    return (int64_t)j.num;
}

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
    if (!f.read(&header[0], (std::streamsize)hlen)) throw EngineError("engine file '" + path + "': truncated header");
    const Json root = Parser(header.data(), header.data() + header.size()).parse();
    if (root.kind != Json::Obj) throw EngineError("engine file '" + path + "': header is not an object");
    Config cfg;
    if (const Json* m = root.get("__metadata__")) {
        if (m->kind != Json::Obj) throw EngineError("engine file '" + path + "': __metadata__ is not an object");
        for (const auto& kv : m->obj) {
            if (kv.second.kind != Json::Str)
                throw EngineError("engine file '" + path + "': __metadata__ value '" + kv.first + "' is not a string");
            cfg[kv.first] = kv.second.s;
        }
    }
    // Validate the whole tensor table before building anything: names unique, entries complete,
    // shapes that match their byte ranges, ranges inside the data section and not overlapping.
    struct Entry {
        const std::string* name;
        std::string dtype;
        std::vector<int64_t> shape;
        int64_t a, b;  // [a, b) in the data section
    };
    const int64_t data0 = 8 + (int64_t)hlen, data_size = size - data0;
    std::vector<Entry> entries;
    std::set<std::string> seen;
    for (const auto& kv : root.obj) {
        if (!seen.insert(kv.first).second)
            throw EngineError("engine file '" + path + "': '" + kv.first + "' appears twice in the header");
        if (kv.first == "__metadata__") continue;
        const Json& t = kv.second;
        const Json *dt = t.get("dtype"), *sh = t.get("shape"), *off = t.get("data_offsets");
        if (t.kind != Json::Obj || !dt || !sh || !off || dt->kind != Json::Str || sh->kind != Json::Arr ||
            off->kind != Json::Arr || off->arr.size() != 2)
            throw EngineError("engine file '" + path + "': tensor '" + kv.first + "' has an incomplete entry");
        Entry e{&kv.first, "", {}, 0, 0};
        int64_t esize = 0;
        if (dt->s == "U8") e.dtype = "u8", esize = 1;
        else if (dt->s == "I8") e.dtype = "i8", esize = 1;
        else if (dt->s == "F16") e.dtype = "f16", esize = 2;
        else if (dt->s == "F32") e.dtype = "f32", esize = 4;
        else throw EngineError("engine file '" + path + "': tensor '" + kv.first + "' has unsupported dtype " + dt->s);
        int64_t bytes = esize;  // stays <= the file size (checked per dim), so it cannot overflow
        bool too_big = false;
        for (const auto& d : sh->arr) {
            const int64_t v = header_int(d, path, kv.first, "shape dimension");
            e.shape.push_back(v);
            if (v && bytes > data_size / v) too_big = true;
            else bytes *= v;
        }
        if (std::find(e.shape.begin(), e.shape.end(), 0) != e.shape.end()) bytes = 0, too_big = false;
        e.a = header_int(off->arr[0], path, kv.first, "data offset");
        e.b = header_int(off->arr[1], path, kv.first, "data offset");
        if (e.b < e.a || e.b > data_size)
            throw EngineError("engine file '" + path + "': tensor '" + kv.first + "' has data offsets [" +
                              std::to_string(e.a) + ", " + std::to_string(e.b) + ") outside the " +
                              std::to_string(data_size) + "-byte data section (truncated file?)");
        if (too_big || e.b - e.a != bytes)
            throw EngineError("engine file '" + path + "': tensor '" + kv.first + "' has " +
                              std::to_string(e.b - e.a) + " bytes of data, its dtype and shape need " +
                              (too_big ? std::string("more than the file holds") : std::to_string(bytes)));
        entries.push_back(std::move(e));
    }
    std::vector<const Entry*> by_off;
    for (const auto& e : entries)
        if (e.b > e.a) by_off.push_back(&e);
    std::sort(by_off.begin(), by_off.end(), [](const Entry* x, const Entry* y) { return x->a < y->a; });
    for (size_t i = 1; i < by_off.size(); ++i)
        if (by_off[i]->a < by_off[i - 1]->b)
            throw EngineError("engine file '" + path + "': tensors '" + *by_off[i - 1]->name + "' and '" +
                              *by_off[i]->name + "' have overlapping data");
    if (meta_out) *meta_out = cfg;
    auto eng = std::make_unique<Engine>(cfg);
    std::vector<char> buf;
    for (const auto& e : entries) {
        buf.resize((size_t)(e.b - e.a) + 1);
        f.seekg(data0 + e.a);
        if (!f.read(buf.data(), e.b - e.a)) throw EngineError("engine file '" + path + "': truncated data");
        eng->set_tensor(*e.name, e.dtype, e.shape, buf.data());
    }
    eng->finalize();
    return eng;
}

}  // namespace engine
}  // namespace bitllm
