"""End-to-end engine benchmark (BENCH.md): prefill pp128 and decode tg128 tok/s of random ternary
models of the 700M shape (hidden 1536, FFN 4096, 24 layers, 16 heads, vocabulary 32000, untied LM
head, fp16 embedding) in the BitNet and Llama layouts, at 1 and 2 threads, with % of the read
roofline measured in the same run, load + repack time, RSS growth and file size; side by side with
PyTorch fp32 / bf16 HF models of the same shape.

    python benchmarks/e2e.py                 # full run (check `uptime` first: the machine must be quiet)
    python benchmarks/e2e.py --quick         # a small shape, to check the script
    python benchmarks/e2e.py --llamacpp      # + llama.cpp TQ2_0 / TQ1_0 rows on GGUFs exported from the same weights
    python benchmarks/e2e.py --gguf m.gguf   # + llama.cpp on any GGUF
    python benchmarks/e2e.py --shape 3b256 --llamacpp --no-torch --variants llama-i2-i8   # the 3B twin
    python benchmarks/e2e.py --llamacpp --no-torch --threads 2 --variants llama-i2-i8,llama-t1-i8 --paired 5
                                             # + the target ratios from paired, rotating rounds

Random weights do not change the speed of these formats. Checkpoints are written packed, directly
(no fp32 model is ever built for the bitllm rows). The Llama layout is SiLU-gated (what llama.cpp
runs); the BitNet layout keeps BitNet's ReLU² (llama.cpp cannot express it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_table, loadavg, machine_line, roofline_gbs, write_results  # noqa: E402

SHAPES = {
    "700m": dict(hidden=1536, ffn=4096, layers=24, heads=16, vocab=32000),
    "3b": dict(hidden=3200, ffn=8640, layers=26, heads=32, vocab=32000),  # the paper's 3B: not 256-aligned
    "3b256": dict(hidden=3328, ffn=8704, layers=26, heads=32, vocab=32000),  # its 256-aligned twin (llama.cpp TQ)
    "quick": dict(hidden=256, ffn=768, layers=4, heads=4, vocab=32000),
}


# --- building random packed checkpoints without an fp32 model ---------------------------------------


def _config(layout: str, s: dict, ctx: int) -> dict:
    from transformers import BitNetConfig, LlamaConfig

    common = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                  max_position_embeddings=ctx, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg = LlamaConfig(**common) if layout == "llama" else BitNetConfig(**common)
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM" if layout == "llama" else "BitNetForCausalLM"]
    return d


def _linears(layout: str, s: dict) -> dict[str, tuple[int, int]]:
    H, F = s["hidden"], s["ffn"]
    out = {}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + "self_attn." + n] = (H, H)
        out[p + "mlp.gate_proj"] = (F, H)
        out[p + "mlp.up_proj"] = (F, H)
        out[p + "mlp.down_proj"] = (H, F)
    return out


def _tokenizer():
    """A small byte-level BPE tokenizer (GGUF export needs one; its ids are a subset of the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["random weights do not change the speed of these formats " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_random_checkpoint(directory: Path, layout: str, s: dict, ctx: int = 2048, seed: int = 0) -> Path:
    """A bitllm ternary I2 checkpoint with uniform random codes, written tensor by tensor."""
    import torch
    from safetensors.torch import save_file

    from bitllm.formats.checkpoint import FORMAT_VERSION

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    H = s["hidden"]
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.from_numpy(rng.standard_normal((s["vocab"], H), dtype=np.float32)).half(),
        "lm_head.weight": torch.from_numpy((rng.standard_normal((s["vocab"], H), dtype=np.float32) * 0.02)).half(),
        "model.norm.weight": torch.ones(H),
    }
    for i in range(s["layers"]):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(H)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(H)
        if layout == "bitnet":
            tensors[f"model.layers.{i}.self_attn.attn_sub_norm.weight"] = torch.ones(H)
            tensors[f"model.layers.{i}.mlp.ffn_sub_norm.weight"] = torch.ones(s["ffn"])
    linears = _linears(layout, s)
    for name, (N, K) in linears.items():
        codes = rng.integers(0, 3, size=(N, K // 4, 4), dtype=np.uint8)  # w+1 in {0,1,2}; K % 4 == 0 here
        packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)  # I2 file layout
        tensors[name + ".weight"] = torch.from_numpy(np.ascontiguousarray(packed))
        tensors[name + ".weight_scale"] = torch.tensor([0.02], dtype=torch.float32)
    meta = {"format": "pt", "bitllm_format": "i2", "bitllm_format_version": str(FORMAT_VERSION), "bitllm_method": "ternary"}
    save_file(tensors, str(directory / "model.safetensors"), metadata=meta)
    cfg = _config(layout, s, ctx)
    cfg["quantization_config"] = {"quant_method": "bitllm", "method": "ternary", "format": "i2",
                                  "format_version": FORMAT_VERSION, "modules": sorted(linears)}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    _tokenizer().save_pretrained(directory)
    return directory


# --- timing ---------------------------------------------------------------------------------------------


def _stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "reps": len(samples)}


def engine_runner(directory: Path, threads: int, head: str, kernel_format: str | None, pp: int, tg: int,
                  kv_dtype: str = "f32"):
    """(LLM, rep): rep() times one prefill of pp tokens and one greedy decode of tg tokens (tok/s each)."""
    from bitllm.engine import LLM

    llm = LLM(directory, threads=threads, head=head, kernel_format=kernel_format, max_context=pp + tg + 8,
              kv_dtype=kv_dtype)
    be = llm.backend
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, be.vocab, size=pp)]

    def rep() -> tuple[float, float]:
        slot = be.open(pp + 1)
        t0 = time.perf_counter()
        be.forward([slot], [prompt])
        dt = time.perf_counter() - t0
        be.close(slot)
        slot = be.open(tg + 1)
        tok = [1]
        t1 = time.perf_counter()
        for _ in range(tg):
            tok = [int(be.forward([slot], [tok])[0].argmax())]
        dt2 = time.perf_counter() - t1
        be.close(slot)
        return pp / dt, tg / dt2

    return llm, rep


