"""The native boundary: corrupt engine files, bad `bitllm._engine.Engine` arguments and bad
`bitllm._core` kernel arguments must raise a clear exception, never crash, hang or allocate
absurd memory. Every probe runs in a subprocess (under a 4 GiB address-space limit), so that a
crash fails its test instead of killing the run."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent

# A tiny llama engine config: every tensor is built by _tiny_engine_file without touching C++.
CFG = {"family": "llama", "vocab": "32", "hidden": "16", "layers": "1", "heads": "2", "kv_heads": "1",
       "head_dim": "8", "ffn": "32", "max_pos": "16", "rotary_dim": "8", "act": "silu", "method": "ternary",
       "layout": "i2", "head": "f16", "tied": "0"}
PRELUDE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # an absurd allocation fails fast
    from bitllm import _core, _engine
    def probe(fn):
        try:
            r = fn()
            return ["ok", repr(r)[:200]]
        except Exception as e:
            return [type(e).__name__, str(e)[:300]]
""")


def _tiny_engine_file(path: Path) -> Path:
    """A valid engine file (safetensors) for CFG: I2 weights of zeros (code 1), unit norms."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    V, H, qd, kvd, F = 32, 16, 16, 8, 32
    t = {"embed": rng.standard_normal((V, H)).astype(np.float16), "head.w": rng.standard_normal((V, H)).astype(np.float16),
         "norm.w": np.ones(H, np.float32), "L.0.attn_norm.w": np.ones(H, np.float32),
         "L.0.ffn_norm.w": np.ones(H, np.float32)}
    for name, (N, K) in {"q": (qd, H), "k": (kvd, H), "v": (kvd, H), "o": (H, qd), "gate": (F, H), "up": (F, H),
                         "down": (H, F)}.items():
        t[f"L.0.{name}.weight"] = np.full((N, (K + 3) // 4), 0x55, np.uint8)  # every code 1: weight 0
        t[f"L.0.{name}.scale"] = np.ones(1, np.float32)
    save_file(t, str(path), metadata=CFG)
    return path


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict | bytes, data: bytes) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120, cwd=TESTS)


def _results(code: str, *args: str) -> dict:
    """Run `code` (which prints one JSON dict of probe results) in a subprocess; fail on a crash."""
    r = _run(code, *args)
    assert r.returncode == 0, f"probe process died ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Engine files
# ---------------------------------------------------------------------------------------------


def _mutate(h: dict, name: str, **kw) -> dict:
    h = json.loads(json.dumps(h))
    h[name].update(kw)
    return h


# case -> a phrase its EngineError must contain
FILE_ERRORS = {
    "truncated_length": "truncated",
    "truncated_header": "bad header length",
    "truncated_data": "outside",
    "header_length_huge": "bad header length",
    "shape_negative": "bad shape dimension",
    "shape_fraction": "bad shape dimension",
    "shape_2e62": "bad shape dimension",
    "shape_overflow": "more than the file holds",
    "shape_not_list": "incomplete entry",
    "offsets_past_end": "outside",
    "offsets_negative": "bad data offset",
    "offsets_huge": "bad data offset",
    "offsets_overlap": "overlapping",
    "duplicate_tensor": "appears twice",
    "missing_tensor": "missing",
    "dtype_unsupported": "unsupported dtype",
    "dtype_wrong": "is not f32 or f16",
    "dtype_not_string": "incomplete entry",
    "json_deeply_nested": "nested too deeply",
    "json_bad_unicode": "bad \\u escape",
    "json_bad_number": "bad number",
    "json_name_not_utf8": "not valid UTF-8",
    "json_escaped_surrogate": "not valid UTF-8",
    "metadata_not_string": "is not a string",
    "metadata_not_object": "is not an object",
    "config_layers_huge": "larger than the engine supports",
    "config_max_pos_huge": "larger than the engine supports",
    "config_heads_overflow": "larger than the engine supports",
    "config_eps_nan": "not finite",
}


def _file_cases(raw: bytes) -> dict[str, bytes]:
    """FILE_ERRORS case -> the damaged copy of `raw`."""
    h, data = _split(raw)
    hlen = len(raw) - len(data) - 8
    a, b = h["norm.w"]["data_offsets"]
    meta = lambda **kw: _join({**h, "__metadata__": {**h["__metadata__"], **kw}}, data)  # noqa: E731
    dup = raw[8:8 + hlen].replace(b'"L.0.ffn_norm.w"', b'"L.0.attn_norm.w"', 1)
    return {
        "truncated_length": raw[:5],
        "truncated_header": raw[:8 + hlen // 2],
        "truncated_data": raw[:-1],
        "header_length_huge": struct.pack("<Q", 2**63) + raw[8:],
        "shape_negative": _join(_mutate(h, "norm.w", shape=[-1, -16]), data),
        "shape_fraction": _join(_mutate(h, "norm.w", shape=[16.5]), data),
        "shape_2e62": _join(_mutate(h, "norm.w", shape=[2**62]), data),
        "shape_overflow": _join(_mutate(h, "norm.w", shape=[2**40, 2**40, 2**20]), data),
        "shape_not_list": _join(_mutate(h, "norm.w", shape="16"), data),
        "offsets_past_end": _join(_mutate(h, "norm.w", data_offsets=[len(data), len(data) + b - a]), data),
        "offsets_negative": _join(_mutate(h, "norm.w", data_offsets=[-64, 0]), data),
        "offsets_huge": _join(_mutate(h, "norm.w", data_offsets=[2**62, 2**62 + 64]), data),
        "offsets_overlap": _join(_mutate(h, "L.0.ffn_norm.w", data_offsets=h["L.0.attn_norm.w"]["data_offsets"]),
                                  data),
        "duplicate_tensor": _join(dup, data),
        "missing_tensor": _join({k: v for k, v in h.items() if k != "L.0.q.weight"}, data),
        "dtype_unsupported": _join(_mutate(h, "norm.w", dtype="F64"), data),
        "dtype_wrong": _join(_mutate(h, "norm.w", dtype="I8", data_offsets=[a, a + 16]), data),
        "dtype_not_string": _join(_mutate(h, "norm.w", dtype=4), data),
        "json_deeply_nested": _join(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", data),
        "json_bad_unicode": _join(b'{"\\uZZZZ": 1}', data),
        "json_bad_number": _join(b'{"a": 1e99999}', data),
        "json_name_not_utf8": _join(raw[8:8 + hlen].replace(b'"norm.w"', b'"norm\x80w"', 1), data),
        "json_escaped_surrogate": _join(raw[8:8 + hlen].replace(b'"norm.w"', b'"norm\\ud800"', 1), data),
        "metadata_not_string": meta(vocab=32),
        "metadata_not_object": _join({**h, "__metadata__": [1]}, data),
        "config_layers_huge": meta(layers=str(10**9)),
        "config_max_pos_huge": meta(max_pos=str(2**62)),
        "config_heads_overflow": meta(heads=str(2**32), kv_heads=str(2**32)),
        "config_eps_nan": meta(norm_eps="nan"),
    }


@pytest.fixture(scope="module")
def file_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("boundary")
    raw = _tiny_engine_file(d / "tiny.engine").read_bytes()
    cases = _file_cases(raw)
    paths = {}
    assert set(cases) == set(FILE_ERRORS)
    for name, blob in cases.items():
        paths[name] = str(d / f"{name}.engine")
        Path(paths[name]).write_bytes(blob)
    paths["valid"] = str(d / "tiny.engine")
    res = _results("""
        paths = json.loads(sys.argv[1])
        print(json.dumps({k: probe(lambda p=p: _engine.load_engine_file(p)[0].vocab) for k, p in paths.items()}))
    """, json.dumps(paths))
    return cases, res


def test_tiny_engine_file_loads(file_results):
    _, res = file_results
    assert res["valid"] == ["ok", "32"]


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_corrupt_engine_file_raises_engine_error(file_results, case):
    _, res = file_results
    assert case in res, f"no result for {case}: the probe process stopped early"
    kind, msg = res[case]
    assert kind == "EngineError", f"{case}: {kind}: {msg}"
    assert FILE_ERRORS[case] in msg, f"{case}: {msg}"


def test_damaged_engine_files_never_crash(tmp_path):
    """Property test: truncations and 1-3 overwritten header bytes load or raise EngineError."""
    path = _tiny_engine_file(tmp_path / "tiny.engine")
    res = _results("""
        from hypothesis import HealthCheck, given, settings, strategies as st
        from fuzz_helpers import draw_damaged
        import struct
        raw = open(sys.argv[1], "rb").read()
        hend = 8 + struct.unpack("<Q", raw[:8])[0]
        out = sys.argv[1] + ".damaged"
        kinds = {}
        @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.data())
        def check(data):
            open(out, "wb").write(draw_damaged(data, raw, hend))
            kind = probe(lambda: _engine.load_engine_file(out))[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            assert kind in ("ok", "EngineError"), kind
        check()
        print(json.dumps(kinds))
    """, str(path))
    assert set(res) <= {"ok", "EngineError"} and res.get("EngineError", 0) > 0, res


# ---------------------------------------------------------------------------------------------
# Engine methods
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    path = _tiny_engine_file(tmp_path_factory.mktemp("boundary_engine") / "tiny.engine")
    return _results("""
        e, _ = _engine.load_engine_file(sys.argv[1])
        V = e.vocab
        s = e.add_sequence(4)
        closed = e.add_sequence(4)
        e.remove_sequence(closed)
        i32 = lambda *v: np.array(v, np.int32)
        i64 = lambda *v: np.array(v, np.int64)
        out = lambda rows=1, dt=np.float32: np.zeros((rows, V), dt)
        def fw(ids, toks, offs, o=None, last=None):  # last: the next-token row of each sequence unless given
            return e.forward(ids, toks, offs, i64(*[1] * len(ids)) if last is None else last, out() if o is None else o)
        big = dict(json.loads(sys.argv[2]), layers="4096", heads="16384", kv_heads="16384", head_dim="16384",
                   max_pos=str(2**31 - 1))
        r = {
            "unknown_slot": probe(lambda: fw(i32(7), i32(1), i64(0, 1))),
            "negative_slot": probe(lambda: fw(i32(-1), i32(1), i64(0, 1))),
            "closed_slot": probe(lambda: fw(i32(closed), i32(1), i64(0, 1))),
            "token_out_of_vocab": probe(lambda: fw(i32(s), i32(V), i64(0, 1))),
            "token_negative": probe(lambda: fw(i32(s), i32(-5), i64(0, 1))),
            "offsets_wrong_length": probe(lambda: fw(i32(s), i32(1, 2), i64(0, 1, 2))),
            "offsets_last_not_len": probe(lambda: fw(i32(s), i32(1, 2), i64(0, 1))),
            "offsets_not_increasing": probe(lambda: fw(i32(s, closed), i32(1, 2), i64(0, 2, 2), out(2))),
            "out_wrong_shape": probe(lambda: fw(i32(s), i32(1), i64(0, 1), out(2))),
            "out_float64": probe(lambda: fw(i32(s), i32(1), i64(0, 1), out(1, np.float64))),
            "out_not_contiguous": probe(lambda: fw(i32(s), i32(1), i64(0, 1), np.zeros((V, 2), np.float32).T[:1])),
            "tokens_int64": probe(lambda: fw(i32(s), i64(2**32 + 1), i64(0, 1))),
            "same_slot_twice": probe(lambda: fw(i32(s, s), i32(1, 2), i64(0, 1, 2), out(2))),
            "capacity_overflow": probe(lambda: fw(i32(s), i32(1, 2, 3, 4, 5), i64(0, 5))),
            "zero_sequences": probe(lambda: e.forward(i32(), i32(), i64(0), i64(), out(0)) or "done"),
            "last_zero": probe(lambda: fw(i32(s), i32(1, 2), i64(0, 2), out(0), i64(0))),
            "last_past_tokens": probe(lambda: fw(i32(s), i32(1, 2), i64(0, 2), out(2), i64(3))),
            "last_wrong_length": probe(lambda: fw(i32(s), i32(1), i64(0, 1), out(1), i64(1, 1))),
            "last_out_mismatch": probe(lambda: fw(i32(s), i32(1, 2), i64(0, 2), out(1), i64(2))),
            "add_capacity_zero": probe(lambda: e.add_sequence(0)),
            "add_capacity_past_context": probe(lambda: e.add_sequence(2**62)),
            "truncate_past_length": probe(lambda: e.truncate_sequence(s, 3)),
            "kv_cache_overflow": probe(lambda: _engine.Engine(big).add_sequence(2**31 - 1)),
            "still_works": probe(lambda: fw(i32(s), i32(1, 2), i64(0, 2)) or e.sequence_length(s)),
        }
        print(json.dumps(r))
    """, str(path), json.dumps(CFG))


ENGINE_ERRORS = {
    "unknown_slot": ("EngineError", "no sequence 7"),
    "negative_slot": ("EngineError", "no sequence -1"),
    "closed_slot": ("EngineError", "no sequence 1"),
    "token_out_of_vocab": ("EngineError", "outside the vocabulary"),
    "token_negative": ("EngineError", "outside the vocabulary"),
    "offsets_wrong_length": ("EngineError", "n+1 entries"),
    "offsets_last_not_len": ("EngineError", "from 0 to len(tokens)"),
    "offsets_not_increasing": ("EngineError", "must increase"),
    "out_wrong_shape": ("EngineError", "(sum(last), vocab)"),
    "last_zero": ("EngineError", "logits of its last 0 tokens asked for, it has 2"),
    "last_past_tokens": ("EngineError", "logits of its last 3 tokens asked for, it has 2"),
    "last_wrong_length": ("EngineError", "one entry per sequence"),
    "last_out_mismatch": ("EngineError", "(sum(last), vocab)"),
    # no silent conversion: a converted copy of `out` would swallow the logits, of tokens wrap ids
    "out_float64": ("TypeError", "incompatible function arguments"),
    "out_not_contiguous": ("TypeError", "incompatible function arguments"),
    "tokens_int64": ("TypeError", "incompatible function arguments"),
    "same_slot_twice": ("EngineError", "appears twice"),
    "capacity_overflow": ("EngineError", "its cache holds 4"),
    "add_capacity_zero": ("EngineError", "outside 1..16"),
    "add_capacity_past_context": ("EngineError", "outside 1..16"),
    "truncate_past_length": ("EngineError", "out of range"),
    "kv_cache_overflow": ("EngineError", "would not fit in memory"),
}


@pytest.mark.parametrize("case", list(ENGINE_ERRORS))
def test_engine_bad_arguments_raise(engine_results, case):
    kind, msg = engine_results[case]
    want_kind, want_msg = ENGINE_ERRORS[case]
    assert kind == want_kind and want_msg in msg, f"{case}: {kind}: {msg}"


def test_engine_survives_bad_arguments(engine_results):
    assert engine_results["zero_sequences"] == ["ok", "'done'"]
    assert engine_results["still_works"] == ["ok", "2"]  # the failed calls left the slot untouched


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def test_kernel_bad_arguments_raise():
    res = _results("""
        import torch
        from bitllm import kernels
        z = lambda *s, dt=np.float32: np.zeros(s, dt)
        N = 4
        pb = _core.packed_bytes("i2", N, 8)
        gemm = lambda K: _core.gemm_a8("i2", z(pb, dt=np.uint8), N, K, z(2, 8, dt=np.int8), z(2), z(2, dt=np.int32),
                                       z(N), None, z(2, N))
        lin = lambda K: _core.linear_f32("i2", z(pb, dt=np.uint8), N, K, z(2, 8), z(N), None, z(2, N))
        print(json.dumps({
            "gemm_a8_negative_K": probe(lambda: gemm(-8)),
            "linear_f32_negative_K": probe(lambda: lin(-8)),
            "packed_bytes_negative": probe(lambda: _core.packed_bytes("t1", -1, 5)),
            "packed_bytes_overflow": probe(lambda: _core.packed_bytes("b1", 2**62, 2**62)),
            "padded_k_negative": probe(lambda: _core.padded_k("i2", -7)),
            "pack_invalid_weights": probe(lambda: _core.pack("b1", np.zeros((2, 8), np.int8), z(_core.packed_bytes("b1", 2, 8), dt=np.uint8))),
            "unpack_not_packed": probe(lambda: kernels.unpack("i2")),
            "gemm_a8_zero_K": probe(lambda: _core.gemm_a8("i2", z(_core.packed_bytes("i2", N, 0), dt=np.uint8), N, 0,
                                                           z(2, 0, dt=np.int8), z(2), z(2, dt=np.int32), z(N), None, z(2, N))),
            "linear_a8_zero_M": probe(lambda: tuple(kernels.linear_a8(kernels.pack("t1", torch.ones(4, 8, dtype=torch.int8)),
                                                                       torch.zeros(0, 8), torch.ones(4)).shape)),
        }))
    """)
    for case in ("gemm_a8_negative_K", "linear_f32_negative_K", "packed_bytes_negative", "packed_bytes_overflow",
                 "padded_k_negative"):
        assert res[case][0] == "ValueError" and "N and K must lie in" in res[case][1], (case, res[case])
    assert res["pack_invalid_weights"][0] == "ValueError" and "outside the b1 alphabet" in res["pack_invalid_weights"][1]
    assert res["unpack_not_packed"][0] == "ValueError" and "expected a PackedWeight" in res["unpack_not_packed"][1]
    assert res["gemm_a8_zero_K"][0] == "ok" and res["linear_a8_zero_M"] == ["ok", "(0, 4)"]
