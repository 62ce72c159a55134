"""`make demo`: train a small 1.58-bit model and its full-precision twin from scratch on the bundled corpus.

Both see the same tokens in the same order; the ternary one uses the BitNet two-stage recipe, the twin the
single-stage fp recipe. The number of steps is fitted to a time budget (both get the same), so the demo
finishes on a slow machine and trains longer on a fast one. The table shows held-out perplexity in- and
out-of-domain beside a unigram model's (the floor of meaning), file size, decode speed and a sample.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from bitllm.train.config import TrainConfig, preset_config
from bitllm.train.data import Corpus, batch_indices, build_corpus
from bitllm.train.plot import plot_losses
from bitllm.train.trainer import build_model, compute_loss, train

PROMPT = "ROMEO.\n"
SAMPLE_TOKENS = 48
RESERVE_S = 50.0  # held-out evaluation, saving and decoding after training


# --- decoding: one function per path; DECODERS picks which path measures which model --------------


def decode_engine(model_dir: Path, prompt: str, n: int, seed: int) -> tuple[str, float, str]:
    """Sample with bitllm's native engine (`bitllm.LLM`); returns (text, decode tok/s, label)."""
    from bitllm.engine import LLM

    llm = LLM(model_dir, threads=2)
    llm.generate(prompt, max_new_tokens=4)  # warm-up: first-call allocations
    c = llm.generate(prompt, max_new_tokens=n, temperature=0.8, top_k=40, seed=seed)
    s = llm.last_stats
    tok_s = s["decode_tokens"] / s["decode_s"] if s.get("decode_s") else float("nan")
    return str(c), tok_s, f"engine ({llm.backend_name})"


