"""steerlab inside stock vLLM: a plugin, not a fork (docs/design.md, "The vLLM engine").

Installed with ``pip install 'steerlab[vllm]'``; vLLM loads :func:`steerlab.vllm.plugin.register`
through its ``vllm.general_plugins`` entry point in every process. Vectors are registered by
name from ``$STEERLAB_VECTORS``; a request names them in ``extra_args["steering"]``
(``SamplingParams(extra_args=steerlab.vllm.extra_args([...]))`` offline, or
``"vllm_xargs": {"steering": "<JSON list>"}`` on ``vllm serve``).

Importing this package does not import vLLM.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from steerlab.vllm.requests import extra_args

__all__ = ["extra_args", "model_dir"]


def model_dir(spec: str = "smollm2-135m") -> Path:
    """A Hugging Face checkpoint folder vLLM can load, for a steerlab model spec.

    Aliases and ``.gguf`` files are converted once into steerlab's cache (as
    :func:`steerlab.load_model` does); vLLM also needs ``architectures`` in the config, so a
    sibling folder links the converted files with that field added. Folders pass through.
    """
    from steerlab.hf.convert import convert_gguf
    from steerlab.hf.model import ALIASES, resolve_alias

    if spec in ALIASES:
        source = convert_gguf(resolve_alias(spec))
    elif spec.endswith(".gguf"):
        source = convert_gguf(Path(spec).expanduser())
    else:
        return Path(spec).expanduser()
    target = source.with_name(source.name + "-vllm")
    if (target / "config.json").is_file():
        return target
    tmp = source.with_name(f".{source.name}-vllm.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "config.json" and not (tmp / item.name).exists():
            (tmp / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config.setdefault("architectures", [_architecture(config.get("model_type", ""))])
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    with contextlib.suppress(OSError):  # another process made it first
        tmp.rename(target)
    return target


def _architecture(model_type: str) -> str:
    names = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    return names.get(model_type, "LlamaForCausalLM")
