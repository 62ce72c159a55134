"""Reports: Markdown + JSON tables and PNG plots (matplotlib, Agg) for perplexity, zero-shot and bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ppl_markdown(results: Sequence[dict]) -> str:
    return md_table(["model", "source", "split", "tokens", "ctx/stride", "ppl", "bits/token", "bits/byte", "bpw"],
                    [[r["model"], r["source"], r["split"], r["tokens"], f"{r['context']}/{r['stride']}", r["ppl"],
                      r["bits_per_token"], r["bits_per_byte"], r.get("bits_per_weight")] for r in results])


def zeroshot_markdown(rows: Sequence[dict]) -> str:
    return md_table(["model", "task", "metric", "value", "± stderr", "n"],
                    [[r.get("model", ""), r["task"], r["metric"], r["value"], r["stderr"], r["n"]] for r in rows])


def bench_markdown(res: dict) -> str:
    """The bench table: one row per engine, ratios to the baseline row (BENCH.md)."""
    from bitllm.eval.bench import machine_line

    base = next((r for r in res["rows"] if r["label"] == res.get("baseline")), None)
    ratio = lambda r, key: (r[key]["median"] / base[key]["median"]) if base and "skipped" not in base else None  # noqa: E731
    bs_keys = [str(b) for b in res["config"]["batch_sizes"]]
    headers = ["engine", "file MiB", "RSS growth at load MiB", "model RSS MiB (peak - before)", "peak RSS MiB", "prefill tok/s (med/min)",
               "decode tok/s (med/min)", "decode x base", "p50/p90/p99 ms", "% roofline",
               *[f"batch {b} tok/s" for b in bs_keys], "J/decode token"]
    rows = []
    for r in res["rows"]:
        if "skipped" in r:
            rows.append([r["label"], "skipped: " + r["skipped"], *[None] * (len(headers) - 2)])
            continue
        lat = r["latency_ms"]
        e = r["energy"]
        rows.append([
            r["label"], r["file_bytes"] / 2**20, r["rss_after_load_mib"] - r["rss_before_load_mib"], r["model_rss_mib"],
            r["rss_peak_mib"],
            f"{r['prefill_tok_s']['median']:.1f}/{r['prefill_tok_s']['min']:.1f}",
            f"{r['decode_tok_s']['median']:.1f}/{r['decode_tok_s']['min']:.1f}",
            ratio(r, "decode_tok_s"),
            f"{lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f}", r["roofline_pct"],
            *[(f"{r['batched'][b]['tok_s']['median']:.1f}" if r["batched"].get(b) else "n/a") for b in bs_keys],
            f"{e['joules_per_token']:.3g}" + (" (ESTIMATE)" if e["estimate"] else ""),
        ])
    energy = next((r["energy"]["method"] for r in res["rows"] if "energy" in r), "")
    c = res["config"]
    notes = [
        f"machine: {machine_line(res['machine'])}",
        f"load avg after: {res.get('loadavg_after', '')}",
        f"prompt {c['prompt_tokens']} tokens, {c['gen_tokens']} generated, median/min of {c['reps']} reps after a "
        f"warm-up; batched: {c['batch_prompt_tokens']}-token prompts, {c['batch_gen_tokens']} tokens each, "
        f"tok/s = generated tokens / wall time (prefill included); baseline row: {res.get('baseline')}",
        f"energy: {energy}",
        "% roofline = weight bytes read per decoded token x decode tok/s / measured read bandwidth",
    ]
    return md_table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_bits(points: Sequence[dict], path: str | Path, title: str = "perplexity vs bits per weight") -> Path:
    """points: {"label", "bits_per_weight", "ppl", optional "split"}; one marker per split."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in sorted({p.get("split", "") for p in points}):
        ps = [p for p in points if p.get("split", "") == split]
        ax.scatter([p["bits_per_weight"] for p in ps], [p["ppl"] for p in ps], label=split or None)
        for p in ps:
            ax.annotate(p["label"], (p["bits_per_weight"], p["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (linear layers)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    if any(p.get("split") for p in points):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_speed_memory(series: dict[str, list[dict]], path: str | Path, title: str = "",
                      x_key: str = "params", x_label: str = "parameters") -> Path:
    """series: engine -> points {x_key, "tok_s", "memory_mib", optional "extrapolated"}; two panels."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in series.items():
        for ax, key in ((a1, "tok_s"), (a2, "memory_mib")):
            meas = [p for p in pts if not p.get("extrapolated") and p.get(key) is not None]
            extr = [p for p in pts if p.get("extrapolated") and p.get(key) is not None]
            line, = ax.plot([p[x_key] for p in meas], [p[key] for p in meas], "o-", label=name)
            if extr:
                ax.plot([p[x_key] for p in meas[-1:] + extr], [p[key] for p in meas[-1:] + extr], "x--",
                        color=line.get_color(), label=f"{name} (extrapolated)")
    for ax, lab in ((a1, "decode tokens/s (batch 1)"), (a2, "model memory, MiB (peak RSS - RSS before load)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_json(obj, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str))
    return p


def write_bench_report(res: dict, out_dir: str | Path, name: str = "bench") -> dict[str, Path]:
    """bench.json, bench.md and bench.png (decode tok/s and memory against model file size)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(res, out / f"{name}.json")}
    md = out / f"{name}.md"
    md.write_text(bench_markdown(res))
    paths["md"] = md
    series = {r["label"]: [{"file_mib": r["file_bytes"] / 2**20, "tok_s": r["decode_tok_s"]["median"],
                            "memory_mib": r["model_rss_mib"]}] for r in res["rows"] if "skipped" not in r}
    if series:
        paths["png"] = plot_speed_memory(series, out / f"{name}.png", title="bitllm bench (one model per engine)",
                                         x_key="file_mib", x_label="model file size (MiB)")
    return paths
