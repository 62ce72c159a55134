"""One scoring interface over every kind of model bitllm measures, so that a 1-bit model, its
full-precision twin, a teacher and a llama.cpp GGUF are measured by the same code:

- a bitllm checkpoint          -> `bitllm.LLM` (native engine, or transformers + packed layers)
- a plain Hugging Face model   -> `bitllm.LLM(backend="hf")` (the transformers model, unchanged)
- a GGUF file                  -> llama-cpp-python when installed, else transformers' `gguf_file=` loader;
                                  a file that loader cannot read as the model it holds (llama.cpp's per-tensor
                                  `.scale` tensors, as bitllm exports, or `bitnet`) -> bitllm's own GGUF reader

Every backend scores (context ids, continuation ids) pairs with teacher forcing and returns
(sum of log-probabilities, is-greedy), exactly what perplexity and lm-eval need.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bitllm.errors import BitLLMError

Pair = tuple[Sequence[int], Sequence[int]]


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    lg = logits.astype(np.float64)
    m = lg.max(axis=1, keepdims=True)
    return lg - m - np.log(np.exp(lg - m).sum(axis=1, keepdims=True))  # stable in float64


@dataclass
class EvalModel:
    """A model opened for evaluation. `kind` names the path that runs it."""

    name: str
    kind: str  # "bitllm-native" | "bitllm-hf" | "hf" | "llama.cpp" | "gguf-hf" | "gguf-bitllm"
    tokenizer: Any
    max_length: int
    bos_token_id: int | None
    eos_token_id: int | None
    file_bytes: int
    info: dict = field(default_factory=dict)
    llm: Any = None  # bitllm.LLM for every kind but "llama.cpp"
    lcpp: Any = None  # llama_cpp.Llama

    # -- tokens ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens (BOS is the caller's choice)."""
        if self.lcpp is not None and self.tokenizer is None:
            return list(self.lcpp.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        if self.tokenizer is None:
            raise BitLLMError(f"{self.name} has no tokenizer: evaluation on text needs one")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        if self.lcpp is not None and self.tokenizer is None:
            return self.lcpp.detokenize(list(ids)).decode("utf-8", errors="replace")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def prefix_token_id(self) -> int | None:
        """The token that conditions the first scored token (BOS, else EOS), as lm-eval does."""
        return self.bos_token_id if self.bos_token_id is not None else self.eos_token_id

    # -- scoring -----------------------------------------------------------------------------------

    def loglikelihood(self, pairs: Sequence[Pair], max_batch_tokens: int = 2048) -> list[tuple[float, bool]]:
        """log P(cont | ctx) summed over the continuation, and whether every token is the argmax."""
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise BitLLMError("loglikelihood needs a non-empty context and continuation (token ids)")
            if len(ctx) + len(cont) > self.max_length + 1:  # the last token is only scored, never fed
                raise BitLLMError(f"{len(ctx) + len(cont)} tokens exceed the model's context {self.max_length} + 1")
        if self.lcpp is not None:
            return [self._lcpp_score(list(c), list(t)) for c, t in pairs]
        return self.llm.loglikelihood([(list(c), list(t)) for c, t in pairs], max_batch_tokens=max_batch_tokens)

    def _lcpp_score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        toks = ctx + cont
        self.lcpp.reset()
        self.lcpp.eval(toks[:-1])  # the last token is only a target
        logits = np.asarray(self.lcpp.scores[len(ctx) - 1: len(toks) - 1])  # (len(cont), vocab): row i predicts cont[i]
        logp = _log_softmax_rows(logits)
        target = np.asarray(cont)
        return float(logp[np.arange(len(cont)), target].sum()), bool((logits.argmax(axis=1) == target).all())

    def generate(self, ids: list[int], max_new_tokens: int, stop: Sequence[str] = ()) -> str:
        """Greedy continuation text of `ids`, cut at the first stop string."""
        stop = [s for s in stop if s]  # lm-eval's `until` may hold "": it would stop before the first token
        if self.lcpp is not None:
            out: list[int] = []
            self.lcpp.reset()
            self.lcpp.eval(ids)
            for _ in range(max_new_tokens):
                tok = int(np.argmax(self.lcpp.scores[self.lcpp.n_tokens - 1]))
                if tok == self.eos_token_id:
                    break
                out.append(tok)
                text = self.decode(out)
                if any(s in text for s in stop):
                    break
                self.lcpp.eval([tok])
            text = self.decode(out)
        else:
            c = self.llm.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0, stop=list(stop) or None)
            text = str(c)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def close(self) -> None:
        if self.lcpp is not None:
            self.lcpp.close()


# --- opening ---------------------------------------------------------------------------------------


def _dir_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors / bin / gguf) of a model directory or file."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))


def _is_bitllm_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.exists() and "quantization_config" in json.loads(cfg.read_text())


