"""`bitllm eval`'s Python API: perplexity and zero-shot for one model, with reports written to disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from bitllm.eval.models import EvalModel, open_model

# bits per weight of the linear layers, by checkpoint format (docs/formats.md) or GGUF type
FORMAT_BITS = {"i2": 2.0, "t1": 1.6, "b1": 1.0, "tq2_0": 2.0625, "tq1_0": 1.6875}
DTYPE_BITS = {"float32": 32.0, "float16": 16.0, "bfloat16": 16.0}


def bits_per_weight(model: EvalModel) -> float | None:
    """Stored bits per weight of the model's linear layers (None when unknown)."""
    if model.kind in ("llama.cpp", "gguf-hf", "gguf-bitllm"):  # the GGUF type in the file name
        name = Path(model.name).name.lower()
        return next((b for k, b in FORMAT_BITS.items() if k in name), None)
    cfg = model.llm.config if model.llm is not None else None
    q = getattr(cfg, "quantization_config", None) if cfg is not None else None
    if q is not None:
        q = q if isinstance(q, dict) else q.to_dict()
        if q.get("quant_method") == "bitnet":
            return 2.0  # HF BitNet layout: I2
        return FORMAT_BITS.get(str(q.get("format", "")).lower())
    if model.llm is not None and hasattr(model.llm.backend, "model"):
        p = next(model.llm.backend.model.parameters())
        return DTYPE_BITS.get(str(p.dtype).replace("torch.", ""))
    return None


def evaluate(model: str, *, ppl: list[str] = (), tasks: list[str] = (), context: int | None = None,
             stride: int | None = None, max_tokens: int | None = 16384, backend: str = "auto",
             threads: int | None = None, tokenizer: str | None = None, include_path: str | None = None,
             limit: float | None = None, num_fewshot: int | None = None, model_type: str = "bitllm",
             lm_eval_kwargs: dict[str, Any] | None = None, output: str | Path | None = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Perplexity on each `ppl` source and lm-eval on `tasks`; writes eval.json / eval.md / ppl.png
    under `output` when given. Returns {"perplexity": [...], "zeroshot": [...], "lm_eval": {...}}."""
    from bitllm.eval.perplexity import evaluate_perplexity
    from bitllm.eval.report import plot_ppl_vs_bits, ppl_markdown, write_json, zeroshot_markdown

    out: dict[str, Any] = {"model": str(model), "perplexity": [], "zeroshot": []}
    if ppl:
        m = open_model(model, backend=backend, threads=threads, tokenizer=tokenizer)
        bpw = bits_per_weight(m)
        log(f"eval: {model} opened as {m.kind} (context {m.max_length}, {bpw} bits/weight)")
        for source in ppl:
            for r in evaluate_perplexity(m, source, context=context, stride=stride, max_tokens=max_tokens,
                                         progress=progress):
                row = r.as_dict() | {"bits_per_weight": bpw, "kind": m.kind}
                out["perplexity"].append(row)
                log(f"ppl {source}/{r.split}: {r.ppl:.3f} ({r.tokens} tokens, {r.bits_per_byte:.4f} bits/byte)")
        m.close()
    if tasks:
        from bitllm.eval.harness import run_lm_eval, summarize

        res = run_lm_eval(str(model), list(tasks), model_type=model_type, include_path=include_path,
                          num_fewshot=num_fewshot, limit=limit, threads=threads, backend=backend,
                          extra=lm_eval_kwargs)
        out["zeroshot"] = [r | {"model": str(model)} for r in summarize(res)]
        out["lm_eval"] = {"results": res.get("results"), "versions": res.get("versions"),
                          "n-samples": res.get("n-samples"), "config": res.get("config")}
    if output:
        d = Path(output)
        d.mkdir(parents=True, exist_ok=True)
        write_json(out, d / "eval.json")
        md = [f"# bitllm eval: {model}", ""]
        if out["perplexity"]:
            md += ["## Perplexity", "", ppl_markdown(out["perplexity"]), ""]
            pts = [{"label": Path(r["model"]).name, "bits_per_weight": r["bits_per_weight"], "ppl": r["ppl"],
                    "split": r["split"]} for r in out["perplexity"] if r["bits_per_weight"]]
            if pts:
                plot_ppl_vs_bits(pts, d / "ppl_vs_bits.png")
        if out["zeroshot"]:
            md += ["## Zero-shot (lm-eval)", "", zeroshot_markdown(out["zeroshot"]), ""]
        (d / "eval.md").write_text("\n".join(md))
        log(f"eval: wrote {d / 'eval.json'} and {d / 'eval.md'}")
    return out


def parse_kv(items: list[str]) -> dict[str, Any]:
    """["limit=10", "bootstrap_iters=0", "gen_kwargs={\"temperature\": 0}"] -> a dict (JSON values when they parse)."""
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            from bitllm.errors import BitLLMError

            raise BitLLMError(f"expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
