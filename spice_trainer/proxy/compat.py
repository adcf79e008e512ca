"""Whether a proxy model can stand in for the target: same tokenizer, same family (a warning otherwise).

Gradients transfer row by row, so the proxy must read the same token ids as the target.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["check_proxy_compatible"]


def check_proxy_compatible(
    proxy: nn.Module,
    target: nn.Module | None = None,
    *,
    tokenizer: Any = None,
    proxy_tokenizer: Any = None,
) -> None:
    """Refuse a proxy that tokenizes differently from the target; warn when its family differs.

    Gradients transfer row by row: the proxy must read the same token ids as the target. With both
    tokenizers the check is exact (vocabulary, special tokens and their ids, chat template). Without the
    proxy's tokenizer it compares what the proxy's config says: its ``vocab_size`` against the target's
    and its special token ids against the target tokenizer's (or config's). Two vocabularies of the same
    size with different tokens cannot be told apart that way; pass ``proxy_tokenizer`` for the exact check.

    Raises:
        ValueError: the vocabularies, special tokens or chat templates differ, the proxy's embedding has
            fewer rows than the target tokenizer has tokens, or the proxy shares parameters with the target.
    """
    tokenizer = _text_tokenizer(tokenizer)
    proxy_tokenizer = _text_tokenizer(proxy_tokenizer)
    proxy_config = getattr(proxy, "config", None)
    target_config = getattr(target, "config", None) if target is not None else None
    if target is not None:
        shared = {id(p) for p in proxy.parameters()} & {id(p) for p in target.parameters()}
        if shared:
            raise ValueError(
                f"proxy_model shares {len(shared)} parameters with the trainer's model; the proxy must be a "
                "separate (smaller) model with its own weights, e.g. loaded with "
                "AutoModelForCausalLM.from_pretrained(path) — to select with the live model, set proxy_model=None"
            )
    fix = (
        "The proxy must share the target's tokenizer: use a smaller model of the same family (e.g. a Qwen2-0.5B "
        "proxy for a Qwen2-7B target), or proxy_model=None to select with the live model"
    )
    if tokenizer is not None and proxy_tokenizer is not None:
        _compare_tokenizers(tokenizer, proxy_tokenizer, fix)
    else:
        _compare_configs(proxy_config, target_config, tokenizer, fix)
    if tokenizer is not None:
        rows = _embedding_rows(proxy)
        if rows is not None and rows < len(tokenizer):
            raise ValueError(
                f"the proxy's embedding has {rows} rows but the target tokenizer has {len(tokenizer)} tokens: "
                f"the proxy cannot read every token id of the training data. {fix}"
            )
    proxy_type = getattr(proxy_config, "model_type", None)
    target_type = getattr(target_config, "model_type", None)
    if proxy_type and target_type and proxy_type != target_type:
        logger.warning(
            "spice: the proxy is a %r model and the target a %r model: selection patterns transfer weakly "
            "across families (SPICE, section on proxies), so the proxy's picks may not be the ones the target "
            "would make. Prefer a smaller model of the target's family; the per-round spice/proxy_rank_corr and "
            "spice/proxy_overlap show how well it agrees with the live model",
            proxy_type,
            target_type,
        )


def _compare_tokenizers(target_tok: Any, proxy_tok: Any, fix: str) -> None:
    target_vocab, proxy_vocab = target_tok.get_vocab(), proxy_tok.get_vocab()
    if target_vocab != proxy_vocab:
        examples = []
        for token, idx in sorted(target_vocab.items(), key=lambda item: item[1]):
            other = proxy_vocab.get(token)
            if other != idx:
                examples.append(
                    f"{token!r} is id {idx} in the target and "
                    + ("missing" if other is None else f"id {other}")
                    + " in the proxy"
                )
            if len(examples) == 3:
                break
        if not examples:
            extra = sorted(set(proxy_vocab) - set(target_vocab))[:3]
            examples.append(f"the proxy has tokens the target lacks, e.g. {extra}")
        raise ValueError(
            f"the proxy's vocabulary differs from the target's ({len(proxy_vocab)} vs {len(target_vocab)} tokens; "
            f"{'; '.join(examples)}). {fix}"
        )
    differing = []
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(target_tok, name, None), getattr(proxy_tok, name, None)
        a_id, b_id = getattr(target_tok, f"{name}_id", None), getattr(proxy_tok, f"{name}_id", None)
        if (str(a) if a is not None else None) != (str(b) if b is not None else None) or a_id != b_id:
            differing.append(f"{name}: target {a!r} (id {a_id}), proxy {b!r} (id {b_id})")
    target_special = set(map(str, getattr(target_tok, "all_special_tokens", [])))
    proxy_special = set(map(str, getattr(proxy_tok, "all_special_tokens", [])))
    if target_special != proxy_special:
        differing.append(
            f"special tokens only in the target {sorted(target_special - proxy_special)}, "
            f"only in the proxy {sorted(proxy_special - target_special)}"
        )
    if differing:
        raise ValueError(f"the proxy's special tokens differ from the target's ({'; '.join(differing)}). {fix}")
    if getattr(target_tok, "chat_template", None) != getattr(proxy_tok, "chat_template", None):
        raise ValueError(
            "the proxy's chat template differs from the target's, so conversational rows would be rendered into "
            f"different token sequences. {fix}; or set proxy_tokenizer.chat_template = tokenizer.chat_template "
            "when the difference is cosmetic"
        )


def _compare_configs(proxy_config: Any, target_config: Any, tokenizer: Any, fix: str) -> None:
    proxy_vocab = getattr(proxy_config, "vocab_size", None)
    target_vocab = getattr(target_config, "vocab_size", None)
    if proxy_vocab is not None and target_vocab is not None and proxy_vocab != target_vocab:
        raise ValueError(
            f"the proxy's vocab_size ({proxy_vocab}) differs from the target's ({target_vocab}) and the proxy's "
            "tokenizer is unknown, so SPICE cannot tell padded embeddings of one tokenizer (e.g. Qwen2-0.5B "
            "151936 vs Qwen2-7B 152064) from another vocabulary. Pass the proxy as a local path that holds its "
            f"tokenizer, or ProxyModel(..., proxy_tokenizer=...) for the exact check. {fix}"
        )
    differing = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        proxy_id = _first_id(getattr(proxy_config, name, None))
        ref = getattr(tokenizer, name, None) if tokenizer is not None else getattr(target_config, name, None)
        ref_id = _first_id(ref)
        if proxy_id is not None and ref_id is not None and proxy_id != ref_id:
            differing.append(f"{name}: target {ref_id}, proxy {proxy_id}")
    if differing:
        raise ValueError(f"the proxy's special token ids differ from the target's ({'; '.join(differing)}). {fix}")


def _first_id(value: Any) -> int | None:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return int(value) if value is not None else None


def _embedding_rows(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def _text_tokenizer(tok: Any) -> Any:
    """The text tokenizer of a tokenizer or a processor (``processor.tokenizer``)."""
    if tok is None or hasattr(tok, "get_vocab"):
        return tok
    inner = getattr(tok, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "get_vocab") else None
