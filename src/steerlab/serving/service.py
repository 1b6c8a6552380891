"""Request validation for the server: the vector registry, limits, and OpenAI-style errors.

:class:`Service` turns a request body into a validated batcher job; nothing here touches
the network, so every check is tested without a server. Bodies are parsed with bounded
numbers and depth; every number field is range-checked before it reaches ``int()`` or
``float()``, and prompt sizes are checked in characters before tokenizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from steerlab.core.condition import Condition
from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy, check_marker
from steerlab.core.prompts import encode, render_messages
from steerlab.core.steering import Steering, operator_fields, site_field
from steerlab.core.vector import SteeringVector
from steerlab.serving.batcher import Batcher
from steerlab.serving.bodies import (
    ApiError,
    describe_vector,
    integer,
    load_vectors,
    number,
    parse_body,
)

__all__ = [
    "ApiError",
    "Comparison",
    "Limits",
    "Service",
    "describe_vector",
    "integer",
    "load_vectors",
    "number",
    "parse_body",
]

_MAX_SEED = 2**63 - 1
_MAX_EXPLAIN = 20  # most changed tokens per position an explained request may ask for


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much the server takes on at once.

    Attributes:
        max_tokens: the largest ``max_tokens``.
        max_multiplier: the largest |multiplier|.
        max_steerings: steering entries per request.
        max_batch: rows per batch.
        max_queue: requests that may wait; more get 503 with ``Retry-After``.
        max_body_bytes: request body size; larger bodies get 413 before parsing.
        max_prompt_chars: characters of prompt or messages, checked before tokenizing.
        request_timeout: seconds a request may take, queueing included (then 504).
    """

    max_tokens: int = 512
    max_multiplier: float = 1000.0
    max_steerings: int = 8
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 100_000
    request_timeout: float = 300.0


@dataclass(frozen=True)
class Comparison:
    """A validated compare request: one prompt, one row per multiplier, one batch.

    Attributes:
        params: decoding parameters shared by every row (``max_tokens``, sampling).
        rows: each row's steerings (empty for multiplier 0).
        explain: most changed tokens per position to report (0: no explanation).
    """

    ids: list[int]
    params: dict[str, Any]
    multipliers: list[float]
    rows: list[list[Steering]]
    explain: int
    chat: bool


