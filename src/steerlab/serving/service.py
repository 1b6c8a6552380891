"""Request validation for the server: the vector registry, limits, and OpenAI-style errors.

:class:`Service` turns a request body into a validated batcher :class:`Job`; nothing here
touches the network, so every check is tested without a server.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy, check_marker
from steerlab.core.prompts import encode, render_messages
from steerlab.core.steering import Steering
from steerlab.core.vector import SteeringVector
from steerlab.formats import load_vector
from steerlab.serving.batcher import Batcher

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class Limits:
    """Request limits: the largest ``max_tokens``, |multiplier| and steerings per request."""

    max_tokens: int = 512
    max_multiplier: float = 1000.0
    max_steerings: int = 8
    max_batch: int = 8


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        }


def load_vectors(
    directory: Path, lm: Engine, allow_mismatch: bool = False
) -> dict[str, SteeringVector]:
    """Every ``*.safetensors`` / ``*.gguf`` vector in ``directory``, keyed by file stem.

    Raises:
        SteerlabError: a missing directory, a bad file name, or a vector that does not fit
            the model.
    """
    if not directory.is_dir():
        raise SteerlabError(f"vector directory '{directory}' does not exist: pass --vectors DIR")
    vectors: dict[str, SteeringVector] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in (".safetensors", ".gguf"):
            continue
        if not _NAME.match(path.stem):
            raise SteerlabError(
                f"vector file name '{path.name}' is not a plain name: rename it (letters, digits, _ . -)"
            )
        vector = load_vector(path)
        try:
            vector.check_model(lm.identity, allow_mismatch)
        except SteerlabError as exc:
            raise SteerlabError(f"{path.name}: {exc}") from None
        vectors[path.stem] = vector
    return vectors


class Service:
    """Validates requests and turns them into batcher jobs."""

    def __init__(self, lm: Engine, vectors: dict[str, SteeringVector], limits: Limits) -> None:
        self.lm = lm
        self.vectors = vectors
        self.limits = limits
        self.batcher = Batcher(lm, limits.max_batch)
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
        out = []
        for i, item in enumerate(raw):
            where = f"steering[{i}]"
            if not isinstance(item, dict):
                raise ApiError(400, f"{where} must be an object", where)
            name = item.get("vector")
            if not isinstance(name, str) or name not in self.vectors:
                known = ", ".join(sorted(self.vectors)) or "none"
                raise ApiError(
                    404,
                    f"unknown vector {name!r} in {where}: known vectors are {known}",
                    f"{where}.vector",
                    "not_found_error",
                )
            vector = self.vectors[name]
            multiplier = item.get("multiplier", 1.0)
            if (
                isinstance(multiplier, bool)
                or not isinstance(multiplier, (int, float))
                or not math.isfinite(multiplier)
            ):
                raise ApiError(
                    400, f"{where}.multiplier must be a finite number", f"{where}.multiplier"
                )
            if abs(multiplier) > self.limits.max_multiplier:
                raise ApiError(
                    400,
                    f"{where}.multiplier must be within +/-{self.limits.max_multiplier:g}",
                    f"{where}.multiplier",
                )
            layers = item.get("layers")
            if layers is not None:
                if (
                    not isinstance(layers, list)
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
                    or not layers
                ):
                    raise ApiError(
                        400,
                        f"{where}.layers must be a non-empty list of integers",
                        f"{where}.layers",
                    )
                missing = [x for x in layers if x not in vector.directions]
                if missing:
                    raise ApiError(
                        400,
                        f"{where}: vector {name!r} has no layer {missing[0]} (it has {','.join(map(str, vector.layers))})",
                        f"{where}.layers",
                    )
            scale = item.get("scale", "absolute")
            try:
                policy = Policy.parse(str(item.get("policy", "after-prompt")))
                steering = Steering(
                    vector,
                    float(multiplier),
                    None if layers is None else tuple(layers),
                    policy,
                    scale,
                )
            except SteerlabError as exc:
                raise ApiError(400, f"{where}: {exc}", where) from None
            try:
                check_marker(policy, self.lm.tokenizer.decode(prompt_ids))
            except SteerlabError as exc:
                raise ApiError(400, f"{where}: {exc}", f"{where}.policy") from None
            out.append(steering)
        return out

    def job(self, body: dict[str, Any], chat: bool) -> tuple[list[int], dict[str, Any]]:
        """Validate a request body; returns the prompt ids and the decoding parameters."""
        tok = self.lm.tokenizer
        if chat:
            messages = body.get("messages")
            if (
                not isinstance(messages, list)
                or not messages
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
            ids = encode(tok, render_messages(tok, messages))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
            ids = [int(i) for i in tok(prompt)["input_ids"]]
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "'max_tokens' must be a positive integer", "max_tokens")
        if max_tokens > self.limits.max_tokens:
            raise ApiError(
                400,
                f"'max_tokens' is {max_tokens}, above this server's limit of {self.limits.max_tokens}",
                "max_tokens",
            )
        if len(ids) + max_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {self.context} tokens",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        temperature = body.get("temperature", 0.0)
        top_p = body.get("top_p", 1.0)
        seed = body.get("seed")
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ApiError(400, f"'{name}' must be a number", name)
        if not 0 <= float(temperature) <= 2:
            raise ApiError(400, "'temperature' must be between 0 and 2", "temperature")
        if not 0 < float(top_p) <= 1:
            raise ApiError(400, "'top_p' must be in (0, 1]", "top_p")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ApiError(400, "'seed' must be an integer", "seed")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        params = {
            "steering": self.steerings(body.get("steering"), ids),
            "max_tokens": max_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "seed": seed,
        }
        return ids, params
