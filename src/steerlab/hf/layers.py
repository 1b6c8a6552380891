"""Finding the decoder blocks of a model: an explicit table, then an override, then an error."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerlab.core.errors import SteerlabError
from steerlab.core.layers import resolve_layers  # noqa: F401  (re-exported)
from steerlab.core.vector import SITES

# model_type -> dotted path of the decoder-block list (relative to the *ForCausalLM module).
LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "qwen2_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "phi": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "smollm3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neo": "transformer.h",
    "gptj": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "falcon": "transformer.h",
    "bloom": "transformer.h",
}


# model_type -> the submodules of a block whose outputs are what the attention and the MLP
# add to the residual stream ("attn" and "mlp" sites). Post-norm blocks (Gemma 2, OLMo 2)
# add their post-norm's output; OPT's MLP ends in fc2 (which sees flattened tokens).
SITE_PATHS: dict[str, tuple[str, str]] = {
    "llama": ("self_attn", "mlp"),
    "mistral": ("self_attn", "mlp"),
    "qwen2": ("self_attn", "mlp"),
    "qwen3": ("self_attn", "mlp"),
    "phi3": ("self_attn", "mlp"),
    "phi": ("self_attn", "mlp"),
    "smollm3": ("self_attn", "mlp"),
    "granite": ("self_attn", "mlp"),
    "olmo": ("self_attn", "mlp"),
    "gemma": ("self_attn", "mlp"),
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": ("attn", "mlp"),
    "gpt_neo": ("attn", "mlp"),
    "gptj": ("attn", "mlp"),
    "gpt_neox": ("attention", "mlp"),
    "opt": ("self_attn", "fc2"),
}


@dataclass(frozen=True)
class LayerMap:
    """Where the decoder blocks live.

    Attributes:
        path: dotted path of the block list, e.g. ``model.layers``.
        blocks: the blocks; layer ``i`` is the output of ``blocks[i]``.
        base: the module that runs the blocks (its forward gets the attention mask and cache).
        hidden_size: width of the residual stream.
    """

    path: str
    blocks: nn.ModuleList
    base: nn.Module
    hidden_size: int
    model_type: str = "unknown"

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def site(self, layer: int, site: str) -> nn.Module:
        """The module whose output is steered or read at ``site`` of block ``layer``.

        Raises:
            SteerlabError: the site is unknown, or not known for this architecture.
        """
        block = self.blocks[layer]
        if site == "block":
            return block
        if site not in SITES:
            raise SteerlabError(f"site must be one of {', '.join(SITES)}, got {site!r}")
        paths = SITE_PATHS.get(self.model_type)
        module = None if paths is None else _get(block, paths[SITES.index(site) - 1])
        if module is None:
            known = ", ".join(sorted(SITE_PATHS))
            raise SteerlabError(
                f"site {site!r} is not known for architecture '{self.model_type}' (known: "
                f"{known}): use site block"
            )
        return module


def _get(module: nn.Module, path: str) -> nn.Module | None:
    obj: object = module
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, nn.Module) else None


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    for name in ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    if hasattr(model, "get_input_embeddings"):
        return int(embedding_weight(model).shape[1])
    raise SteerlabError("cannot tell the model's hidden size; its config has no hidden_size")


def find_layers(model: nn.Module, override: str | None = None) -> LayerMap:
    """Locate the decoder-block list of ``model``.

    Args:
        model: a Hugging Face causal LM.
        override: a dotted module path such as ``model.layers`` that replaces the table.

    Raises:
        SteerlabError: the architecture is unknown and no override was given, or the
            override does not name a module list.
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", "unknown"))
    path = override or LAYER_PATHS.get(model_type)
    if path is None:
        raise SteerlabError(
            f"unknown architecture '{model_type}': pass the decoder-block list with "
            "--layers-path (Python: layers_path=...), e.g. --layers-path model.layers"
        )
    blocks = _get(model, path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise SteerlabError(
            f"'{path}' is not a list of decoder blocks in this {model_type} model: "
            "pass the right dotted path with --layers-path, e.g. model.layers"
        )
    base_path = path.rsplit(".", 1)[0] if "." in path else ""
    base = _get(model, base_path) if base_path else model
    if base is None:
        base = model
    hidden = _hidden_size(model)
    # OPT-350m projects 512 -> 1024; the residual inside the blocks is hidden_size.
    return LayerMap(path=path, blocks=blocks, base=base, hidden_size=hidden, model_type=model_type)


def embedding_weight(model: nn.Module) -> torch.Tensor:
    """The input-embedding matrix; its device and dtype are the model's input side."""
    embeddings: Any = model.get_input_embeddings()  # type: ignore[operator]
    return embeddings.weight  # type: ignore[no-any-return]


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings."""
    return embedding_weight(model).device


def as_tokens(hidden: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``hidden`` as ``[batch, seq, d]`` (OPT's fc2 sees ``[batch * seq, d]``)."""
    return hidden.view(batch, seq, hidden.shape[-1]) if hidden.dim() == 2 else hidden


def block_output(output: object) -> torch.Tensor:
    """The residual-stream tensor in a decoder block's output (a tensor or a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unexpected decoder block output of type {type(output).__name__}")


def replace_block_output(output: object, hidden: torch.Tensor) -> object:
    """``output`` with its residual-stream tensor replaced by ``hidden``."""
    if isinstance(output, torch.Tensor):
        return hidden
    assert isinstance(output, tuple)
    return (hidden, *output[1:])


@functools.lru_cache(maxsize=64)
def _cache_kwarg_of(cls: Any) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` (transformers 5) or ``past_key_values``."""
    return _cache_kwarg_of(type(model))  # type: ignore[arg-type]