def open_model(spec: str | os.PathLike, *, backend: str = "auto", threads: int | None = None,
               max_length: int | None = None, tokenizer: str | None = None) -> EvalModel:
    """Open a model for evaluation.

    `spec`: a bitllm checkpoint or HF model directory (or hub id), or a `.gguf` file.
    `backend`: "auto" | "native" | "hf" (bitllm.LLM's choice) | "llama.cpp" | "transformers" (GGUF files).
    `tokenizer`: a directory or hub id to tokenize with (GGUF files read through llama.cpp use their own).
    """
    path = Path(spec)
    if path.suffix == ".gguf":
        return _open_gguf(path, backend=backend, threads=threads, max_length=max_length, tokenizer=tokenizer)
    import bitllm

    if backend not in ("auto", "native", "hf"):
        raise BitLLMError(f"backend {backend!r} is for GGUF files; a model directory takes auto | native | hf")
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    llm = bitllm.LLM(spec, threads=threads, backend=backend, max_context=max_length, tokenizer=tok)
    kind = ("bitllm-native" if llm.backend_name == "native" else "bitllm-hf") if _is_bitllm_dir(llm.directory) else "hf"
    return _from_llm(str(spec), kind, llm, _dir_bytes(llm.directory))


def _from_llm(name: str, kind: str, llm, file_bytes: int) -> EvalModel:
    cfg = llm.config.get_text_config()
    bos = getattr(cfg, "bos_token_id", None)
    tk = llm.tokenizer
    if tk is not None and tk.bos_token_id is not None:
        bos = tk.bos_token_id
    eos = llm.eos_token_ids[0] if llm.eos_token_ids else (tk.eos_token_id if tk is not None else None)
    return EvalModel(name, kind, tk, llm.backend.max_context, bos, eos, file_bytes,
                     info={"load_s": llm.load_info.get("load_s"), "backend": llm.backend_name}, llm=llm)


def _open_gguf(path: Path, *, backend: str, threads: int | None, max_length: int | None,
               tokenizer: str | None) -> EvalModel:
    if not path.exists():
        raise BitLLMError(f"{path}: no such GGUF file")
    if backend in ("auto", "llama.cpp"):
        try:
            import llama_cpp
        except ImportError:
            if backend == "llama.cpp":
                raise BitLLMError("backend llama.cpp needs `pip install llama-cpp-python`") from None
        else:
            return _open_llama_cpp(llama_cpp, path, threads, max_length, tokenizer)
    if backend not in ("auto", "transformers", "hf"):
        raise BitLLMError(f"backend {backend!r} cannot read a GGUF file; use llama.cpp or transformers")
    import bitllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitllm.formats.gguf_io import transformers_gguf_problem

    if transformers_gguf_problem(path):  # transformers would fail or load the weights unscaled
        return _open_with_bitllm_reader(path, backend=backend, threads=threads, max_length=max_length,
                                        tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    llm = bitllm.LLM.from_model(model, tokenizer=tok, threads=threads, max_context=max_length)
    return _from_llm(str(path), "gguf-hf", llm, path.stat().st_size)


def _open_with_bitllm_reader(path: Path, *, backend: str, threads: int | None, max_length: int | None,
                             tokenizer: str | None) -> EvalModel:
    """A GGUF that transformers' loader misreads, read by bitllm's own importer (exact for ternary data) into a
    temporary checkpoint and run by bitllm: backend "transformers"/"hf" -> transformers with bitllm's packed
    layers, "auto" -> the native engine where it runs the model."""
    import tempfile

    import bitllm
    from bitllm.formats.gguf_io import import_gguf

    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    with tempfile.TemporaryDirectory(prefix="bitllm-gguf-") as tmp:  # both backends hold the weights in memory
        ck = import_gguf(path, Path(tmp) / "model")
        llm = bitllm.LLM(ck, threads=threads, backend="auto" if backend == "auto" else "hf", max_context=max_length,
                         tokenizer=tok)
    llm.directory = None  # removed; the file is `path`
    return _from_llm(str(path), "gguf-bitllm", llm, path.stat().st_size)


def _open_llama_cpp(llama_cpp, path: Path, threads: int | None, max_length: int | None,
                    tokenizer: str | None) -> EvalModel:
    from bitllm.engine.llm import set_threads

    n = set_threads(threads)
    # BENCH.md: explicit thread counts (the default is cpu_count()//2) and flash attention (llama-bench's default)
    # n_ctx 0: llama.cpp takes the file's own context ({arch}.context_length), the default docs/eval.md promises
    lcpp = llama_cpp.Llama(model_path=str(path), n_ctx=max_length or 0, n_threads=n, n_threads_batch=n,
                           flash_attn=True, logits_all=True, verbose=False)
    ctx = lcpp.context_params.n_ctx  # the context asked for, or the file's
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    bos, eos = lcpp.token_bos(), lcpp.token_eos()
    # llama.cpp pads n_ctx up to a multiple of 256: score within the context asked for, not the padding
    return EvalModel(str(path), "llama.cpp", tok, min(ctx, lcpp.n_ctx()), bos if bos >= 0 else None, eos if eos >= 0 else None,
                     path.stat().st_size, info={"backend": "llama.cpp"}, lcpp=lcpp)
