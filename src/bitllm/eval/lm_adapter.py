"""lm-eval model "bitllm": zero-shot evaluation through bitllm's engine (or llama.cpp for GGUF).

    import bitllm.eval, lm_eval
    lm_eval.simple_evaluate(model="bitllm", model_args="pretrained=DIR,threads=2", tasks=["arc_easy"])

Tokenization is lm-eval's own (TemplateLM: trailing context spaces move to the continuation, the
pair is encoded whole and split, an empty context is conditioned on BOS/EOS, add_special_tokens as
the tokenizer decides), so the requests equal those of `--model hf` token for token: a ternary I2
checkpoint scored both ways differs only by the engine's floating-point rounding (tests pin the
budget). Rolling log-likelihoods use lm-eval's own disjoint windows with one token of context; as for
`--model hf`, a request may hold max_length + 1 tokens (the last is only scored, never fed).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from bitllm.errors import BitLLMError
from bitllm.eval.models import EvalModel, open_model

GEN_TOKS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


@register_model("bitllm")
class BitLLMEval(TemplateLM):
    """`pretrained`: a bitllm checkpoint, HF model directory/hub id, or a .gguf file.
    `backend`: auto | native | hf | llama.cpp | transformers. `max_batch_tokens`: tokens per engine call."""

    def __init__(self, pretrained: str | EvalModel, threads: int | None = None, backend: str = "auto",
                 max_length: int | None = None, max_batch_tokens: int = 2048, tokenizer: str | None = None,
                 add_bos_token: bool | None = None, batch_size: Any = None, max_batch_size: Any = None,
                 device: str | None = None, **kwargs) -> None:
        super().__init__()
        # batch_size / device come from lm-eval's generic options: the engine batches by tokens, on the CPU
        self.model = pretrained if isinstance(pretrained, EvalModel) else open_model(
            pretrained, backend=backend, threads=int(threads) if threads else None,
            max_length=int(max_length) if max_length else None, tokenizer=tokenizer)
        self.tokenizer = self.model.tokenizer
        self.add_bos_token = add_bos_token
        self.max_batch_tokens = int(max_batch_tokens)

    # -- tokens -------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.model.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.model.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.model.name).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

        if self.tokenizer is None:  # a GGUF read by llama.cpp with its own vocabulary
            add = add_special_tokens if add_special_tokens is not None else bool(self.add_bos_token)
            return list(self.model.lcpp.tokenize(string.encode("utf-8"), add_bos=add, special=False))
        kw = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and self.prefix_token_id is not None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **kw))

    # -- scoring ------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for _, ctx, cont in requests:
            # left-truncate as `--model hf` does: (ctx + cont)[-(max_length + 1):], whose last token is not fed
            keep = self.max_length + 1 - len(cont)
            pairs.append((ctx[-keep:] if keep > 0 else ctx[-1:], cont[-self.max_length:]))
        out: list[tuple[float, bool]] = []
        chunk = 32
        for i in tqdm(range(0, len(pairs), chunk), desc="bitllm loglikelihood", disable=disable_tqdm):
            out.extend(self.model.loglikelihood(pairs[i:i + chunk], max_batch_tokens=self.max_batch_tokens))
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in tqdm([r.args for r in requests], desc="bitllm rolling", disable=disable_tqdm):
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]  # as `--model hf`: ctx + cont = max_length + 1 tokens
            total = sum(lp for lp, _ in self.model.loglikelihood(windows, max_batch_tokens=self.max_batch_tokens))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="bitllm generate", disable=disable_tqdm):
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.model.decode([self.eot_token_id]) if self.eot_token_id is not None else ""
            if eos_text and eos_text not in until:
                until.append(eos_text)
            # lm-eval's aliases, in its priority order (normalize_gen_kwargs); 256 as `--model hf`
            max_gen = next((int(kw[k]) for k in GEN_TOKS_KEYS if kw.get(k) is not None), 256)
            max_ctx = self.max_length - max_gen  # left-truncate the context to leave room for the generation
            if max_gen < 1 or max_ctx < 1:
                raise BitLLMError(f"max_gen_toks={max_gen} must be in [1, {self.max_length - 1}]: the model's context "
                                  f"is {self.max_length} tokens and the prompt needs at least one")
            ids = self.tok_encode(context)[-max_ctx:]
            text = self.model.generate(ids, max_new_tokens=max_gen, stop=until)  # greedy (do_sample is ignored)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