class Service:
    """Validates requests and turns them into batcher jobs."""

    def __init__(self, lm: Engine, vectors: dict[str, SteeringVector], limits: Limits) -> None:
        self.lm = lm
        self.vectors = vectors
        self.limits = limits
        self.batcher = Batcher(lm, limits.max_batch, limits.max_queue)
        self.context = lm.context_length

    def steerings(self, raw: Any, prompt_ids: list[int]) -> list[Steering]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ApiError(
                400,
                "'steering' must be a list of {vector, multiplier, layers?, policy?}",
                "steering",
            )
        if len(raw) > self.limits.max_steerings:
            raise ApiError(
                400, f"at most {self.limits.max_steerings} steerings per request", "steering"
            )
        return [self._steering(f"steering[{i}]", item, prompt_ids) for i, item in enumerate(raw)]

    def _steering(self, where: str, item: Any, prompt_ids: list[int]) -> Steering:
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", where)
        name = item.get("vector")
        if not isinstance(name, str) or name not in self.vectors:
            known = ", ".join(sorted(self.vectors)) or "none"
            shown = name[:64] if isinstance(name, str) else name
            raise ApiError(
                404,
                f"unknown vector {shown!r} in {where}: known vectors are {known}",
                f"{where}.vector",
                "not_found_error",
            )
        vector = self.vectors[name]
        bound = self.limits.max_multiplier
        raw_multiplier = item.get("multiplier", 1.0)
        if isinstance(raw_multiplier, bool) or not isinstance(raw_multiplier, (int, float)):
            raise ApiError(
                400, f"{where}.multiplier must be a finite number", f"{where}.multiplier"
            )
        try:
            multiplier = number(raw_multiplier, f"{where}.multiplier", -bound, bound)
        except ApiError:
            raise ApiError(
                400,
                f"{where}.multiplier must be within +/-{bound:g} (a finite number)",
                f"{where}.multiplier",
            ) from None
        layers = item.get("layers")
        if layers is not None:
            if (
                not isinstance(layers, list)
                or not layers
                or len(layers) > 4096
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            ):
                raise ApiError(
                    400, f"{where}.layers must be a non-empty list of integers", f"{where}.layers"
                )
            missing = [x for x in layers if x not in vector.directions]
            if missing:
                raise ApiError(
                    400,
                    f"{where}: vector {name!r} has no layer {missing[0]} (it has {','.join(map(str, vector.layers))})",
                    f"{where}.layers",
                )
        scale = item.get("scale", "absolute")
        policy_text = item.get("policy", "after-prompt")
        if not isinstance(policy_text, str) or len(policy_text) > 256:
            raise ApiError(400, f"{where}.policy must be a policy name", f"{where}.policy")
        try:
            condition = self._condition(f"{where}.condition", item.get("condition"))
            policy = Policy.parse(policy_text)
            operator, clamp = operator_fields(item)
            steering = Steering(
                vector,
                multiplier,
                None if layers is None else tuple(layers),
                policy,
                scale,
                operator,
                clamp,
                condition,
                site_field(item),
            )
        except SteerlabError as exc:
            raise ApiError(400, f"{where}: {exc}", where) from None
        if not policy.persisting and not getattr(self.lm, "supports_transient", True):
            raise ApiError(
                400,
                f"{where}: policy transient needs two passes per token, which this engine does "
                "not run: use the Hugging Face engine",
                f"{where}.policy",
            )
        try:
            check_marker(policy, self.lm.tokenizer.decode(prompt_ids))
        except SteerlabError as exc:
            raise ApiError(400, f"{where}: {exc}", f"{where}.policy") from None
        dtype = self.lm.dtype
        for layer in steering.steered_layers:
            if not bool(torch.isfinite(steering.delta(layer).to(dtype)).all()):
                raise ApiError(
                    400,
                    f"{where}: multiplier {multiplier:g} times vector {name!r} overflows the "
                    f"model's {str(dtype).removeprefix('torch.')} at layer {layer}: use a "
                    "smaller multiplier",
                    f"{where}.multiplier",
                )
        return steering

    def _condition(self, where: str, raw: Any) -> Condition | None:
        """``{vector, layer, threshold, above?, reduce?}``: steer only prompts that pass."""
        if raw is None:
            return None
        if not getattr(self.lm, "supports_conditions", False):
            raise ApiError(
                400,
                f"{where}: conditional steering reads the prompt before decoding, which this "
                "engine does not do: use the Hugging Face engine",
                where,
            )
        if not isinstance(raw, dict):
            raise ApiError(400, f"{where} must be an object {{vector, layer, threshold}}", where)
        name = raw.get("vector")
        if not isinstance(name, str) or name not in self.vectors:
            shown = name[:64] if isinstance(name, str) else name
            raise ApiError(
                404, f"unknown vector {shown!r} in {where}", f"{where}.vector", "not_found_error"
            )
        layer = raw.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ApiError(400, f"{where}.layer must be an integer", f"{where}.layer")
        threshold = number(raw.get("threshold"), f"{where}.threshold", -1e9, 1e9)
        above = raw.get("above", True)
        if not isinstance(above, bool):
            raise ApiError(400, f"{where}.above must be true or false", f"{where}.above")
        reduce = raw.get("reduce", "mean")
        if reduce not in ("mean", "last"):
            raise ApiError(400, f"{where}.reduce must be 'mean' or 'last'", f"{where}.reduce")
        try:
            return Condition(self.vectors[name], layer, threshold, above, reduce)
        except SteerlabError as exc:
            raise ApiError(400, f"{where}: {exc}", where) from None

    def _prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        tok = self.lm.tokenizer
        cap = self.limits.max_prompt_chars
        too_long = ApiError(
            400,
            f"the prompt is over this server's limit of {cap} characters",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
        if chat:
            messages = body.get("messages")
            if (
                not isinstance(messages, list)
                or not messages
                or len(messages) > 1024
                or not all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in messages
                )
            ):
                raise ApiError(
                    400,
                    "'messages' must be a non-empty list of {role, content} strings",
                    "messages",
                )
            if sum(len(m["content"]) + len(m["role"]) for m in messages) > cap:
                raise too_long
            return encode(tok, render_messages(tok, messages))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
        if len(prompt) > cap:
            raise too_long
        return [int(i) for i in tok(prompt)["input_ids"]]

    def job(self, body: dict[str, Any], chat: bool) -> tuple[list[int], dict[str, Any]]:
        """Validate a request body; returns the prompt ids and the decoding parameters.

        Cheap checks come first, so a bad request is refused before it is tokenized.
        """
        ids, params = self._decoding(body, chat)
        params["steering"] = self.steerings(body.get("steering"), ids)
        return ids, params

    def compare(self, body: dict[str, Any]) -> Comparison:
        """Validate a ``/v1/steerlab/compare`` body: one steering at several multipliers.

        The body is a chat (``messages``) or completion (``prompt``) request whose
        ``steering`` is one object without a multiplier, plus ``multipliers`` (one row each,
        run together as one batch; 0 is the unsteered row) and ``explain`` (``k``: per-token
        KL from the unsteered model and the ``k`` most changed tokens; 0 for none).
        """
        chat = "messages" in body
        raw = body.get("multipliers")
        cap = self.limits.max_batch
        if not isinstance(raw, list) or not 1 <= len(raw) <= cap:
            raise ApiError(
                400, f"'multipliers' must be a list of 1 to {cap} numbers", "multipliers"
            )
        bound = self.limits.max_multiplier
        multipliers = [number(m, f"multipliers[{i}]", -bound, bound) for i, m in enumerate(raw)]
        explain = integer(body.get("explain", 0), "explain", 0, _MAX_EXPLAIN)
        if explain and not getattr(self.lm, "supports_explain", False):
            raise ApiError(
                400,
                "'explain' needs the unsteered model beside the steered one, which this engine "
                "does not run: send explain 0, or serve with the Hugging Face engine",
                "explain",
            )
        item = body.get("steering")
        if not isinstance(item, dict):
            raise ApiError(
                400,
                "'steering' must be one object {vector, layers?, policy?}: the rows' "
                "multipliers go in 'multipliers'",
                "steering",
            )
        if "multiplier" in item:
            raise ApiError(
                400,
                "'steering' takes no multiplier here: put the rows' multipliers in 'multipliers'",
                "steering.multiplier",
            )
        ids, params = self._decoding(body, chat)
        rows = [
            [] if m == 0 else [self._steering("steering", {**item, "multiplier": m}, ids)]
            for m in multipliers
        ]
        if not any(rows):  # only unsteered rows: still refuse an unknown vector or layer
            self._steering("steering", {**item, "multiplier": 1.0}, ids)
        return Comparison(ids, params, multipliers, rows, explain, chat)

    def _decoding(self, body: dict[str, Any], chat: bool) -> tuple[list[int], dict[str, Any]]:
        """The prompt ids and the decoding parameters (no steering) of a request body."""
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, "'max_tokens' must be a positive integer", "max_tokens")
        if max_tokens > self.limits.max_tokens:
            raise ApiError(
                400,
                f"'max_tokens' is {max_tokens:.0f}, above this server's limit of {self.limits.max_tokens}",
                "max_tokens",
            )
        temperature = number(body.get("temperature", 0.0), "temperature", 0.0, 2.0)
        top_p = number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True)
        seed = body.get("seed")
        if seed is not None:
            seed = integer(seed, "seed", 0, _MAX_SEED)
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        ids = self._prompt_ids(body, chat)
        if len(ids) + max_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {self.context} tokens",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        params = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        return ids, params
