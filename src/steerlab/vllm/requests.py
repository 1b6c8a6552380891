"""Building a vLLM request's steering: ``SamplingParams(extra_args=extra_args([...]))``.

A request carries ``[{vector, multiplier, layers?, policy?, scale?, operator?, clamp?}]`` as
a list in ``SamplingParams.extra_args["steering"]`` (offline) or as a JSON string in the
OpenAI server's ``vllm_xargs``; :mod:`steerlab.core.requests` (the one schema) parses it in
every engine. Vectors are named, never given by path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from steerlab.core.requests import KEY


def extra_args(steerings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``SamplingParams.extra_args`` for a list of steering entries (for ``vllm.LLM``)."""
    return {KEY: [dict(s) for s in steerings]}
