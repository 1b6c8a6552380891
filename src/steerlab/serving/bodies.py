"""JSON bodies and the vector registry for the server: OpenAI-style errors, bounded
parsing and range-checked numbers, loading and describing the vectors of ``--vectors``.

Bodies are parsed with bounded numbers and depth; every number field is range-checked
before it reaches ``int()`` or ``float()``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector
from steerlab.formats import load_vector, vector_files

_MAX_INT_DIGITS = 19  # larger JSON integers are read as floats (then range-checked)


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        }


def _bounded_int(text: str) -> int | float:
    return int(text) if len(text.lstrip("-")) <= _MAX_INT_DIGITS else float(text)


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _valid_unicode(value: Any, depth: int = 0) -> bool:
    """False when a string anywhere in the body holds a lone surrogate (JSON's "\\ud800")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if depth > 64:
        return True  # nesting this deep is refused elsewhere
    if isinstance(value, dict):
        return all(_valid_unicode(k) and _valid_unicode(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_valid_unicode(v, depth + 1) for v in value)
    return True


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object from a request body, with bounded integers and nesting, every key once
    per object and every string valid Unicode.

    Raises:
        ApiError: 400 for anything else.
    """
    try:
        body = json.loads(raw, parse_int=_bounded_int, object_pairs_hook=_unique)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except _Duplicate as dup:
        raise ApiError(
            400, f"the request body repeats the key {dup.key[:64]!r}: give each field once"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not _valid_unicode(body):
        raise ApiError(
            400, "the request body holds a string that is not valid Unicode (a lone surrogate)"
        )
    return body


def number(value: Any, name: str, lo: float, hi: float, *, low_open: bool = False) -> float:
    """A finite JSON number within ``[lo, hi]`` (``(lo, hi]`` with ``low_open``).

    Raises:
        ApiError: 400 naming the field and its range.
    """
    span = f"{'(' if low_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number in {span}", name)
    x = float(value) if isinstance(value, float) or abs(value) < 10**18 else math.inf
    if not math.isfinite(x) or x > hi or x < lo or (low_open and x == lo):
        raise ApiError(400, f"'{name}' must be a finite number in {span}", name)
    return x


def integer(value: Any, name: str, lo: int, hi: int) -> int:
    """A JSON integer within ``[lo, hi]``.

    Raises:
        ApiError: 400 naming the field and its range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be an integer from {lo} to {hi}", name)
    return value


def load_vectors(
    directory: Path,
    lm: Engine,
    allow_mismatch: bool = False,
    warn: Callable[[str], None] | None = None,
) -> dict[str, SteeringVector]:
    """Every ``*.safetensors`` / ``*.gguf`` vector in ``directory``, keyed by file stem.

    Args:
        warn: called with a one-line message for each unreadable file, which is skipped;
            without it an unreadable file is an error.

    Raises:
        SteerlabError: a missing directory, a bad file name, a vector that does not fit
            the model, or (without ``warn``) an unreadable file.
    """
    vectors: dict[str, SteeringVector] = {}
    for path in vector_files(directory):
        try:
            vector = load_vector(path)
        except SteerlabError as exc:
            if warn is None:
                raise
            warn(f"skipping {path.name}: {exc}")
            continue
        try:
            vector.check_model(lm.identity, allow_mismatch)
        except SteerlabError as exc:
            raise SteerlabError(f"{path.name}: {exc}") from None
        vectors[path.stem] = vector
    return vectors


def describe_vector(name: str, vector: SteeringVector, full: bool) -> dict[str, Any]:
    """What ``/v1/vectors`` shows of a vector: no local paths or notes unless ``full``."""
    meta = vector.metadata()
    entry: dict[str, Any] = {
        "id": name,
        "object": "steering_vector",
        "layers": vector.layers,
        "method": meta["method"],
        "read_position": meta["read_position"],
        "positionwise": vector.positionwise,
        "norms": {str(k): n for k, n in vector.norms().items()},
        "model": {k: meta["model"][k] for k in ("architecture", "hidden_size", "num_layers")},
    }
    if full:
        entry["metadata"] = meta
    return entry
