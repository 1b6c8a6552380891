"""The engines steerlab runs on: one registry for dispatch, ``--help`` and capabilities.

An entry names an engine, says in one line what it is, declares what it runs exactly
(:class:`steerlab.core.engine.Capabilities`) and loads it. Every command that takes
``--engine`` goes through :func:`engine_entry` and :func:`require`, so an unsupported
combination is the same one-line error everywhere, naming the engines that support it.
Adding an engine is a folder beside ``hf/`` and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlab.core.engine import Capabilities, Engine
from steerlab.core.errors import SteerlabError


@dataclass(frozen=True)
class EngineOptions:
    """How to start an engine.

    Attributes:
        model: an alias, ``.gguf`` file, checkpoint folder or Hugging Face id.
        device, dtype: for the Hugging Face engine (vLLM picks its device).
        vectors: the folder of vectors an engine with a fixed registry (vLLM) loads once.
        enforce_eager: vLLM: run eagerly instead of its compiled graph.
        max_model_len: vLLM: the context it reserves per request.
        max_num_seqs: vLLM: requests it runs at once.
        extra: anything else an engine takes.
    """

    model: str
    device: str | None = None
    dtype: str | None = None
    vectors: Path | None = None
    enforce_eager: bool = False
    max_model_len: int = 2048
    max_num_seqs: int = 32
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineEntry:
    """One engine: its name, a line of help, what it runs, and how to start it."""

    name: str
    summary: str
    capabilities: Capabilities
    load: Callable[[EngineOptions], Engine]


def _load_hf(options: EngineOptions) -> Engine:
    from steerlab.hf.model import load_model

    return load_model(options.model, options.device, options.dtype)


def _load_vllm(options: EngineOptions) -> Engine:
    from steerlab.vllm.engine import VllmEngine

    return VllmEngine(
        options.model,
        options.vectors,
        dtype=options.dtype or "float32",
        enforce_eager=options.enforce_eager,
        max_model_len=options.max_model_len,
        max_num_seqs=options.max_num_seqs,
        **options.extra,
    )


ENGINES: dict[str, EngineEntry] = {
    "hf": EngineEntry(
        "hf",
        "Hugging Face transformers: every policy (transient too), site and condition",
        Capabilities(),
        _load_hf,
    ),
    "vllm": EngineEntry(
        "vllm",
        "vLLM with steerlab's plugin: continuous batching, compiled graphs; vectors from a "
        "folder registered at start",
        Capabilities(
            transient=False,
            sites=False,
            conditions=False,
            explain=False,
            kl=True,
            projections=1,
            continuous=True,
            activations=False,
        ),  # fmt: skip
        _load_vllm,
    ),
}

#: What a feature needs, for the one error message.
FEATURES: dict[str, str] = {
    "transient": "the transient policy",
    "sites": "steering at the attention or MLP output",
    "conditions": "conditional steering",
    "explain": "per-token KL in the playground",
    "kl": "KL and perplexity against the unsteered model",
    "activations": "reading activations",
}


def engine_help() -> str:
    """The ``--engine`` help text, from the registry."""
    return "; ".join(f"{e.name}: {e.summary}" for e in ENGINES.values())


def engine_entry(name: str) -> EngineEntry:
    """The registered engine ``name``.

    Raises:
        SteerlabError: an unknown name, listing the known ones.
    """
    entry = ENGINES.get(name)
    if entry is None:
        raise SteerlabError(f"unknown engine '{name}': use one of {', '.join(ENGINES)}")
    return entry


def require(name: str, feature: str, what: str) -> None:
    """Refuse ``what`` (an option or command) on an engine that lacks ``feature``.

    Raises:
        SteerlabError: one line naming the engines that support it.
    """
    entry = engine_entry(name)
    if getattr(entry.capabilities, feature):
        return
    able = [e.name for e in ENGINES.values() if getattr(e.capabilities, feature)]
    raise SteerlabError(
        f"{what} needs {FEATURES.get(feature, feature)}, which the {name} engine does not "
        f"run: use --engine {' or '.join(able)}"
    )
