"""Tiny random dense models of every supported family, built from configs (no download).

Tests, benchmarks and the trainer's end-to-end runs use these as stand-ins for real checkpoints:
each is a real `transformers` model of its family (same modules, same weight names), only small.
Each config also switches on the family's less common attention settings (sliding windows, a head
size that is not hidden/heads, tied embeddings) so that an export which forgot to carry one over
would change the logits and fail the exactness tests.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2")

# Shared by every family: small enough that a forward pass takes milliseconds on one core.
_COMMON = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-6, hidden_act="silu",
    # Larger than the usual 0.02 so that every sub-block visibly moves the logits: a wrong
    # expert, gate or norm in an export then shows up far above the 1e-4 tolerance.
    initializer_range=0.1,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

_PER_FAMILY: dict[str, dict] = {
    # SmolLM2-like: tied embeddings, plain RoPE with a large theta.
    "llama": dict(intermediate_size=96, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # Sliding window shorter than the test sequences, so it matters.
    "mistral": dict(intermediate_size=112, tie_word_embeddings=False, sliding_window=6,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Qwen2: q/k/v biases; the second layer uses a sliding window (max_window_layers=1).
    "qwen2": dict(intermediate_size=128, tie_word_embeddings=False, use_sliding_window=True,
                  sliding_window=5, max_window_layers=1,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Qwen3: per-head q/k norms and head_dim != hidden_size / num_attention_heads; tied like Qwen3-0.6B.
    "qwen3": dict(intermediate_size=96, tie_word_embeddings=True, head_dim=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # OLMo 2: full-width q/k norms and post-norms.
    "olmo2": dict(intermediate_size=128, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """The tiny dense config of `family` (one of TINY_FAMILIES); `overrides` replace any field."""
    if family not in _PER_FAMILY:
        raise ValueError(f"no tiny model for family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    kwargs = {**_COMMON, **_PER_FAMILY[family], **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    config.dtype = torch.float32
    return config


def tiny_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised fp32 dense causal LM of `family`, deterministic in `seed`, in eval mode."""
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


_TOKENIZER_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
    "The quick brown fox jumps over the lazy dog; 0123456789, and then: what? Yes! (No.) "
)


def tiny_tokenizer(vocab_size: int = 512, text: str | None = None):
    """A small byte-level BPE tokenizer (GPT-2 style, as Llama 3, Qwen, OLMo 2 and SmolLM2 use)
    trained offline on `text` (a built-in paragraph by default).

    Returns a `transformers` fast tokenizer with <pad>=0, <s>=1, </s>=2, <unk>=3, matching the
    special token ids of `tiny_config`. Byte-level, so any text round-trips, and it decodes the same
    when `AutoTokenizer` picks a family's own class (e.g. Qwen2Tokenizer rebuilds a byte-level BPE
    from the vocab and merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text or _TOKENIZER_TEXT] * 4, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens, more than vocab_size={vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save_tiny_model(family: str, output_dir: str | Path, seed: int = 0, text: str | None = None,
                    **overrides) -> Path:
    """Write a tiny model folder (config, safetensors weights, tokenizer, generation config) loadable
    offline with `AutoModelForCausalLM.from_pretrained(output_dir)` and `AutoTokenizer`."""
    output_dir = Path(output_dir)
    model = tiny_model(family, seed=seed, **overrides)
    tokenizer = tiny_tokenizer(model.config.vocab_size, text=text)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
