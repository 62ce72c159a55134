"""`make demo` until training lands: quantize a tiny model, pack it in every format, reload, generate."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bitllm.formats.checkpoint import from_pretrained, save_pretrained
from bitllm.quant.api import quantize_
from bitllm.quant.config import config_for
from bitllm.tiny import tiny_model


def run_demo(output: Path) -> None:
    console = Console()
    table = Table(title="tiny llama: pack -> reload -> greedy decode")
    for col in ("method", "format", "bytes", "max |logit diff|", "greedy tokens (16)"):
        table.add_column(col)
    ids = torch.tensor([[1, 5, 9, 13]])
    for method, fmt in [("ternary", "i2"), ("ternary", "t1"), ("ternary-wo", "i2"), ("binary", "b1"), ("onebit", "b1")]:
        model = tiny_model("llama", hidden=64, layers=2, vocab_size=128)
        quantize_(model, config_for(method))
        with torch.no_grad():
            ref = model(ids).logits
        path = output / f"{method}-{fmt}"
        save_pretrained(model, path, fmt)
        loaded = from_pretrained(path)
        with torch.no_grad():
            diff = (loaded(ids).logits - ref).abs().max().item()
            gen = loaded.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        table.add_row(method, fmt, f"{size:,}", f"{diff:.2e}", " ".join(map(str, gen[0, 4:].tolist())))
    console.print(table)
    console.print(f"checkpoints under {output}")
