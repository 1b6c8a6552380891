"""Tiny random-initialised models and a character tokenizer, built offline from configs."""

from __future__ import annotations

import string
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from steerlab.hf.model import LoadedModel, describe

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.printable)
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)

ARCHITECTURES = ["llama", "mistral", "qwen2", "gemma2", "gpt2", "gpt_neox", "phi3", "opt"]


def tokenizer(chat: bool = True, pad: bool = True) -> Any:
    """A character-level tokenizer; optional chat template and pad token."""
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if pad else None,
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def config(arch: str, layers: int = 4, hidden: int = 32) -> Any:
    from transformers import AutoConfig

    vocab = len(VOCAB)
    common: dict[str, Any] = {"vocab_size": vocab}
    if arch in ("llama", "mistral", "qwen2", "gemma2", "phi3"):
        extra: dict[str, Any] = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        if arch == "gemma2":
            extra.update(
                head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, sliding_window=256
            )
        if arch == "phi3":
            extra.update(num_key_value_heads=4)
        if arch == "mistral":
            extra.update(sliding_window=None)
        if arch == "qwen2":
            extra.update(use_sliding_window=False)
        cfg = AutoConfig.for_model(arch, **common, **extra)
    elif arch == "gpt2":
        cfg = AutoConfig.for_model(
            "gpt2",
            **common,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        )
    elif arch == "gpt_neox":
        cfg = AutoConfig.for_model(
            "gpt_neox",
            **common,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
        )
    elif arch == "opt":
        cfg = AutoConfig.for_model(
            "opt",
            **common,
            hidden_size=hidden,
            ffn_dim=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        raise ValueError(arch)
    return cfg


def model(arch: str = "llama", layers: int = 4, hidden: int = 32, seed: int = 0) -> LoadedModel:
    """A tiny random model with the character tokenizer, described like load_model does."""
    torch.manual_seed(seed)
    cfg = config(arch, layers, hidden)
    cfg._attn_implementation = "eager"
    net = AutoModelForCausalLM.from_config(cfg)
    # Larger random weights make greedy decoding less tie-prone and steering effects visible.
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    net.eval()
    # Tests compare fixed-length greedy runs: HF generate must not stop at (or suppress) EOS.
    net.generation_config.eos_token_id = None
    net.generation_config.pad_token_id = 0
    return describe(net, tokenizer(), name=f"tiny-{arch}")
