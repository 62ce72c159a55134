"""Convert existing models to 1 and 1.58 bits: OneBit (SVID + distillation) and BitNet QAT with λ warm-up.

    from bitllm.convert import convert
    result = convert("path/or/hub-id/or/model.gguf", method="onebit", output="runs/onebit", steps=1000)
    result.model_dir  # a bitllm checkpoint that bitllm.LLM runs

See docs/convert.md.
"""

from bitllm.convert.config import ConvertConfig, lambda_at, lr_at
from bitllm.convert.losses import distill_loss, hidden_mse, kd_kl
from bitllm.convert.run import ConvertResult, convert, run_conversion
from bitllm.convert.student import build_student, load_teacher
from bitllm.convert.zero_shot import kept_share, run_zero_shot

__all__ = ["ConvertConfig", "ConvertResult", "build_student", "convert", "distill_loss", "hidden_mse", "kd_kl",
           "kept_share", "lambda_at", "load_teacher", "lr_at", "run_conversion", "run_zero_shot"]
