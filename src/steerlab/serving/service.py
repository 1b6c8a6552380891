"""Request validation for the server: the vector registry, limits, and OpenAI-style errors.

:class:`Service` turns a request body into a validated batcher job; nothing here touches
the network, so every check is tested without a server. Bodies are parsed with bounded
numbers and depth; every number field is range-checked before it reaches ``int()`` or
``float()``, and prompt sizes are checked in characters before tokenizing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import check_marker
from steerlab.core.prompts import encode, render_messages
from steerlab.core.requests import EntryError, Rules, parse_steerings
from steerlab.core.sampling import limit_temperature
from steerlab.core.steering import Steering
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
from steerlab.serving.connections import default_max_connections

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
        request_timeout: seconds a request may take from the moment its head arrived,
            reading its body and queueing included (then 408 while reading, 504 after).
        body_timeout: seconds to read a request's body (then 408).
        header_timeout: seconds a connection may take to send a request head (then 408
            and closed; ``serving/connections.py``).
        max_connections: open connections; more are answered 503 and closed at once.
    """

    max_tokens: int = 512
    max_multiplier: float = 1000.0
    max_steerings: int = 8
    max_batch: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 100_000
    request_timeout: float = 300.0
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    max_connections: int = field(default_factory=default_max_connections)


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
    """Validates requests and turns them into jobs for the engine's runner."""

    def __init__(self, lm: Engine, vectors: dict[str, SteeringVector], limits: Limits) -> None:
        self.lm = lm
        self.vectors = vectors
        self.limits = limits
        # Rows run in padded batches on our worker thread, or the engine schedules them
        # itself (vLLM: continuous batching, each row streamed and cancelled on its own).
        self.runner: Any = (
            lm if lm.capabilities.continuous else Batcher(lm, limits.max_batch, limits.max_queue)
        )
        self.context = lm.context_length

    @property
    def rules(self) -> Rules:
        """What this server's engine and limits accept (:mod:`steerlab.core.requests`)."""
        caps = self.lm.capabilities
        return Rules(
            num_layers=self.lm.identity.num_layers,
            context=self.context,
            max_steerings=self.limits.max_steerings,
            max_multiplier=self.limits.max_multiplier,
            transient=caps.transient,
            sites=caps.sites,
            conditions=caps.conditions,
            max_projections=caps.projections,
            dtype=self.lm.dtype,
        )

    def steerings(self, raw: Any, prompt_ids: list[int]) -> list[Steering]:
        """A request's validated steerings (the one schema, :mod:`steerlab.core.requests`),
        each ``from-marker`` checked against the rendered prompt."""
        try:
            steerings = parse_steerings(raw, self.vectors, self.rules)
        except EntryError as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            raise ApiError(exc.status, str(exc), exc.field, kind) from None
        text = None
        for i, s in enumerate(steerings):
            if s.policy.needs_marker:
                text = self.lm.tokenizer.decode(prompt_ids) if text is None else text
                try:
                    check_marker(s.policy, text)
                except SteerlabError as exc:
                    raise ApiError(400, f"steering[{i}]: {exc}", f"steering[{i}].policy") from None
        return steerings

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
        if explain and not self.lm.capabilities.explain:
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
            [] if m == 0 else self.steerings([{**item, "multiplier": m}], ids) for m in multipliers
        ]
        if not any(rows):  # only unsteered rows: still refuse an unknown vector or layer
            self.steerings([{**item, "multiplier": 1.0}], ids)
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
        temperature = limit_temperature(
            number(body.get("temperature", 0.0), "temperature", 0.0, 2.0)
        )
        top_p = number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True)
        seed = body.get("seed")
        if seed is not None:
            seed = integer(seed, "seed", 0, _MAX_SEED)
        refuse_unsupported(body, chat)
        stop = stop_strings(body.get("stop"))
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
            "stop": stop,
        }
        return ids, params


# OpenAI fields this server does not implement, with the value that means "not used": any
# other value is refused with a 400 naming the field, never ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "top_k": (None, 0, -1),
    "min_p": (None, 0, 0.0),
    "prediction": (None,),
    "audio": (None,),
}


def refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """A 400 naming the first OpenAI field set to something this server does not do."""
    for name, neutral in UNSUPPORTED.items():
        if name in body and not any(
            body[name] == value and type(body[name]) is type(value) or body[name] is value
            for value in neutral
        ):
            raise ApiError(
                400,
                f"'{name}' is not supported by this server: leave it out",
                name,
            )
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(
            400,
            "'response_format' other than text is not supported: leave it out",
            "response_format",
        )
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or options.get("include_usage")):
        raise ApiError(
            400, "'stream_options.include_usage' is not supported: leave it out", "stream_options"
        )


MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


def stop_strings(raw: Any) -> list[str]:
    """The ``stop`` field: a string or a list of up to four non-empty strings."""
    if raw is None:
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stops)
    ):
        raise ApiError(
            400,
            f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings of at "
            f"most {MAX_STOP_CHARS} characters",
            "stop",
        )
    return list(stops)