def _run_reps(rep, reps: int) -> dict:
    rep()  # warm-up
    pre, dec = zip(*(rep() for _ in range(reps)))
    return {"prefill_tps": _stats(list(pre)), "decode_tps": _stats(list(dec))}


def bench_engine(directory: Path, threads: int, head: str, kernel_format: str | None, reps: int, pp: int, tg: int,
                 kv_dtype: str = "f32") -> dict:
    llm, rep = engine_runner(directory, threads, head, kernel_format, pp, tg, kv_dtype)
    eng = llm.backend.engine
    return {**_run_reps(rep, reps), "bytes_per_token": eng.bytes_per_token(), "weight_bytes": eng.weight_bytes(),
            "load_s": llm.load_info.get("load_s")}


def bench_torch(s: dict, dtype_name: str, threads: int, reps: int, pp: int, tg: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.set_num_threads(threads)
    cfg = LlamaConfig(**{k: v for k, v in _config("llama", s, pp + tg + 8).items()
                         if k not in ("architectures", "transformers_version")})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    build_s = time.perf_counter() - t0
    prompt = torch.randint(3, s["vocab"], (1, pp))
    pre, dec = [], []
    with torch.inference_mode():
        for r in range(reps + 1):
            t0 = time.perf_counter()
            model(prompt, use_cache=True)
            dt = time.perf_counter() - t0
            out = model(torch.tensor([[1]]), use_cache=True)
            t1 = time.perf_counter()
            for i in range(tg):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            dt2 = time.perf_counter() - t1
            if r:
                pre.append(pp / dt)
                dec.append(tg / dt2)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return {"prefill_tps": _stats(pre), "decode_tps": _stats(dec), "bytes_per_token": nbytes, "build_s": build_s}


def llamacpp_runner(gguf: str, threads: int, pp: int, tg: int):
    """(Llama, rep) for llama.cpp through llama-cpp-python (n_threads and n_threads_batch explicit,
    flash attention on, BENCH.md), or None without llama-cpp-python. rep() as in engine_runner."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp rows skipped: llama-cpp-python is not installed", file=sys.stderr)
        return None
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, flash_attn=True, n_ctx=pp + tg + 8,
                verbose=False)
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, llm.n_vocab(), size=pp)]

    def rep() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        dt = time.perf_counter() - t0
        llm.reset()
        llm.eval([1])
        t1 = time.perf_counter()
        for _ in range(tg):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        dt2 = time.perf_counter() - t1
        return pp / dt, tg / dt2

    return llm, rep


def bench_llamacpp(gguf: str, threads: int, reps: int, pp: int, tg: int) -> dict | None:
    """llama.cpp rows on a GGUF that bitllm exports from the same weights (or any GGUF)."""
    r = llamacpp_runner(gguf, threads, pp, tg)
    return None if r is None else {**_run_reps(r[1], reps), "bytes_per_token": os.path.getsize(gguf)}


def paired_rounds(contenders: dict, rounds: int) -> dict:
    """The target ratios with the machine's drift taken out: every contender runs one rep per round,
    in a rotating order, and each round's ratio to the first contender is taken within the round."""
    names = list(contenders)
    for rep in contenders.values():
        rep()  # warm-up
    res = {n: [] for n in names}
    for r in tqdm(range(rounds), desc="paired rounds", leave=False):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            res[n].append(contenders[n]())
    base = names[0]
    out = {}
    for n in names:
        pp_ratio = [p / b[0] for (p, _), b in zip(res[n], res[base])]
        tg_ratio = [d / b[1] for (_, d), b in zip(res[n], res[base])]
        out[n] = {"prefill_tps": statistics.median(p for p, _ in res[n]),
                  "decode_tps": statistics.median(d for _, d in res[n]),
                  "prefill_ratio": statistics.median(pp_ratio), "decode_ratio": statistics.median(tg_ratio),
                  "decode_ratio_range": (min(tg_ratio), max(tg_ratio))}
    return out


# --- RSS (a fresh process per model, so the allocator's history does not blur the growth) -----------


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def child_rss(directory: str, head: str, kv_positions: int, kv_dtype: str) -> None:
    import bitllm.engine  # noqa: F401  (libraries are not the model: import everything LLM() imports first)
    import bitllm.formats.checkpoint  # noqa: F401
    from bitllm import _engine  # noqa: F401
    from bitllm.engine import LLM
    from bitllm.engine.loader import read_config

    read_config(Path(directory))
    base = _rss()
    llm = LLM(directory, threads=1, head=head, kv_dtype=kv_dtype)
    slot = llm.backend.open(kv_positions)
    # fill the cache as the benchmark does (a prefill of half, then decode steps): the engine only
    # touches KV pages as positions are written, so RSS at one token would flatter the ratio
    llm.backend.forward([slot], [[1] * (kv_positions // 2)])
    for _ in range(kv_positions - kv_positions // 2):
        llm.backend.forward([slot], [[1]])
    eng = llm.backend.engine
    print(json.dumps({"rss_growth": _rss() - base, "weight_bytes": eng.weight_bytes(), "kv_bytes": eng.kv_bytes(),
                      "load_s": llm.load_info["load_s"]}))


def measure_rss(directory: Path, head: str, kv_positions: int, kv_dtype: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child-rss", str(directory), "--head", head,
                        "--kv", str(kv_positions), "--kv-dtype", kv_dtype], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------------


def _variant(v: str) -> tuple[str, str, str, str]:
    """'llama-i2-i8[-kv16]' -> (layout, kernel format, head, KV cache dtype)."""
    parts = v.split("-")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "kv16"):
        raise SystemExit(f"--variants: {v!r} is not layout-kernelformat-head[-kv16]")
    return parts[0], parts[1], parts[2], "f16" if len(parts) == 4 else "f32"


def _row_name(layout: str, kf: str, head: str, kv: str) -> str:
    return f"bitllm {layout} {kf.upper()} head {head}" + (" kv f16" if kv == "f16" else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape, 2 reps, no torch bf16")
    ap.add_argument("--shape", default="700m", choices=sorted(SHAPES),
                    help="700m | 3b (3200/8640/26: not 256-aligned, so no llama.cpp TQ rows) | 3b256 (3328/8704/26)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--torch-tg", type=int, default=16, help="decode tokens per rep for the (slow) PyTorch rows")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-dtypes", default="fp32,bf16")
    ap.add_argument("--variants", default="llama-i2-i8,llama-t1-i8,llama-i2-f16,bitnet-i2-i8",
                    help="bitllm rows as layout-kernelformat-head[-kv16] (kv16: the fp16 KV cache)")
    ap.add_argument("--gguf", default=None, help="llama.cpp hook: a GGUF of the same weights")
    ap.add_argument("--llamacpp", action="store_true",
                    help="export the Llama-layout weights to GGUF TQ2_0 / TQ1_0 (head Q8_0) and run llama.cpp on them")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                    help="with --llamacpp: after the table, this many paired rounds at the largest thread count "
                         "(llama.cpp TQ2_0 and the Llama-layout bitllm rows, one rep each per round, order "
                         "rotating): the target ratios, taken within each round")
    ap.add_argument("--child-rss", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--head", default="i8", help=argparse.SUPPRESS)
    ap.add_argument("--kv", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--kv-dtype", default="f32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_rss:
        return child_rss(a.child_rss, a.head, a.kv, a.kv_dtype)
    from bitllm import _engine

    shape_name = "quick" if a.quick else a.shape
    shape = SHAPES[shape_name]
    if a.llamacpp and shape["hidden"] % 256:
        print(f"--llamacpp: hidden {shape['hidden']} is not a multiple of 256, which llama.cpp's TQ1_0/TQ2_0 need; "
              "use --shape 3b256 for the llama.cpp comparison")
        a.llamacpp = False
    reps = 2 if a.quick else a.reps
    threads = [int(t) for t in a.threads.split(",")]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bitllm-e2e-"))
    load_before = loadavg()
    roof = {t: roofline_gbs(t) for t in threads}
    print(machine_line(_engine.active_isa(), max(threads)))
    print("read roofline: " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in roof.items()) + " (best of 5, 1 GiB, this run)")
    print(f"engine: kernels {_engine.active_isa()}, engine vector code {_engine.simd_name()}; shape {shape}; "
          f"pp{a.pp} / tg{a.tg}, median and min of {reps} reps after a warm-up")

    dirs = {}
    for layout in sorted({v.split("-")[0] for v in a.variants.split(",") if v} | ({"llama"} if a.llamacpp else set())):
        t0 = time.perf_counter()
        cfg_file = work / layout / "config.json"
        if cfg_file.exists() and json.loads(cfg_file.read_text())["hidden_size"] == shape["hidden"] and \
                json.loads(cfg_file.read_text())["num_hidden_layers"] == shape["layers"] and \
                (work / layout / "tokenizer.json").exists():
            dirs[layout] = work / layout  # reuse (same seed, same shape)
            verb = "reused"
        else:
            dirs[layout] = write_random_checkpoint(work / layout, layout, shape)
            verb = "wrote"
        size = sum(f.stat().st_size for f in dirs[layout].glob("*.safetensors"))
        print(f"{verb} random {layout} checkpoint: {size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")

    variants = [_variant(v) for v in a.variants.split(",") if v]
    rows, results = [], []
    for layout, kf, head, kv in variants:
        mem = measure_rss(dirs[layout], head, a.pp + a.tg, kv)
        size = sum(f.stat().st_size for f in dirs[layout].glob("*.safetensors"))
        for t in threads:
            r = bench_engine(dirs[layout], t, head, kf, reps, a.pp, a.tg, kv)
            r.update(name=_row_name(layout, kf, head, kv), threads=t, file_bytes=size, **mem)
            results.append(r)
    if not a.no_torch:
        for dt in (("fp32",) if a.quick else a.torch_dtypes.split(",")):
            for t in threads:
                r = bench_torch(shape, dt, t, max(2, reps // 2), a.pp, a.torch_tg)
                r.update(name=f"PyTorch {dt} (HF Llama, tg{a.torch_tg})", threads=t)
                results.append(r)
    ggufs = [a.gguf] if a.gguf else []
    if a.llamacpp:
        from bitllm.formats.gguf_io import export_gguf

        for q in ("tq2_0", "tq1_0"):
            out = work / f"llama-{q}.gguf"
            if not out.exists():
                t0 = time.perf_counter()
                export_gguf(dirs["llama"], out, q, embed_type="f16", head_type="q8_0")
                print(f"exported {out.name} ({out.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
            ggufs.append(str(out))
    for g in ggufs:
        for t in threads:
            r = bench_llamacpp(g, t, reps, a.pp, a.tg)
            if r and a.llamacpp:  # our export: an f16 token embedding that decode does not stream
                r["bytes_per_token"] -= shape["vocab"] * shape["hidden"] * 2
            if r:
                r.update(name=f"llama.cpp {Path(g).name}", threads=t, file_bytes=os.path.getsize(g))
                results.append(r)

    base = {t: next((r for r in results if r["threads"] == t and r["name"].startswith("PyTorch fp32")), None) for t in threads}
    tq2 = {t: next((r for r in results if r["threads"] == t and "tq2_0" in r["name"]), None) for t in threads}
    for r in results:
        t = r["threads"]
        dec, pre = r["decode_tps"]["median"], r["prefill_tps"]["median"]
        roof_pct = 100 * dec * r["bytes_per_token"] / (roof[t] * 1e9)
        b = base[t]
        ratio = f"{dec / b['decode_tps']['median']:.1f}x" if b else "-"
        q = tq2[t]
        ratio_q = f"{dec / q['decode_tps']['median']:.2f}x" if q else "-"
        rss = f"{r['rss_growth'] / (r['weight_bytes'] + r['kv_bytes']):.2f}" if "rss_growth" in r else "-"
        rows.append([r["name"], t, f"{pre:.1f} ({r['prefill_tps']['min']:.1f})", f"{dec:.1f} ({r['decode_tps']['min']:.1f})",
                     ratio, ratio_q, f"{r['bytes_per_token'] / 2**20:.0f}", f"{roof_pct:.0f}%",
                     f"{r['load_s']:.2f}" if r.get("load_s") else "-", rss,
                     f"{r['file_bytes'] / 2**20:.0f}" if "file_bytes" in r else "-"])
    print()
    print(fmt_table(["model", "thr", "pp tok/s med (min)", "tg tok/s med (min)", "tg vs torch fp32", "tg vs TQ2_0", "MiB/token",
                     "% roofline", "load+repack s", "RSS growth / (weights+KV)", "file MiB"], rows))
    print(f"\nload avg before: {load_before}, after: {loadavg()}")
    if not ggufs:
        print("llama.cpp TQ2_0 / TQ1_0 rows: pass --llamacpp (needs llama-cpp-python) or --gguf; BENCH.md anchor on a "
              "Zen 3 at 2 threads: TQ2_0 58-68 tok/s decode.")
    print("MiB/token: linear weights + LM head streamed per decoded token (llama.cpp rows: GGUF size minus the f16 embedding).")
    paired = None
    if a.paired and a.llamacpp:
        t = max(threads)
        keep = []  # the models stay loaded for all rounds
        contenders = {}
        r = llamacpp_runner(str(work / "llama-tq2_0.gguf"), t, a.pp, a.tg)
        if r:
            keep.append(r[0])
            contenders["llama.cpp TQ2_0"] = r[1]
            for layout, kf, head, kv in variants:
                if layout == "llama":
                    llm, rep = engine_runner(dirs[layout], t, head, kf, a.pp, a.tg, kv)
                    keep.append(llm)
                    contenders[_row_name(layout, kf, head, kv)] = rep
            paired = paired_rounds(contenders, a.paired)
            print(f"\nPaired rounds ({a.paired}, {t} threads; each ratio taken within a round, then the median; "
                  f"load avg now {loadavg()}):")
            print(fmt_table(["model", "pp tok/s med", "tg tok/s med", "pp vs TQ2_0", "tg vs TQ2_0", "tg ratio min-max"],
                            [[n, f"{v['prefill_tps']:.1f}", f"{v['decode_tps']:.1f}", f"{v['prefill_ratio']:.2f}x",
                              f"{v['decode_ratio']:.2f}x",
                              f"{v['decode_ratio_range'][0]:.2f}-{v['decode_ratio_range'][1]:.2f}"]
                             for n, v in paired.items()]))
        del keep
    path = write_results("e2e" + ("" if shape_name == "700m" else f"-{shape_name}"), {"machine": machine_line(_engine.active_isa(), max(threads)),
                                                                 "roofline_gbs": roof, "shape": shape, "results": results,
                                                                 "paired": paired})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
