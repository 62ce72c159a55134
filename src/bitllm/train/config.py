"""Training configs, presets and the BitNet recipe as pure functions of the step.

Recipe: BitNet b1.58 "Training Tips, Code and FAQ" (microsoft/unilm bitnet/, 2024-03-20), §1 and
Tables 1-2 (REFERENCES.md §3.2): a two-stage learning rate (a higher peak, dropped at half way, linear
decay within the stages), weight decay 0.1 then 0, AdamW betas (0.9, 0.95), warm-up. The full-precision
twin uses the single-stage LLaMA recipe (lower LR, weight decay 0.1 throughout).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitllm.errors import BitLLMError

LAYOUTS = ("bitnet", "llama")
QUANTS = ("ternary", "binary", "none")


@dataclass
class ModelConfig:
    """Decoder shape. `layout` picks the transformers class: bitnet -> BitNetForCausalLM (attention and FFN
    sub-norms, so the quantized layers get no extra input norm), llama -> LlamaForCausalLM (the paper's
    RMSNorm inside each BitLinear)."""

    layout: str = "bitnet"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA, as in the paper)
    hidden_act: str = "silu"  # SwiGLU as in BitNet b1.58; "relu2" is bitnet-b1.58-2B-4T's (not llama.cpp-exportable)
    seq_len: int = 256
    vocab_size: int = 4096  # size of the BPE trained on the fly; a reused tokenizer sets its own
    tie_embeddings: bool = True
    rope_theta: float = 10000.0


@dataclass
class RecipeConfig:
    """Optimizer and schedule. `lr_stage2=None` means single stage (the fp recipe)."""

    lr: float = 1.5e-3  # stage-1 peak
    lr_stage2: float | None = 1.0e-3  # stage-2 peak: the LR drops to it at `stage2_at`
    weight_decay: float = 0.1
    weight_decay_stage2: float = 0.0
    stage2_at: float = 0.5  # fraction of the steps where stage 2 starts
    warmup_steps: int = 375
    min_lr_ratio: float = 0.0  # the linear decay ends at peak * min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class DataConfig:
    """Where text comes from. Sources are files, directories (.txt/.jsonl/.json/.parquet inside), `hf:NAME[:CONFIG]`
    dataset names, or "bundled" (Shakespeare + KJV; Wikipedia leads as out-of-domain held-out)."""

    train: list[str] = field(default_factory=lambda: ["bundled"])
    heldout_ood: list[str] = field(default_factory=lambda: ["bundled"])
    holdout_frac: float = 0.05  # the last 5 % of every training source is held out (in-domain)
    tokenizer: str | None = None  # None: train a byte-level BPE on the training split; else a dir or hub id
    max_eval_tokens: int = 65536  # held-out tokens scored per split (the first ones)


@dataclass
class TrainConfig:
    """Everything one run needs; round-trips to JSON (saved as train_config.json beside the checkpoints)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: str = "ternary"  # ternary | binary | none (the full-precision twin)
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # per process and forward pass; None: batch_size / processes
    seed: int = 0
    output_dir: str = "runs/train"
    save_every: int = 200  # atomic training checkpoint every N steps (and at the end)
    eval_every: int = 0  # 0: evaluate held-out perplexity only at the end
    log_every: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on a GPU, fp32 on a CPU) | no | bf16 | fp16
    preset: str | None = None

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"]["betas"] = list(self.recipe.betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        sub = {"model": ModelConfig, "recipe": RecipeConfig, "data": DataConfig}
        kw: dict[str, Any] = {}
        for name, cls in sub.items():
            part = dict(d.pop(name, {}) or {})
            _check_fields(cls, part, name)
            if name == "recipe" and "betas" in part:
                part["betas"] = tuple(part["betas"])
            kw[name] = cls(**part)
        _check_fields(TrainConfig, d, "train config")
        return TrainConfig(**kw, **d)


