"""Vector files: steerlab's safetensors format and llama.cpp control-vector GGUF.

:func:`load_vector` dispatches on the file's first bytes and never unpickles.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector
from steerlab.formats.gguf import export_gguf, import_gguf
from steerlab.formats.safetensors import load_safetensors, save_safetensors

__all__ = ["export_gguf", "import_gguf", "load_vector", "save_vector", "vector_files"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def save_vector(vector: SteeringVector, path: str | Path) -> Path:
    """Write a vector as steerlab safetensors (metadata in the header), atomically."""
    return save_safetensors(vector, path)


def load_vector(path: str | Path) -> SteeringVector:
    """Read a vector file (safetensors, or a llama.cpp control-vector GGUF).

    Never unpickles: ``.pt``/pickle files are refused.

    Raises:
        SteerlabError: a missing, pickled, foreign or corrupt file.
    """
    source = Path(path)
    if source.is_dir():
        raise SteerlabError(
            f"vector file '{path}' is a directory: pass a .safetensors or .gguf file"
        )
    if not source.is_file():
        raise SteerlabError(f"vector file '{path}' does not exist: check the path")
    with source.open("rb") as handle:
        magic = handle.read(8)
    if source.suffix.lower() in _PICKLE_SUFFIXES or magic[:2] in (b"\x80\x02", b"\x80\x04", b"PK"):
        raise SteerlabError(
            f"'{path}' is a pickle/torch file, which steerlab never loads (it can run code): "
            "convert it to safetensors with the tool that made it"
        )
    if magic[:4] == b"GGUF":
        return import_gguf(source)
    return load_safetensors(source)


def vector_files(folder: Path, env: str = "--vectors") -> list[Path]:
    """The vector files of a registry folder (``*.safetensors``, ``*.gguf``), by name; a
    file's stem is its name in requests. One reader for the CLI, the server and vLLM.

    Raises:
        SteerlabError: the folder is missing or cannot be listed (e.g. a loop of symbolic
            links), or a file name is not a plain name.
    """
    try:
        info = folder.stat()  # follows links: a loop of links raises here (ELOOP)
        if not stat.S_ISDIR(info.st_mode):
            raise SteerlabError(f"'{folder}' is not a folder: point {env} at a folder of vectors")
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        raise SteerlabError(
            f"vector directory '{folder}' does not exist: point {env} at a folder of vectors"
        ) from None
    except OSError as exc:
        raise SteerlabError(
            f"cannot list the vector directory '{folder}' ({exc.strerror or exc}): point {env} "
            "at a plain folder"
        ) from None
    files = []
    for path in entries:
        if path.suffix.lower() not in (".safetensors", ".gguf") or path.name.startswith("."):
            continue
        if not _NAME.match(path.stem):
            raise SteerlabError(
                f"vector file name '{path.name}' is not a plain name: rename it (letters, "
                "digits, _ . -)"
            )
        files.append(path)
    return files
