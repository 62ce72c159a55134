"""Measure 1-bit models honestly: perplexity, zero-shot accuracy (lm-eval), memory, latency,
throughput and energy, side by side with full-precision twins and llama.cpp.

    from bitllm.eval import open_model, evaluate_perplexity
    m = open_model("runs/demo/ternary")
    evaluate_perplexity(m, "bundled")          # in-domain and out-of-domain held-out text

Importing this package registers the lm-eval model "bitllm" when lm-eval is installed, so
`lm_eval.simple_evaluate(model="bitllm", model_args="pretrained=DIR")` works after `import bitllm.eval`.
"""

from __future__ import annotations

from bitllm.eval.models import EvalModel, open_model
from bitllm.eval.perplexity import PerplexityResult, evaluate_perplexity, load_ppl_texts, perplexity, window_pairs

__all__ = ["EvalModel", "open_model", "PerplexityResult", "evaluate_perplexity", "load_ppl_texts", "perplexity",
           "window_pairs"]

try:  # registering needs lm-eval; everything else here works without it
    from bitllm.eval import lm_adapter as _lm_adapter  # noqa: F401  (registers "bitllm")
except ImportError:
    pass
