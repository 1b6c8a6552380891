"""llama.cpp control vectors: GGUF export and import (also reads repeng's files).

llama.cpp adds tensor ``direction.N`` to the output of block N, the same numbering as
steerlab's layer N; it cannot steer N = 0.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from steerlab.core.errors import SteerlabError
from steerlab.core.vector import ModelIdentity, SteeringVector, from_metadata
from steerlab.formats.atomic import atomic_write_bytes, check_output

ARCH = "controlvector"
_META = "steerlab.metadata"


def export_gguf(vector: SteeringVector, path: str | Path) -> Path:
    """Write ``vector`` as a llama.cpp control vector, atomically.

    Raises:
        SteerlabError: the vector has layer 0 or is position-wise (llama.cpp supports neither).
    """
    import gguf

    if vector.positionwise:
        raise SteerlabError(
            "llama.cpp control vectors add one vector at every position: a position-wise "
            "(ActAdd) vector cannot be exported"
        )
    if vector.site != "block":
        raise SteerlabError(
            f"llama.cpp control vectors add at the block output, but this vector was read at "
            f"the {vector.site} output ({vector.layer_convention}): extract it with --site block"
        )
    if 0 in vector.directions:
        raise SteerlabError(
            "llama.cpp cannot steer layer 0: drop it first with `steerlab vector select FILE "
            "--layers 1-...` or extract without layer 0"
        )
    target = Path(path)
    check_output(target)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", vector.model.architecture)
        writer.add_uint32(f"{ARCH}.layer_count", vector.model.num_layers)
        writer.add_string(_META, json.dumps(vector.metadata(), sort_keys=True))
        for layer, tensor in vector.directions.items():
            writer.add_tensor(f"direction.{layer}", tensor.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    # The GGUF writer wants a path: it writes in the system temp folder, and the bytes
    # reach the target through the same kill-safe write as every vector file.
    with tempfile.TemporaryDirectory(prefix="steerlab-gguf-") as folder:
        scratch = str(Path(folder) / "vector.gguf")
        write(scratch)
        data = Path(scratch).read_bytes()
    atomic_write_bytes(target, data)
    return target


MAX_METADATA_BYTES = 1 << 20  # steerlab's JSON in a GGUF; larger files are refused


def _field_str(reader: object, name: str) -> str | None:
    field = reader.get_field(name)  # type: ignore[attr-defined]
    if field is None:
        return None
    raw = field.parts[field.data[0]]
    if len(raw) > MAX_METADATA_BYTES:
        raise SteerlabError(
            f"{name} is {len(raw):,} bytes, over the {MAX_METADATA_BYTES:,}-byte limit for a "
            "vector file's metadata"
        )
    return bytes(raw).decode("utf-8")


def _field_int(reader: object, name: str) -> int | None:
    field = reader.get_field(name)  # type: ignore[attr-defined]
    if field is None:
        return None
    return int(field.parts[field.data[0]][0])


def import_gguf(path: str | Path) -> SteeringVector:
    """Read a llama.cpp/repeng control-vector GGUF.

    A file written by steerlab gets its full metadata back; other files get what the GGUF
    says (architecture hint, layer count, width) and no weight fingerprint.

    Raises:
        SteerlabError: not a control-vector GGUF, or no ``direction.N`` tensors.
    """
    import gguf

    source = Path(path)
    try:
        reader = gguf.GGUFReader(str(source))
    except Exception as exc:
        raise SteerlabError(
            f"cannot read GGUF file '{path}' ({type(exc).__name__}): check the file"
        ) from None
    directions: dict[int, torch.Tensor] = {}
    allowed = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction."):
            continue
        try:
            layer = int(tensor.name.split(".", 1)[1])
        except ValueError:
            continue
        kind = gguf.GGMLQuantizationType(tensor.tensor_type)
        if kind not in allowed:
            raise SteerlabError(
                f"'{path}': {tensor.name} holds {kind.name} values; a control vector's "
                "directions are F32 (or F16): re-export the vector"
            )
        dims = [int(x) for x in tensor.shape]
        if len(dims) != 1 or dims[0] < 1:
            raise SteerlabError(
                f"'{path}': {tensor.name} has shape {dims}; a control vector holds one "
                "non-empty direction per layer: re-export the vector"
            )
        directions[layer] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
    if not directions:
        raise SteerlabError(
            f"'{path}' holds no control vector (no direction.N tensors): pass a llama.cpp "
            "control-vector GGUF, not a model"
        )
    widths = {int(t.shape[0]) for t in directions.values()}
    if len(widths) != 1:
        raise SteerlabError(
            f"'{path}': its directions have different widths {sorted(widths)}: re-export it"
        )
    try:
        meta_text = _field_str(reader, _META)
        if meta_text:
            return from_metadata(directions, json.loads(meta_text))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, IndexError):
        raise SteerlabError(
            f"'{path}' has broken steerlab metadata (not JSON): re-export the vector"
        ) from None
    except SteerlabError as exc:
        raise SteerlabError(f"'{path}' holds an invalid vector: {exc}") from None
    hint = _field_str(reader, f"{ARCH}.model_hint") or "unknown"
    count = _field_int(reader, f"{ARCH}.layer_count") or 0
    width = int(next(iter(directions.values())).shape[0])
    # repeng writes the number of directions as layer_count; never below the highest index.
    num_layers = max(count, max(directions) + 1)
    return SteeringVector(
        directions=directions,
        model=ModelIdentity(
            name=f"gguf:{source.name}", architecture=hint, hidden_size=width, num_layers=num_layers
        ),
        method="imported",
        read_position="unknown",
        notes={"imported_from": str(source), "gguf_layer_count": count},
    )