def _check_fields(cls, d: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise BitLLMError(f"unknown field(s) {sorted(unknown)} in {where}; expected some of {sorted(names)}")


def validate(cfg: TrainConfig) -> None:
    """Refuse configs that cannot run, with a message that says what to change."""
    m, r = cfg.model, cfg.recipe
    if m.layout not in LAYOUTS:
        raise BitLLMError(f"model.layout {m.layout!r} is not one of {LAYOUTS}")
    if cfg.quant not in QUANTS:
        raise BitLLMError(f"quant {cfg.quant!r} is not one of {QUANTS}")
    if m.hidden_size % m.num_heads:
        raise BitLLMError(f"model.hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise BitLLMError(f"model.num_heads {m.num_heads} is not divisible by num_kv_heads {kv}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise BitLLMError(f"steps ({cfg.steps}) and batch_size ({cfg.batch_size}) must be >= 1")
    if not 0.0 < r.stage2_at <= 1.0:
        raise BitLLMError(f"recipe.stage2_at must be in (0, 1], got {r.stage2_at}")
    if not 0.0 <= cfg.data.holdout_frac < 1.0:
        raise BitLLMError(f"data.holdout_frac must be in [0, 1), got {cfg.data.holdout_frac}")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise BitLLMError(f"mixed_precision {cfg.mixed_precision!r} is not auto | no | bf16 | fp16")
    # each of these would crash mid-run (a modulo by 0), train on nothing (a negative micro-batch), or ascend the loss
    at_least = {"model.hidden_size": (m.hidden_size, 1), "model.intermediate_size": (m.intermediate_size, 1),
                "model.num_layers": (m.num_layers, 1), "model.num_heads": (m.num_heads, 1),
                "model.seq_len": (m.seq_len, 2), "model.vocab_size": (m.vocab_size, 1),
                "save_every": (cfg.save_every, 1), "log_every": (cfg.log_every, 1), "eval_every": (cfg.eval_every, 0),
                "micro_batch_size": (1 if cfg.micro_batch_size is None else cfg.micro_batch_size, 1),
                "recipe.warmup_steps": (r.warmup_steps, 0)}
    for name, (value, low) in at_least.items():
        if value < low:
            raise BitLLMError(f"{name} must be >= {low}, got {value}")
    positive = {"recipe.lr": r.lr, "recipe.lr_stage2": r.lr if r.lr_stage2 is None else r.lr_stage2,
                "recipe.eps": r.eps}
    for name, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise BitLLMError(f"{name} must be a finite number > 0, got {value}")
    for name, value in {"recipe.weight_decay": r.weight_decay, "recipe.weight_decay_stage2": r.weight_decay_stage2,
                        "recipe.grad_clip": r.grad_clip}.items():
        if not (math.isfinite(value) and value >= 0):
            raise BitLLMError(f"{name} must be a finite number >= 0, got {value}")
    if not 0.0 <= r.min_lr_ratio <= 1.0:
        raise BitLLMError(f"recipe.min_lr_ratio must be in [0, 1], got {r.min_lr_ratio}")


# --- the recipe as pure functions of the step ------------------------------------------------------


def stage2_start(recipe: RecipeConfig, steps: int) -> int:
    """First step (0-based) of stage 2; `steps` when the recipe has one stage."""
    if recipe.lr_stage2 is None:
        return steps
    return int(round(recipe.stage2_at * steps))


def lr_at(recipe: RecipeConfig, step: int, steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) in a run of `steps`.

    Linear warm-up to the stage-1 peak, then one linear decay line from 1 to `min_lr_ratio` over the rest of the
    run, multiplied by the peak of the current stage: at the switch the LR drops by lr_stage2 / lr.
    """
    warm = min(recipe.warmup_steps, max(steps - 1, 0))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    frac = (step - warm) / max(steps - warm, 1)  # 0 at the end of warm-up, -> 1 at the last step
    decay = 1.0 - (1.0 - recipe.min_lr_ratio) * frac
    peak = recipe.lr if step < stage2_start(recipe, steps) else recipe.lr_stage2
    return peak * decay


def weight_decay_at(recipe: RecipeConfig, step: int, steps: int) -> float:
    """Weight decay of step `step`: 0.1 in stage 1, 0 in stage 2 (latent magnitude is the 1-bit value's confidence)."""
    return recipe.weight_decay if step < stage2_start(recipe, steps) else recipe.weight_decay_stage2


# --- presets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A model shape with its recipes: two-stage (lr1, lr2) for 1-bit/1.58-bit and one LR for the fp twin."""

    model: ModelConfig
    bit_lr: tuple[float, float]
    fp_lr: float
    warmup_steps: int
    steps: int
    batch_size: int
    micro_batch_size: int | None = None
    save_every: int = 200


def _paper(hidden: int, ffn: int, layers: int, heads: int, bit_lr: tuple[float, float], fp_lr: float) -> Preset:
    # Paper: batch 1M tokens = 512 x 2048, 100B tokens -> ~95k steps; LLaMA tokenizer size (32000).
    return Preset(ModelConfig(hidden_size=hidden, intermediate_size=ffn, num_layers=layers, num_heads=heads,
                              seq_len=2048, vocab_size=32000, tie_embeddings=False),
                  bit_lr, fp_lr, warmup_steps=375, steps=95_367, batch_size=512, micro_batch_size=4, save_every=500)


PRESETS: dict[str, Preset] = {
    # Tests: seconds on one core.
    "tiny": Preset(ModelConfig(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, seq_len=64,
                               vocab_size=512),
                   bit_lr=(4e-3, 2.5e-3), fp_lr=2e-3, warmup_steps=10, steps=60, batch_size=8, save_every=20),
    # `bitllm demo`: a few minutes per model on 2 CPU cores.
    "demo": Preset(ModelConfig(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, seq_len=128,
                               vocab_size=2048),
                   bit_lr=(3e-3, 2e-3), fp_lr=2e-3, warmup_steps=30, steps=300, batch_size=16, save_every=100),
    "small": Preset(ModelConfig(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, seq_len=256,
                                vocab_size=8192),
                    bit_lr=(2.4e-3, 1.6e-3), fp_lr=8e-4, warmup_steps=100, steps=2000, batch_size=32, save_every=200),
    # The paper's shapes (FAQ Table 1) and LRs (Table 2).
    "700m": _paper(1536, 4096, 24, 24, (1.5e-3, 1.0e-3), 2.5e-4),
    "1.3b": _paper(2048, 5460, 24, 32, (1.2e-3, 8e-4), 2.0e-4),
    "3b": _paper(3200, 8640, 26, 32, (1.2e-3, 8e-4), 2.0e-4),
    "3.9b": _paper(3200, 12800, 26, 32, (1.2e-3, 8e-4), 2.0e-4),
}


def recipe_for(preset: Preset, quant: str) -> RecipeConfig:
    """The BitNet two-stage recipe for ternary/binary, the single-stage LLaMA recipe for the fp twin."""
    if quant == "none":
        return RecipeConfig(lr=preset.fp_lr, lr_stage2=None, weight_decay=0.1, weight_decay_stage2=0.1,
                            warmup_steps=preset.warmup_steps)
    lr1, lr2 = preset.bit_lr
    return RecipeConfig(lr=lr1, lr_stage2=lr2, weight_decay=0.1, weight_decay_stage2=0.0,
                        warmup_steps=preset.warmup_steps)


def preset_config(name: str, quant: str = "ternary", layout: str = "bitnet", overrides: dict[str, Any] | None = None,
                  **fields: Any) -> TrainConfig:
    """A TrainConfig from a named preset; `overrides` maps dotted keys ("recipe.lr": 1e-3), `fields` are top-level
    fields (output_dir="runs/x", steps=100)."""
    if name not in PRESETS:
        raise BitLLMError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[name]
    cfg = TrainConfig(model=dataclasses.replace(p.model, layout=layout), recipe=recipe_for(p, quant), quant=quant,
                      steps=p.steps, batch_size=p.batch_size, micro_batch_size=p.micro_batch_size,
                      save_every=p.save_every, preset=name)
    return apply_overrides(cfg, {**fields, **(overrides or {})})


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy with dotted-key overrides applied ("model.hidden_size": 128, "steps": 10)."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise BitLLMError(f"override {key!r}: {p!r} is not a config section")
            node = node[p]
        if leaf not in node:
            raise BitLLMError(f"override {key!r}: no field {leaf!r}; expected one of {sorted(node)}")
        node[leaf] = value
    return TrainConfig.from_dict(d)


def parse_override(text: str) -> tuple[str, Any]:
    """'recipe.lr=1e-3' -> ('recipe.lr', 0.001); values parse as JSON when they can, else stay strings."""
    if "=" not in text:
        raise BitLLMError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path) -> TrainConfig:
    """Read a TrainConfig from .json or .yaml/.yml (YAML needs PyYAML)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise BitLLMError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the config as JSON") from None
        d = yaml.safe_load(text)
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BitLLMError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise BitLLMError(f"{path}: expected a mapping of config fields, found {type(d).__name__}")
    return TrainConfig.from_dict(d)


def resolve_config(preset: str | None = None, config_file: str | Path | None = None, quant: str | None = None,
                   layout: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config a command line names: a preset (its recipe follows `quant`) or a JSON/YAML file, then overrides."""
    if preset and config_file:
        raise BitLLMError("give either a preset or a config file, not both (a config file names its preset)")
    if config_file:
        cfg = load_config(config_file)
        top = {k: v for k, v in (("quant", quant), ("model.layout", layout)) if v is not None}
        return apply_overrides(cfg, {**top, **(overrides or {})})
    return preset_config(preset or "demo", quant=quant or "ternary", layout=layout or "bitnet", overrides=overrides)
