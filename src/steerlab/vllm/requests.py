"""The per-request steering schema for vLLM, shared by the plugin and steerlab's own server.

A request carries ``[{vector, multiplier, layers?, policy?, scale?, operator?, clamp?}]``, as a list in
``SamplingParams.extra_args["steering"]`` (offline) or as a JSON string in the OpenAI
server's ``vllm_xargs``. Vectors are named, never given by path.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy
from steerlab.core.steering import Steering, operator_fields, site_field
from steerlab.core.vector import SteeringVector

KEY = "steering"
MAX_STEERINGS = 8
MAX_MULTIPLIER = 1000.0


def raw_entries(extra_args: Mapping[str, Any] | None) -> list[Any]:
    """The steering entries of a request's extra args (a list, or a JSON string of one)."""
    if not extra_args or KEY not in extra_args:
        return []
    raw = extra_args[KEY]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise SteerlabError("'steering' is not valid JSON") from None
    if not isinstance(raw, list):
        raise SteerlabError("'steering' must be a list of {vector, multiplier, layers?, policy?}")
    return raw


def parse(
    extra_args: Mapping[str, Any] | None,
    vectors: Mapping[str, SteeringVector],
    num_layers: int,
) -> list[Steering]:
    """Validated steerings of one request.

    Raises:
        SteerlabError: one line naming the entry, the problem and the fix.
    """
    entries = raw_entries(extra_args)
    if len(entries) > MAX_STEERINGS:
        raise SteerlabError(f"at most {MAX_STEERINGS} steerings per request")
    out = []
    for i, item in enumerate(entries):
        where = f"steering[{i}]"
        if not isinstance(item, dict):
            raise SteerlabError(f"{where} must be an object")
        name = item.get("vector")
        if not isinstance(name, str) or name not in vectors:
            known = ", ".join(sorted(vectors)) or "none"
            shown = name[:64] if isinstance(name, str) else name
            raise SteerlabError(f"unknown vector {shown!r} in {where}: known vectors are {known}")
        multiplier = item.get("multiplier", 1.0)
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, (int, float))
            or not math.isfinite(float(multiplier))
            or abs(float(multiplier)) > MAX_MULTIPLIER
        ):
            raise SteerlabError(
                f"{where}.multiplier must be a finite number within +/-{MAX_MULTIPLIER:g}"
            )
        layers = item.get("layers")
        if layers is not None and (
            not isinstance(layers, list)
            or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        ):
            raise SteerlabError(f"{where}.layers must be a non-empty list of integers")
        if item.get("condition") is not None:
            raise SteerlabError(
                f"{where}: conditional steering reads the prompt before decoding, which "
                "steerlab's vLLM plugin does not do: use the Hugging Face engine"
            )
        policy = item.get("policy", "after-prompt")
        if not isinstance(policy, str) or len(policy) > 256:
            raise SteerlabError(f"{where}.policy must be a policy name")
        try:
            operator, clamp = operator_fields(item)
            steering = Steering(
                vectors[name],
                float(multiplier),
                None if layers is None else tuple(layers),
                Policy.parse(policy),
                item.get("scale", "absolute"),
                operator,
                clamp,
                site=site_field(item),
            )
        except SteerlabError as exc:
            raise SteerlabError(f"{where}: {exc}") from None
        if steering.site != "block":
            raise SteerlabError(
                f"{where}: site {steering.site!r} is steered by the Hugging Face engine only; "
                "steerlab's vLLM plugin steers block outputs (use a block-output vector)"
            )
        top = max(steering.steered_layers)
        if top >= num_layers:
            raise SteerlabError(f"{where}: layer {top} does not exist (layers 0..{num_layers - 1})")
        if steering.policy.kind == "transient":
            raise SteerlabError(
                f"{where}: policy transient needs two passes per token, which vLLM's scheduler "
                "does not run: use the Hugging Face engine (steerlab serve without --engine vllm)"
            )
        out.append(steering)
    return out


def touches_prompt(steerings: Sequence[Steering]) -> bool:
    """Whether some steering changes prompt positions (their KV blocks must not be shared).

    ``after-prompt`` and ``window:0-…`` steer the last prompt token, P-1; every policy but
    a window that starts after the first generated token does.
    """
    return any(not (s.policy.kind == "window" and s.policy.start >= 1) for s in steerings)


def cache_salt(entries: Sequence[Any], salt: str | None = None) -> str:
    """A prefix-cache salt that only identical steerings share."""
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"{salt or ''}|{text}".encode()).hexdigest()[:32]
    return f"steerlab-{digest}"


def extra_args(steerings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``SamplingParams.extra_args`` for a list of steering entries (for ``vllm.LLM``)."""
    return {KEY: [dict(s) for s in steerings]}
