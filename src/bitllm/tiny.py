"""Tiny Hugging Face causal LMs built from configs (random init) for tests, demos and benchmarks.

No hub access: every family is constructed locally from its transformers config class.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

FAMILIES = ("llama", "bitnet", "phi", "gemma3", "gpt2")


def tiny_config(family: str, vocab_size: int = 96, hidden: int = 32, layers: int = 2, **overrides):
    """A small config of `family` (heads of 8 dims, GQA where the family has it)."""
    from transformers import (
        BitNetConfig,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        PhiConfig,
    )

    heads = max(1, hidden // 8)
    common = dict(vocab_size=vocab_size, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          tie_word_embeddings=False, **common)
    elif family == "bitnet":
        cfg = BitNetConfig(hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           tie_word_embeddings=True, **common)
    elif family == "phi":
        cfg = PhiConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, partial_rotary_factor=0.5, tie_word_embeddings=False, **common)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=8,
                               sliding_window=16, **common)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128, vocab_size=vocab_size,
                         bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, embed_std: float | None = None, **kwargs) -> PreTrainedModel:
    """A random-init tiny causal LM of `family` in eval mode, fp32.

    `embed_std` re-draws the token embeddings from N(0, embed_std^2): with O(1) hidden states (as in
    trained models) the RMSNorms do not amplify fp32 noise by ~50x the way HF's 0.02 init does.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs))
    if embed_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embed_std)
    return model.eval()


_TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A ternary weight is minus one, zero or one. "
    "Binary weights are plus or minus one. Shall I compare thee to a summer's day? Thou art more lovely "
    "and more temperate. In the beginning was the word, and the word was with the model. 0123456789 "
)


def tiny_tokenizer(vocab_size: int = 320, text: str = _TINY_TEXT):
    """A byte-level BPE tokenizer (GPT-2 pre-tokenization) trained on a few sentences, as a
    PreTrainedTokenizerFast with <pad>=0, <s>=1, </s>=2. Its vocabulary is at least 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator([text] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
