"""Tiny in-process models and tokenizers for the demo, the benchmarks and the tests.

Nothing here downloads: the tokenizer is a word-level vocabulary built from the words given, and the
models are randomly initialised transformers configs (Llama, Qwen2, GPT-2, Mistral) with a PEFT LoRA
adapter. Imports transformers, peft and tokenizers on use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from spice_trainer.proxy.adapter import DEFAULT_LORA

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>")

# A minimal chat template: role markers, the content, and the end-of-sequence token after each turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' </s> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

Family = Literal["llama", "qwen2", "gpt2", "mistral"]


def build_tokenizer(words: Iterable[str]) -> Any:
    """A word-level `PreTrainedTokenizerFast` over the special tokens and the given words.

    Text is split on whitespace; a word outside the vocabulary maps to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *words):
        if token not in vocab:
            vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    return tokenizer


def build_model(
    tokenizer: Any,
    *,
    family: Family = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
) -> Any:
    """A randomly initialised causal LM of the given family, sized for CPU tests.

    The weights are drawn from a local generator seeded by ``seed``: global RNG is restored afterwards.
    """
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    vocab_size = len(tokenizer)
    intermediate = intermediate_size or 2 * hidden_size
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config: Any
    model_cls: Any
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            n_inner=intermediate,
            **ids,
        )
        model_cls = GPT2LMHeadModel
    else:
        cls_by_family = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
        }
        if family not in cls_by_family:
            raise ValueError(f"family must be one of 'llama', 'qwen2', 'gpt2', 'mistral', got {family!r}")
        config_cls, model_cls = cls_by_family[family]
        config = config_cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **ids,
        )
    # Build under a forked RNG so that making a model never moves the caller's global stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model


def add_lora(
    model: Any,
    *,
    r: int = DEFAULT_LORA["r"],
    alpha: int = DEFAULT_LORA["lora_alpha"],
    dropout: float = DEFAULT_LORA["lora_dropout"],
    target_modules: str | list[str] = DEFAULT_LORA["target_modules"],
    init_b_random: bool = True,
    seed: int = 0,
) -> Any:
    """Wrap ``model`` with a PEFT LoRA adapter (by default `spice_trainer.proxy.adapter.DEFAULT_LORA`'s settings).

    ``init_b_random=True`` gives ``lora_B`` small random weights instead of PEFT's zeros, so that tests
    see non-zero gradients for ``lora_A`` from the first step (a freshly initialised adapter has
    ``∂L/∂A = 0`` because ``B = 0``).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        if init_b_random:
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
    return peft_model