def decode_hf(model_dir: Path, prompt: str, n: int, seed: int) -> tuple[str, float, str]:
    """Sample with the HF reference path (`bitllm.from_pretrained` + `model.generate`)."""
    from transformers import AutoTokenizer

    from bitllm.formats.checkpoint import from_pretrained

    model, tok = from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode(prompt)])  # (1, P)
    kw = dict(do_sample=True, temperature=0.8, top_k=40, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    tok_s = new.numel() / dt  # includes the prefill of the few-token prompt
    return tok.decode(new, skip_special_tokens=True), tok_s, "HF reference"


# the one line to change to measure the ternary model through the HF reference path instead of the engine
DECODERS: dict[str, Callable[[Path, str, int, int], tuple[str, float, str]]] = {"ternary": decode_engine, "none": decode_hf}


# --- the demo -------------------------------------------------------------------------------------


def _calibrate(cfgs: list[TrainConfig], corpus: Corpus, reps: int = 3) -> list[float]:
    """Seconds per optimizer step of each config, measured on real batches after one warm-up step."""
    times = []
    for cfg in cfgs:
        model = build_model(cfg, len(corpus.tokenizer), corpus.tokenizer.eos_token_id).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ts = []
        for step in range(reps + 1):
            t0 = time.perf_counter()
            x = corpus.train[batch_indices(corpus.train.shape[0], step, cfg.batch_size, cfg.seed)]  # (B, T)
            compute_loss(model, x).backward()
            opt.step()
            opt.zero_grad()
            ts.append(time.perf_counter() - t0)
        times.append(min(ts[1:]))
    return times


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def run_demo(output: Path, minutes: float = 6.0, preset: str = "demo") -> dict:
    """Train the ternary model and its fp twin within about `minutes` in all, then compare them."""
    console = Console(width=max(Console().width, 100))  # the table needs ~100 columns even in a log file
    t_start = time.perf_counter()
    output = Path(output)
    for sub in ("ternary", "fp"):
        shutil.rmtree(output / sub, ignore_errors=True)

    base = {"ternary": preset_config(preset, "ternary", output_dir=str(output / "ternary")),
            "none": preset_config(preset, "none", output_dir=str(output / "fp"))}
    m = base["ternary"].model
    console.rule("[bold]bitllm demo: a 1.58-bit model and its full-precision twin, trained from scratch")
    console.print("corpus: Shakespeare + KJV (last 5 % of every source held out), Wikipedia leads held out whole")
    corpus = build_corpus(base["ternary"].data, m.seq_len, m.vocab_size)
    console.print(f"  {corpus.train_text_chars / 1e6:.1f} M characters -> {corpus.train_tokens / 1e6:.2f} M training "
                  f"tokens (byte-level BPE, {len(corpus.tokenizer)} tokens, trained just now); held-out: "
                  + ", ".join(f"{k} {v.numel():,}" for k, v in corpus.heldout.items()))

    per_step = _calibrate(list(base.values()), corpus)
    budget = minutes * 60 - (time.perf_counter() - t_start) - RESERVE_S
    steps = int(max(60, min(2000, budget / sum(per_step))))
    warmup = max(10, steps // 10)
    console.print(f"model: {m.layout} layout, hidden {m.hidden_size}, {m.num_layers} layers, seq {m.seq_len}, "
                  f"batch {base['ternary'].batch_size}; measured {per_step[0]:.2f} s/step ternary, "
                  f"{per_step[1]:.2f} s/step fp -> {steps} steps each "
                  f"({steps * base['ternary'].batch_size * m.seq_len / 1e6:.2f} M tokens)")

    results = {}
    for quant, cfg in base.items():
        cfg = preset_config(preset, quant, output_dir=cfg.output_dir, steps=steps, save_every=steps,
                            overrides={"recipe.warmup_steps": warmup})
        results[quant] = train(cfg, overwrite=True, corpus=corpus)

    t, f = results["ternary"], results["none"]
    plot = plot_losses({"ternary (BitNet b1.58, W1.58A8)": t.losses, "fp twin (fp32)": f.losses},
                       output / "loss.png", title=f"training loss, ternary vs its fp twin on the same {steps * cfg.batch_size * m.seq_len / 1e6:.2f} M tokens",
                       tokens_per_step=cfg.batch_size * m.seq_len)

    decoded = {q: DECODERS[q](results[q].model_dir, PROMPT, SAMPLE_TOKENS, 0) for q in ("ternary", "none")}
    table = Table(title=f"held-out perplexity after {steps} steps ({t.params / 1e6:.2f} M parameters each)")
    for col in ("model", "in-domain ppl", "out-of-domain ppl", "file size", "decode tok/s", "decoded by"):
        table.add_column(col, justify="right" if col not in ("model", "decoded by") else "left")
    for name, q in (("ternary 1.58-bit", "ternary"), ("fp twin", "none")):
        r = results[q]
        table.add_row(name, f"{r.heldout_ppl['in-domain']:.2f}", f"{r.heldout_ppl['out-of-domain']:.2f}",
                      f"{_size(r.model_dir) / 2**20:.2f} MiB", f"{decoded[q][1]:,.0f}", decoded[q][2])
    ratio = {k: t.heldout_ppl[k] / f.heldout_ppl[k] for k in t.heldout_ppl}
    table.add_row("ternary / fp", f"{ratio['in-domain']:.3f}", f"{ratio['out-of-domain']:.3f}",
                  f"{_size(t.model_dir) / _size(f.model_dir):.3f}", "", "")
    table.add_row("unigram floor", f"{t.unigram_ppl['in-domain']:.2f}", f"{t.unigram_ppl['out-of-domain']:.2f}", "", "", "")
    console.print(table)
    console.print(f"[bold]ternary sample[/bold] (temperature 0.8, top-k 40) after {PROMPT!r}:")
    console.print(PROMPT + decoded["ternary"][0], markup=False, highlight=False)
    console.print(f"loss curves: {plot}")
    console.print(f"models: {t.model_dir} (packed I2), {f.model_dir} (HF fp32); "
                  f"`bitllm.LLM('{t.model_dir}')` loads the ternary one")
    elapsed = time.perf_counter() - t_start
    console.print(f"demo took {elapsed / 60:.1f} min")
    summary = {"steps": steps, "params": t.params, "elapsed_s": elapsed, "ratio": ratio,
               "step_time_s": {"ternary": t.step_time_s, "none": f.step_time_s},
               "heldout_ppl": {"ternary": t.heldout_ppl, "none": f.heldout_ppl}, "unigram_ppl": t.unigram_ppl,
               "decode_tok_s": {q: decoded[q][1] for q in decoded}}
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
