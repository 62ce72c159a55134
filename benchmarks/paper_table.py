"""Reproduce the structure of BitNet b1.58's Table 1 and Figure 2 (arXiv 2402.17764) on this machine.

Table 1 (memory, latency, perplexity of an fp model vs its 1.58-bit twin at each size): pairs of
trained checkpoints given with --pair FP_DIR:TERNARY_DIR, or (default) two tiny models trained here
in a few minutes by bitllm.train on the bundled corpus (same data, same steps). Perplexity is the
bundled held-out text (in-domain and out-of-domain), latency is decode ms/token at batch 1,
memory is the model's resident memory and file size.

Figure 2 (latency and memory vs model size): random-weight llama-shaped models (speed does not
depend on weight values) from 125M up to --max-size, as bitllm ternary (native engine), the PyTorch
fp32 twin and llama.cpp TQ2_0 of the same weights when llama-cpp-python is installed. Larger sizes
up to 70B are EXTRAPOLATED from the largest measured size (memory: measured overhead + analytic
weight bytes; latency: proportional to weight bytes read per token, i.e. memory-bound) and
labelled so in the table and the plot.

    .venv/bin/python benchmarks/paper_table.py                 # default: minutes
    .venv/bin/python benchmarks/paper_table.py --pair runs/fp:runs/ternary --max-size 700M

Writes benchmarks/results/paper_table.{json,md} and paper_figure2.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_line  # noqa: E402

# (hidden, ffn, layers, heads): the paper's FAQ shapes; 125M/350M/7B/13B/70B are LLaMA's
SHAPES = {
    "125M": (768, 2048, 12, 12),
    "350M": (1024, 2816, 24, 16),
    "700M": (1536, 4096, 24, 16),
    "1.3B": (2048, 5632, 24, 32),
    "3B": (3328, 8704, 26, 32),  # the 256-aligned twin of 3200/8640 (BENCH.md)
    "7B": (4096, 11008, 32, 32),
    "13B": (5120, 13824, 40, 40),
    "70B": (8192, 28672, 80, 64),
}
VOCAB = 32000


def n_params(shape) -> tuple[int, int]:
    """(linear-layer parameters, embedding + head parameters), untied head, no GQA."""
    h, f, L, _ = shape
    return L * (4 * h * h + 3 * h * f), 2 * VOCAB * h


def weight_bytes(shape, kind: str) -> tuple[int, int]:
    """(bytes resident, bytes read per decoded token): ternary I2 = 2 bits/weight + fp16 embedding and head;
    fp32 = 4 bytes everywhere; TQ2_0 = 2.0625 bits/weight + f16 embedding/head. One embedding row per token."""
    lin, emb = n_params(shape)
    head = emb // 2
    if kind == "fp":
        return 4 * (lin + emb), 4 * (lin + head)
    bpw = 2.0625 if kind == "llama.cpp" else 2.0
    return int(lin * bpw / 8) + 2 * emb, int(lin * bpw / 8) + 2 * head


def random_ternary(out: Path, shape) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import bitllm
    from bitllm.tiny import tiny_tokenizer

    h, f, L, heads = shape
    cfg = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=L, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=VOCAB, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    bitllm.quantize_(model, bitllm.config_for("ternary"))
    return bitllm.save_pretrained(model, out, "i2", tokenizer=tiny_tokenizer())


def figure2(sizes: list[str], work: Path, reps: int, threads: int | None, log) -> list[dict]:
    from bitllm.eval.bench import BenchConfig, _worker, make_fp_twin, model_file_bytes

    cfg = BenchConfig(prompt_tokens=16, gen_tokens=16, reps=reps, batch_sizes=(), threads=threads)
    try:
        import llama_cpp  # noqa: F401

        engines = ["bitllm", "fp", "llama.cpp"]
    except ImportError:
        engines = ["bitllm", "fp"]
    rows = []
    for size in sizes:
        shape = SHAPES[size]
        t0 = time.perf_counter()
        d = random_ternary(work / f"tern-{size}", shape)
        specs = {"bitllm": str(d), "fp": str(make_fp_twin(d, work / f"fp-{size}"))}
        if "llama.cpp" in engines:
            from bitllm.formats.gguf_io import export_gguf

            specs["llama.cpp"] = str(export_gguf(d, work / f"{size}-tq2_0.gguf", "tq2_0"))
        log(f"figure 2: {size} built in {time.perf_counter() - t0:.0f} s")
        for eng in engines:
            r = _worker(eng, specs[eng], cfg)
            rows.append({"size": size, "engine": eng, "params": sum(n_params(shape)), "extrapolated": False,
                         "file_mib": model_file_bytes(specs[eng]) / 2**20, "memory_mib": r["model_rss_mib"],
                         "peak_rss_mib": r["rss_peak_mib"], "latency_ms": 1e3 / r["decode_tok_s"]["median"],
                         "latency_min_ms": 1e3 / r["decode_tok_s"]["max"], "tok_s": r["decode_tok_s"]["median"],
                         "reps": r["decode_tok_s"]["reps"]})
            log(f"  {eng}: {rows[-1]['latency_ms']:.2f} ms/token, model RSS {rows[-1]['memory_mib']:.0f} MiB")
    # extrapolate every larger size from the largest measured one
    last = sizes[-1]
    for eng in engines:
        base = next(r for r in rows if r["size"] == last and r["engine"] == eng)
        res0, tok0 = weight_bytes(SHAPES[last], eng)
        overhead = base["memory_mib"] - res0 / 2**20
        for size in list(SHAPES)[list(SHAPES).index(last) + 1:]:
            res, tok = weight_bytes(SHAPES[size], eng)
            lat = base["latency_ms"] * tok / tok0
            rows.append({"size": size, "engine": eng, "params": sum(n_params(SHAPES[size])), "extrapolated": True,
                         "file_mib": None, "memory_mib": overhead + res / 2**20, "peak_rss_mib": None,
                         "latency_ms": lat, "latency_min_ms": None, "tok_s": 1e3 / lat, "reps": 0})
    return rows


def train_pair(work: Path, steps: int, log) -> list[tuple[str, str, str]]:
    """Train the tiny fp and ternary twins on the same data for the same steps."""
    from bitllm.train.config import preset_config
    from bitllm.train.data import build_corpus
    from bitllm.train.trainer import train

    cfgs = {q: preset_config("tiny", quant=q, layout="llama", output_dir=str(work / f"train-{q}"), steps=steps)
            for q in ("none", "ternary")}
    c = cfgs["ternary"]
    corpus = build_corpus(c.data, c.model.seq_len, c.model.vocab_size)
    dirs = {}
    for q, cfg in cfgs.items():
        t0 = time.perf_counter()
        dirs[q] = str(train(cfg, overwrite=True, corpus=corpus).model_dir)
        log(f"table 1: trained tiny {q} ({steps} steps) in {time.perf_counter() - t0:.0f} s -> {dirs[q]}")
    return [("tiny (train preset, %d steps)" % steps, dirs["none"], dirs["ternary"])]


def table1(pairs: list[tuple[str, str, str]], reps: int, threads: int | None, max_tokens: int, log) -> list[dict]:
    from bitllm.eval import evaluate_perplexity, open_model
    from bitllm.eval.bench import BenchConfig, _worker, model_file_bytes

    cfg = BenchConfig(prompt_tokens=16, gen_tokens=16, reps=reps, batch_sizes=(), threads=threads)
    rows = []
    for size, fp, tern in pairs:
        for name, d in (("fp32 (LLaMA layout)", fp), ("BitNet b1.58 (ternary I2)", tern)):
            r = _worker("fp" if d == fp else "bitllm", d, cfg)
            m = open_model(d, threads=threads)
            ppl = {p.split: p.ppl for p in evaluate_perplexity(m, "bundled", max_tokens=max_tokens, progress=False)}
            rows.append({"size": size, "model": name, "dir": d, "file_mib": model_file_bytes(d) / 2**20,
                         "memory_mib": r["model_rss_mib"], "latency_ms": 1e3 / r["decode_tok_s"]["median"],
                         "backend": r["backend"], "ppl_in_domain": ppl["in-domain"],
                         "ppl_out_of_domain": ppl["out-of-domain"]})
            log(f"  {size} {name}: {rows[-1]['latency_ms']:.3f} ms/token, ppl {ppl}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", action="append", default=[], help="FP_DIR:TERNARY_DIR of one size (repeatable).")
    ap.add_argument("--train-steps", type=int, default=60, help="Steps for the default tiny pair.")
    ap.add_argument("--max-size", default="125M", choices=list(SHAPES), help="Largest random model measured.")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ppl-tokens", type=int, default=8192, help="Held-out tokens scored per split.")
    ap.add_argument("--work", type=Path, default=None, help="Scratch directory (default: a temp dir).")
    args = ap.parse_args()

    from bitllm.engine.llm import set_threads
    from bitllm.eval.bench import machine
    from bitllm.eval.report import md_table, plot_speed_memory, write_json

    threads = set_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bitllm-paper-"))
    log = lambda s: print(s, flush=True)  # noqa: E731
    m = machine(threads)
    log(machine_line(m["isa"], threads, m["roofline_gbs"]))
    pairs = [("given", *p.split(":", 1)) for p in args.pair] or train_pair(work, args.train_steps, log)
    t1 = table1(pairs, args.reps, threads, args.ppl_tokens, log)
    sizes = list(SHAPES)[: list(SHAPES).index(args.max_size) + 1]
    f2 = figure2(sizes, work, args.reps, threads, log)

    md = ["# BitNet b1.58 Table 1 / Figure 2, reproduced in structure on this machine", "",
          f"machine: {machine_line(m['isa'], threads, m['roofline_gbs'])}", "",
          "## Table 1 (trained models: memory, latency, perplexity on bundled held-out text)", "",
          md_table(["size", "model", "runs on", "file MiB", "model RSS MiB (peak - before load)", "latency ms/token (median)", "PPL in-domain",
                    "PPL out-of-domain"],
                   [[r["size"], r["model"], "PyTorch" if r["backend"] == "hf" else "bitllm engine", r["file_mib"], r["memory_mib"], r["latency_ms"], r["ppl_in_domain"],
                     r["ppl_out_of_domain"]] for r in t1]), "",
          "## Figure 2 (random-weight models: decode latency and memory vs size)", "",
          md_table(["size", "params", "engine", "latency ms/token", "model RSS MiB (peak - before load)", "file MiB", "measured?"],
                   [[r["size"], f"{r['params'] / 1e6:.0f}M", r["engine"], r["latency_ms"], r["memory_mib"],
                     r["file_mib"], "EXTRAPOLATED" if r["extrapolated"] else f"median of {r['reps']}"] for r in f2]),
          "", "Extrapolation: memory = measured overhead at the largest measured size + analytic weight bytes; "
          "latency = measured latency x (weight bytes read per token ratio), i.e. assumes decode stays memory-bound.",
          f"load avg after: {' '.join(f'{v:.2f}' for v in __import__('os').getloadavg())}"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json({"machine": m, "table1": t1, "figure2": f2}, RESULTS / "paper_table.json")
    (RESULTS / "paper_table.md").write_text("\n".join(md) + "\n")
    series = {}
    for r in f2:
        series.setdefault(r["engine"], []).append({"params": r["params"], "tok_s": 1e3 / r["latency_ms"],
                                                   "memory_mib": r["memory_mib"], "extrapolated": r["extrapolated"]})
    plot_speed_memory(series, RESULTS / "paper_figure2.png",
                      title="decode speed and memory vs model size (dashed: extrapolated)")
    print("\n".join(md))
    print(f"wrote {RESULTS / 'paper_table.md'}, paper_table.json, paper_figure2.png")


if __name__ == "__main__":
    main()
