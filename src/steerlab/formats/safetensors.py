"""steerlab's own vector file: safetensors tensors ``layer.N`` plus a sorted JSON header."""

from __future__ import annotations

import json
from pathlib import Path

from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector, from_metadata
from steerlab.formats.atomic import atomic_write_bytes

META_KEY = "steerlab"
MAX_HEADER_BYTES = 1 << 20  # the JSON header (metadata included); larger files are refused
FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


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
        with source.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size > MAX_HEADER_BYTES:
                raise SteerlabError(
                    f"'{source}' has a {size:,}-byte header, over the {MAX_HEADER_BYTES:,}-byte "
                    "limit for a vector file: it is not a steerlab vector"
                )
            declared = json.loads(handle.read(size))
        kinds = {k: v.get("dtype") for k, v in declared.items() if k != "__metadata__"}
        wrong = next((k for k, v in kinds.items() if v not in FLOATS), None)
        if wrong is not None:
            raise SteerlabError(
                f"'{source}': tensor {wrong[:40]!r} holds {kinds[wrong]} values; a vector's "
                f"tensors are {', '.join(FLOATS.values())}: re-extract the vector"
            )
        with safe_open(str(source), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except SteerlabError:
        raise
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
        shape = meta.get("shape") if isinstance(meta, dict) else None
        for layer, tensor in directions.items():
            if shape is not None and list(tensor.shape) != shape:
                raise SteerlabError(
                    f"layer {layer} is {list(tensor.shape)}, but the vector declares {shape}: "
                    "re-extract the vector"
                )
        return from_metadata(directions, meta)
    except (json.JSONDecodeError, RecursionError):
        raise SteerlabError(
            f"'{source}' has broken steerlab metadata (not JSON): re-extract the vector"
        ) from None
    except SteerlabError as exc:
        raise SteerlabError(f"'{source}' holds an invalid vector: {exc}") from None
