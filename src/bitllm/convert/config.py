"""The conversion config and its schedules (learning rate, quantization λ) as pure functions of the step.

OneBit recipe (arXiv 2402.11295; REFERENCES.md §4.4): AdamW betas (0.9, 0.98), weight decay 0.01, cosine schedule
with warm-up, KD loss α=1, s=0.01, β=1. QAT λ warm-up (HF blog "Fine-tuning LLMs to 1.58bit", REFERENCES.md §6.5):
λ = min(step / k, 1), quantization blended in as x + λ·(Q(x) − x).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from bitllm.errors import BitLLMError

METHODS = ("onebit", "qat")
PACK_FORMAT = {"onebit": "b1", "qat": "i2"}  # checkpoint format of the converted model
DEFAULT_LR = {"onebit": 4e-4, "qat": 1e-4}  # OneBit LLaMA-7B; HF blog's Llama-3-8B run
TEACHER_DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class ConvertConfig:
    """Everything one conversion needs; round-trips to JSON (saved as convert_config.json in output_dir).

    `teacher`: local HF directory, hub id, or a .gguf file. `data`: text sources as in training (files, dirs,
    hf:NAME, "bundled") or ["teacher:N"] for N sequences sampled from the teacher (LLM-QAT style).
    `eval_data`: held-out text sources; None means the held-out tails of `data` (or "bundled" for teacher:N).
    """

    teacher: str
    method: str = "onebit"  # onebit (W1A16, SVID + KD) | qat (BitNet b1.58 W1.58A8, λ warm-up)
    output_dir: str = "runs/convert"
    data: list[str] = field(default_factory=lambda: ["bundled"])
    eval_data: list[str] | None = None
    holdout_frac: float = 0.05
    max_eval_tokens: int = 16384
    seq_len: int = 256
    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None
    lr: float | None = None  # None: DEFAULT_LR[method]
    warmup_steps: int | None = None  # None: min(500, steps // 10) (OneBit uses 500)
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    svid: bool = True  # onebit: SVID init of g, h (else g = 1, h = mean|W|)
    distill: bool = True  # KD from the teacher; False: plain next-token cross-entropy
    kd_alpha: float = 1.0  # weight of the scaled KL term; (1 - alpha) weighs the CE term
    kd_scale: float = 0.01  # s
    kd_beta: float = 1.0  # weight of the normalised hidden-state MSE
    lambda_warmup: int | None = None  # qat: λ reaches 1 after this many steps; None: min(1000, steps // 5)
    input_norm: bool = False  # qat: RMSNorm inside each BitLinear (changes the fp function; off by default)
    freeze_embeddings: bool = False  # keep token embeddings (and a tied lm_head) at the teacher's values
    teacher_dtype: str = "auto"  # auto: bf16 on a GPU or a CPU with native bf16, else fp32
    teacher_samples_temperature: float = 1.0
    save_every: int = 200
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU, fp32 on a CPU

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ConvertConfig":
        names = {f.name for f in dataclasses.fields(ConvertConfig)}
        unknown = set(d) - names
        if unknown:
            raise BitLLMError(f"unknown field(s) {sorted(unknown)} in convert config; expected some of {sorted(names)}")
        return ConvertConfig(**d)

    @property
    def peak_lr(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    @property
    def warmup(self) -> int:
        return min(500, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    @property
    def lambda_steps(self) -> int:
        return min(1000, self.steps // 5) if self.lambda_warmup is None else self.lambda_warmup

    @property
    def teacher_samples(self) -> int | None:
        """N of data=["teacher:N"], else None."""
        if len(self.data) == 1 and self.data[0].startswith("teacher:"):
            return int(self.data[0].split(":", 1)[1])
        return None


def validate(cfg: ConvertConfig) -> None:
    if cfg.method not in METHODS:
        raise BitLLMError(f"unknown conversion method {cfg.method!r}; expected one of {METHODS}")
    if cfg.teacher_dtype not in TEACHER_DTYPES:
        raise BitLLMError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {cfg.teacher_dtype!r}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.seq_len < 2 or cfg.save_every < 1:
        raise BitLLMError(f"steps, batch_size, save_every must be >= 1 and seq_len >= 2; got steps={cfg.steps}, "
                          f"batch_size={cfg.batch_size}, seq_len={cfg.seq_len}, save_every={cfg.save_every}")
    if not 0.0 <= cfg.kd_alpha <= 1.0:
        raise BitLLMError(f"kd_alpha must be in [0, 1], got {cfg.kd_alpha}")
    # checked here, not after minutes of loading the teacher; a negative kd_scale/kd_beta would ascend the loss and a
    # negative micro-batch would train on nothing
    if not (math.isfinite(cfg.peak_lr) and cfg.peak_lr > 0):
        raise BitLLMError(f"lr must be a finite number > 0, got {cfg.peak_lr}")
    for name in ("weight_decay", "grad_clip", "kd_scale", "kd_beta", "min_lr_ratio", "holdout_frac"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise BitLLMError(f"{name} must be a finite number >= 0, got {value}")
    if cfg.min_lr_ratio > 1.0 or cfg.holdout_frac >= 1.0:
        raise BitLLMError(f"min_lr_ratio must be <= 1 and holdout_frac < 1; got {cfg.min_lr_ratio}, {cfg.holdout_frac}")
    if cfg.warmup < 0 or cfg.lambda_steps < 0 or (cfg.micro_batch_size is not None and cfg.micro_batch_size < 1):
        raise BitLLMError(f"warmup_steps and lambda_warmup must be >= 0 and micro_batch_size >= 1; got "
                          f"{cfg.warmup_steps}, {cfg.lambda_warmup}, {cfg.micro_batch_size}")
    if any(s.startswith("teacher:") for s in cfg.data):
        if len(cfg.data) != 1 or not cfg.data[0].split(":", 1)[1].isdigit() or int(cfg.data[0].split(":", 1)[1]) < 1:
            raise BitLLMError(f"teacher-generated data is written alone as 'teacher:N' with N >= 1, got {cfg.data}")


def lr_at(cfg: ConvertConfig, step: int) -> float:
    """Linear warm-up to the peak, then a cosine down to peak * min_lr_ratio at the last step."""
    peak, warm = cfg.peak_lr, cfg.warmup
    if step < warm:
        return peak * (step + 1) / warm
    span = max(cfg.steps - warm, 1)
    t = min((step - warm) / span, 1.0)
    floor = peak * cfg.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def lambda_at(cfg: ConvertConfig, step: int) -> float:
    """QAT quantization blend at `step` (0-based, before the update): min(step / k, 1); always 1 for OneBit."""
    if cfg.method != "qat" or cfg.lambda_steps <= 0:
        return 1.0
    return min(step / cfg.lambda_steps, 1.0)
