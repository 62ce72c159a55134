"""Shared by the server tests: a tiny random ternary llama (I2 checkpoint) with a byte-level BPE
tokenizer and a chat template, saved where the test asks."""

from __future__ import annotations

from pathlib import Path

import bitllm
from bitllm.tiny import tiny_model, tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_chat_checkpoint(path: Path) -> Path:
    model = tiny_model("llama", vocab_size=320, hidden=64, layers=2, embed_std=1.0)
    bitllm.quantize_(model, bitllm.config_for("ternary"))
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    bitllm.save_pretrained(model, path, "i2", tokenizer=tok)
    return path
