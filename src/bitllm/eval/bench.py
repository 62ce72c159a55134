"""`bitllm bench`: file size, memory, prefill/decode speed, latency percentiles, batched throughput
and energy of a model, side by side with its baselines in the same run (/work/shared/BENCH.md).

Rows: the model itself (bitllm.LLM: native engine), `fp` (a PyTorch full-precision model: a given
twin/teacher, or a same-shape random-weight fp twin made from the config: speed does not depend on
weight values) and `llama.cpp` (the same weights exported to GGUF TQ2_0, run by llama-cpp-python
with explicit threads and flash attention). Each row runs in its own fresh Python process so that
resident memory is that model's alone; the machine line and the read-bandwidth roofline are
measured once in the same run. Times: median and min over `reps` repetitions after a warm-up.

Energy: RAPL package counters (/sys/class/powercap/intel-rapl*/energy_uj) when readable; else an
ESTIMATE, labelled so, from the process' CPU-seconds times an assumed power per busy core.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bitllm.errors import BitLLMError

DEFAULT_WATTS_PER_CORE = 4.0  # assumed package power per busy core (server Zen/Xeon: TDP / cores ~ 3-6 W)


@dataclass
class BenchConfig:
    prompt_tokens: int = 128
    gen_tokens: int = 32
    reps: int = 5
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    batch_prompt_tokens: int = 16
    batch_gen_tokens: int = 16
    threads: int | None = None
    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    seed: int = 0


# --- small measurements ----------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return _proc_status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _proc_status_kib("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, "5" > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rapl_files() -> list[Path]:
    root = Path("/sys/class/powercap")
    # top-level package domains only (intel-rapl:N, not the :N:M sub-domains that they already include)
    return sorted(p / "energy_uj" for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) if root.exists() else []


def _rapl_read() -> list[tuple[int, int]] | None:
    """(energy_uj, max_energy_range_uj or 0) per package domain; None when unreadable (VMs, no permission)."""
    files = _rapl_files()
    if not files:
        return None
    try:
        out = []
        for f in files:
            rng = f.parent / "max_energy_range_uj"
            out.append((int(f.read_text()), int(rng.read_text()) if rng.exists() else 0))
        return out
    except (OSError, ValueError):
        return None


def rapl_joules() -> float | None:
    """Package energy counters summed, in joules; None when unreadable (VMs, no permission)."""
    r = _rapl_read()
    return None if r is None else sum(e for e, _ in r) / 1e6


def rapl_delta_joules(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> float:
    """Joules between two _rapl_read() readings; a counter that wrapped past its range is unwrapped."""
    total = 0
    for (e0, rng), (e1, _) in zip(before, after):
        d = e1 - e0
        total += d + rng if d < 0 and rng > 0 else d
    return total / 1e6


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


class EnergyMeter:
    """Energy over a block: RAPL when readable, else CPU-seconds x watts_per_core (an ESTIMATE).
    `mark(phase)` inside the block splits it into named phases (phase_joules, phase_cpu_s at exit)."""

    def __init__(self, watts_per_core: float) -> None:
        self.watts = watts_per_core
        self.rapl = _rapl_read() is not None

    def __enter__(self):
        self.r0, self.c0 = (_rapl_read() if self.rapl else None), cpu_seconds()
        self._phases: dict[str, list[float]] = {}  # phase -> [RAPL joules, CPU seconds]
        self._open: tuple | None = None  # (phase, RAPL reading, CPU seconds) where it started
        return self

    def mark(self, phase: str | None) -> None:
        """End the current phase (if any) and start `phase` (None: none until the next mark)."""
        r, c = (_rapl_read() if self.rapl else None), cpu_seconds()
        if self._open is not None:
            name, r0, c0 = self._open
            acc = self._phases.setdefault(name, [0.0, 0.0])
            if r0 is None or r is None:
                self.rapl = False
            else:
                acc[0] += rapl_delta_joules(r0, r)
            acc[1] += c - c0
        self._open = None if phase is None else (phase, r, c)

    def __exit__(self, *exc) -> None:
        self.mark(None)
        self.cpu_s = cpu_seconds() - self.c0
        r1 = _rapl_read() if self.rapl else None
        if self.r0 is None or r1 is None:  # never readable, or stopped being so: the labelled estimate
            self.rapl = False
        self.joules = rapl_delta_joules(self.r0, r1) if self.rapl else self.cpu_s * self.watts
        self.phase_cpu_s = {k: c for k, (_, c) in self._phases.items()}
        self.phase_joules = {k: (j if self.rapl else c * self.watts) for k, (j, c) in self._phases.items()}

    @property
    def method(self) -> str:
        if self.rapl:
            return "measured: RAPL package energy counters (whole package, includes other processes)"
        return (f"ESTIMATE (no readable RAPL counters): CPU-seconds of this process x {self.watts:g} W per busy "
                f"core (assumed package power per core, not measured)")


def _summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "reps": len(xs)}


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, max(4, vocab), size=n).tolist()  # ids 0..2 are often special


# --- one row, inside its own process ---------------------------------------------------------------


def measure_llm(spec: str, cfg: BenchConfig, backend: str = "auto") -> dict:
    """Measure a model through bitllm.LLM (native engine, or transformers for fp models)."""
    import bitllm
    from bitllm.engine.sampling import SamplingParams

    _preimport(spec)
    reset_peak_rss()
    rss0 = rss_mib()
    t0 = time.perf_counter()
    llm = bitllm.LLM(spec, threads=cfg.threads, backend=backend)
    load_s = time.perf_counter() - t0
    rss1 = rss_mib()
    vocab = llm.backend.vocab
    params = SamplingParams(max_new_tokens=cfg.gen_tokens, ignore_eos=True)

    def one(prompt, mark=lambda phase: None):
        b = llm.batch()
        sid = b.add(prompt, params)
        mark("prefill")
        t = time.perf_counter()
        b.step()  # prefill (and the first token)
        pre = time.perf_counter() - t
        mark("decode")
        steps = []
        while not b.seqs[sid].finished:
            t = time.perf_counter()
            b.step()
            steps.append(time.perf_counter() - t)
        return pre, steps

    def batched(bs: int, rep: int) -> tuple[float, float]:
        b = llm.batch()
        p = SamplingParams(max_new_tokens=cfg.batch_gen_tokens, ignore_eos=True)
        for i in range(bs):
            b.add(_prompt(vocab, cfg.batch_prompt_tokens, cfg.seed + 1000 * (rep + 2) + i), p)
        t = time.perf_counter()
        b.run()
        total = time.perf_counter() - t
        return bs * cfg.batch_gen_tokens / total, b.stats["decode_tokens"] / max(b.stats["decode_s"], 1e-9)

    return _measure(cfg, one, batched, vocab, load_s, rss0, rss1, backend_name=llm.backend_name,
                    bytes_per_token=_llm_bytes_per_token(llm))


def _preimport(spec: str) -> None:
    """Import the code a load will import, so that RSS before/after load differ by the model alone."""
    import bitllm.engine.loader  # noqa: F401
    import bitllm.formats.checkpoint  # noqa: F401

    try:
        from bitllm import _engine  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(spec))]  # loads modeling_<family>.py
    except Exception:  # best effort: a missing import only makes "model RSS" include some code
        pass


def _llm_bytes_per_token(llm) -> int:
    """Weight bytes read per decoded token: every linear layer and the LM head (one embedding row aside)."""
    be = llm.backend
    if be.name == "native":
        return int(be.engine.bytes_per_token())
    import torch

    model = be.model
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "PackedLinear":
            total += sum(t.numel() * t.element_size() for t in list(mod.parameters(recurse=False)) +
                         list(mod.buffers(recurse=False)))
    out = model.get_output_embeddings()
    if out is not None and not isinstance(out, torch.nn.Linear):
        total += out.weight.numel() * out.weight.element_size()
    return total


def measure_llama_cpp(gguf_path: str, cfg: BenchConfig) -> dict:
    """Measure a GGUF through llama-cpp-python (one sequence: its high-level API has no batch)."""
    import llama_cpp

    from bitllm.engine.llm import set_threads

    n = set_threads(cfg.threads)
    reset_peak_rss()
    rss0 = rss_mib()
    t0 = time.perf_counter()
    # BENCH.md: explicit n_threads / n_threads_batch (default cpu_count()//2) and flash attention on
    lcpp = llama_cpp.Llama(model_path=gguf_path, n_ctx=max(256, cfg.prompt_tokens + cfg.gen_tokens + 8),
                           n_threads=n, n_threads_batch=n, flash_attn=True, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    rss1 = rss_mib()
    vocab = lcpp.n_vocab()

    def one(prompt, mark=lambda phase: None):
        lcpp.reset()
        mark("prefill")
        t = time.perf_counter()
        lcpp.eval(prompt)
        tok = int(np.argmax(lcpp.scores[lcpp.n_tokens - 1]))
        pre = time.perf_counter() - t
        mark("decode")
        steps = []
        for _ in range(cfg.gen_tokens - 1):
            t = time.perf_counter()
            lcpp.eval([tok])
            tok = int(np.argmax(lcpp.scores[lcpp.n_tokens - 1]))
            steps.append(time.perf_counter() - t)
        return pre, steps

    row = _measure(cfg, one, None, vocab, load_s, rss0, rss1, backend_name="llama.cpp",
                   bytes_per_token=_gguf_bytes_per_token(gguf_path))
    lcpp.close()
    return row


def _gguf_bytes_per_token(path: str) -> int:
    from gguf import GGUFReader

    r = GGUFReader(path)
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(b for k, b in names.items() if k != "token_embd.weight" and k.endswith(".weight"))
    return total + (names.get("token_embd.weight", 0) if "output.weight" not in names else 0)


def _measure(cfg: BenchConfig, one, batched, vocab: int, load_s: float, rss0: float, rss1: float, *,
             backend_name: str, bytes_per_token: int) -> dict:
    prompt = _prompt(vocab, cfg.prompt_tokens, cfg.seed)
    one(prompt)  # warm-up
    prefill, decode, steps_all = [], [], []
    meter = EnergyMeter(cfg.watts_per_core)
    with meter:
        for _ in range(cfg.reps):
            pre, steps = one(prompt, meter.mark)
            meter.mark(None)
            prefill.append(cfg.prompt_tokens / pre)
            decode.append(len(steps) / sum(steps))
            steps_all.extend(steps)
    n_tokens = len(steps_all) + cfg.reps  # the first token of each rep came with its prefill
    ms = np.asarray(steps_all) * 1e3
    row = {
        "backend": backend_name,
        "load_s": load_s,
        "rss_before_load_mib": rss0, "rss_after_load_mib": rss1, "rss_peak_mib": peak_rss_mib(),
        "model_rss_mib": None,  # set below: peak RSS over load and run, minus RSS before load
        "prefill_tok_s": _summary(prefill),
        "decode_tok_s": _summary(decode),
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                       "p99": float(np.percentile(ms, 99))},
        "bytes_per_token": bytes_per_token,
        "energy": {"joules_per_token": meter.phase_joules["decode"] / len(steps_all),
                   "cpu_s_per_token": meter.phase_cpu_s["decode"] / len(steps_all),
                   "prefill_joules_per_token": meter.phase_joules["prefill"] / (cfg.reps * cfg.prompt_tokens),
                   "total_joules_per_generated_token": meter.joules / n_tokens,
                   "estimate": not meter.rapl, "method": meter.method,
                   "note": "joules_per_token: decode steps only; prefill_joules_per_token: per prompt token; "
                           "total: the timed reps' energy over every generated token, prefill included"},
        "batched": {},
    }
    for bs in cfg.batch_sizes:
        if batched is None:
            row["batched"][str(bs)] = None
            continue
        batched(bs, -1)  # warm-up
        runs = [batched(bs, r) for r in range(cfg.reps)]
        row["batched"][str(bs)] = {"tok_s": _summary([a for a, _ in runs]), "decode_tok_s": _summary([b for _, b in runs])}
    row["rss_peak_mib"] = peak_rss_mib()
    # mmap'd weights (safetensors, GGUF) are resident only once touched, so RSS right after the load
    # undercounts them: the model's memory is the peak over load and run (weights, KV cache, buffers)
    row["model_rss_mib"] = row["rss_peak_mib"] - rss0
    return row


# --- the run ---------------------------------------------------------------------------------------


def model_file_bytes(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def make_fp_twin(model_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """A same-shape full-precision model with random weights (speed does not depend on weight values)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    for f in Path(model_dir).glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _worker(kind: str, spec: str, cfg: BenchConfig) -> dict:
    """Run one row in a fresh interpreter (clean RSS); returns its JSON."""
    code = ("import json,sys; from bitllm.eval.bench import BenchConfig, _worker_main; "
            "print('BITLLM_ROW ' + json.dumps(_worker_main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))))")
    c = asdict(cfg)
    proc = subprocess.run([sys.executable, "-c", code, kind, spec, json.dumps(c)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BITLLM_ROW "):
            return json.loads(line[len("BITLLM_ROW "):])
    raise BitLLMError(f"bench worker for {kind} {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _worker_main(kind: str, spec: str, cfg: dict) -> dict:
    cfg["batch_sizes"] = tuple(cfg["batch_sizes"])
    c = BenchConfig(**cfg)
    if kind == "llama.cpp":
        return measure_llama_cpp(spec, c)
    return measure_llm(spec, c, backend="hf" if kind == "fp" else "auto")


def machine(threads: int, roofline_bytes: int = 1 << 30) -> dict:
    """CPU, kernel ISA, threads, load and the read-bandwidth roofline measured now (best of 5)."""
    from bitllm import kernels as bk

    gbs = bk.stream_read_bandwidth(roofline_bytes, threads, 5) / 1e9
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return {"cpu": bk.cpu_model(), "logical_cpus": os.cpu_count(), "arch": platform.machine(),
            "isa": bk.active_isa(), "threads": threads, "roofline_gbs": gbs, "roofline_bytes": roofline_bytes,
            "loadavg": load, "rapl": rapl_joules() is not None}


def machine_line(m: dict) -> str:
    return (f"cpu: {m['cpu']} ({m['logical_cpus']} logical, {m['arch']}) | kernel isa: {m['isa']} | "
            f"threads: {m['threads']} | read roofline: {m['roofline_gbs']:.1f} GB/s (best of 5, "
            f"{m['roofline_bytes'] / 2**30:.2g} GiB, same run) | load avg: {m['loadavg']}")


@dataclass
class BenchResult:
    machine: dict
    config: dict
    rows: list[dict] = field(default_factory=list)
    baseline: str | None = None
    loadavg_after: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def run_bench(model: str, baselines: list[str] = (), *, fp_model: str | None = None, fp_dtype: str = "float32",
              cfg: BenchConfig | None = None, workdir: str | Path | None = None, roofline_bytes: int = 1 << 30,
              progress=print) -> BenchResult:
    """Benchmark `model` (a bitllm checkpoint directory) and the named baselines ("fp", "llama.cpp")."""
    from bitllm.engine.llm import set_threads

    cfg = cfg or BenchConfig()
    cfg.threads = set_threads(cfg.threads)
    bad = [b for b in baselines if b not in ("fp", "llama.cpp")]
    if bad:
        raise BitLLMError(f"unknown baseline(s) {bad}; expected fp and/or llama.cpp")
    if fp_model and "fp" not in baselines:
        raise BitLLMError("--fp-model is the model of the fp baseline: add --baseline fp")
    for what, p in (("model", model), ("fp model", fp_model)):
        if p and not Path(p).exists():
            raise BitLLMError(f"{what} {p}: no such directory or file (bench measures local checkpoints)")
    if cfg.reps < 1 or cfg.gen_tokens < 2 or cfg.prompt_tokens < 1 or cfg.batch_gen_tokens < 1 \
            or cfg.batch_prompt_tokens < 1 or any(b < 1 for b in cfg.batch_sizes):
        raise BitLLMError(f"bench needs reps >= 1, gen_tokens >= 2 (decode speed is timed after the first token), "
                          f"prompt and batch lengths >= 1 and batch sizes >= 1; got reps={cfg.reps}, "
                          f"gen_tokens={cfg.gen_tokens}, prompt_tokens={cfg.prompt_tokens}, "
                          f"batch_sizes={cfg.batch_sizes}, batch_prompt_tokens={cfg.batch_prompt_tokens}, "
                          f"batch_gen_tokens={cfg.batch_gen_tokens}")
    work = Path(workdir or tempfile.mkdtemp(prefix="bitllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    res = BenchResult(machine(cfg.threads, roofline_bytes), asdict(cfg))
    progress(machine_line(res.machine))
    plan: list[tuple[str, str, str]] = [("bitllm", "bitllm", str(model))]
    for b in baselines:
        if b == "fp":
            spec = fp_model or str(make_fp_twin(model, work / f"fp-twin-{fp_dtype}", fp_dtype))
            label = f"PyTorch ({Path(fp_model).name})" if fp_model else f"PyTorch {fp_dtype} (same-shape twin, random weights)"
            plan.append((label, "fp", spec))
        else:
            plan.append(("llama.cpp TQ2_0", "llama.cpp", str(work / "model-tq2_0.gguf")))
    for label, kind, spec in plan:
        progress(f"bench: {label} ...")
        row = {"label": label, "kind": kind, "model": spec}
        try:
            if kind == "llama.cpp":
                import importlib.util

                if importlib.util.find_spec("llama_cpp") is None:
                    raise BitLLMError("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
                from bitllm.formats.gguf_io import export_gguf

                export_gguf(model, spec, "tq2_0")
            row["file_bytes"] = model_file_bytes(spec)
            row.update(_worker(kind, spec, cfg))
        except BitLLMError as e:
            row["skipped"] = str(e).splitlines()[0] if kind == "llama.cpp" else str(e)
            progress(f"bench: {label} skipped: {row['skipped']}")
        res.rows.append(row)
    ran = [r for r in res.rows if "skipped" not in r]
    res.baseline = next((r["label"] for r in ran if r["kind"] == "fp"), ran[0]["label"] if ran else None)
    for r in ran:
        r["roofline_pct"] = 100 * r["bytes_per_token"] * r["decode_tok_s"]["median"] / (res.machine["roofline_gbs"] * 1e9)
    try:
        res.loadavg_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return res
