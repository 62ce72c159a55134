"""From-scratch training of 1.58-bit (ternary), 1-bit (binary) and full-precision twin decoders.

    from bitllm.train import preset_config, train
    result = train(preset_config("demo", quant="ternary", output_dir="runs/t"))

See docs/training.md.
"""

from __future__ import annotations

from bitllm.train.config import (
    PRESETS,
    DataConfig,
    ModelConfig,
    RecipeConfig,
    TrainConfig,
    load_config,
    lr_at,
    preset_config,
    weight_decay_at,
)
from bitllm.train.trainer import TrainingDivergedError, TrainResult, train

__all__ = ["PRESETS", "DataConfig", "ModelConfig", "RecipeConfig", "TrainConfig", "TrainResult",
           "TrainingDivergedError", "load_config", "lr_at", "preset_config", "train", "weight_decay_at"]
