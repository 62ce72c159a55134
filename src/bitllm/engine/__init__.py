"""Native inference: `LLM` (generate, stream, chat, loglikelihood), running batches, engine loading.

Llama, BitNet and Phi run on the C++ engine (csrc/engine); other architectures fall back to the
transformers model with bitllm's packed layers. User guide: docs/engine.md.
"""

from __future__ import annotations

from bitllm.engine.batch import Batch, StepEvent
from bitllm.engine.llm import LLM, Completion
from bitllm.engine.loader import export_engine_file, load_engine
from bitllm.engine.sampling import SamplingParams

__all__ = ["LLM", "Batch", "Completion", "SamplingParams", "StepEvent", "export_engine_file", "load_engine"]
