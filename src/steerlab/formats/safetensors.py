"""steerlab's own vector file: safetensors tensors ``layer.N`` plus a sorted JSON header."""

from __future__ import annotations

import json
from pathlib import Path

from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector, from_metadata
from steerlab.formats.atomic import atomic_write_bytes

META_KEY = "steerlab"


def save_safetensors(vector: SteeringVector, path: str | Path) -> Path:
    """Write ``vector`` as safetensors with its metadata in the header, atomically."""
    from safetensors.torch import save

    target = Path(path)
    tensors = {f"layer.{k}": v.contiguous() for k, v in vector.directions.items()}
    header = {META_KEY: json.dumps(vector.metadata(), sort_keys=True)}
    atomic_write_bytes(target, save(tensors, metadata=header))
    return target


def load_safetensors(source: Path) -> SteeringVector:
    """Read a steerlab safetensors vector.

    Raises:
        SteerlabError: an unreadable file, no steerlab header, or broken contents.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise SteerlabError(
            f"'{source}' is not a readable safetensors file ({type(exc).__name__}): "
            "pass a vector written by `steerlab extract` or a llama.cpp .gguf control vector"
        ) from None
    if META_KEY not in header:
        raise SteerlabError(
            f"'{source}' has no steerlab metadata: it is not a steerlab vector "
            "(import llama.cpp/repeng files with `steerlab vector import-gguf`)"
        )
    directions = {}
    for key, tensor in tensors.items():
        prefix, _, index = key.partition(".")
        if prefix != "layer" or not index.isdigit() or len(index) > 6:
            raise SteerlabError(
                f"'{source}' holds a tensor named {key[:40]!r}, not layer.N: re-extract the vector"
            )
        directions[int(index)] = tensor
    try:
        meta = json.loads(header[META_KEY])
        return from_metadata(directions, meta)
    except (json.JSONDecodeError, RecursionError):
        raise SteerlabError(
            f"'{source}' has broken steerlab metadata (not JSON): re-extract the vector"
        ) from None
    except SteerlabError as exc:
        raise SteerlabError(f"'{source}' holds an invalid vector: {exc}") from None
