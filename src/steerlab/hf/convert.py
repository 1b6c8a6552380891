"""GGUF models: converted once into a cached Hugging Face directory, atomically.

The cache key is the file's SHA-256 and the transformers major version; the directory is
written under a temporary name and renamed, so a crash never leaves half a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from steerlab.core.errors import SteerlabError


def cache_root() -> Path:
    """The cache directory: ``$STEERLAB_CACHE`` or the user cache dir."""
    env = os.environ.get("STEERLAB_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("steerlab"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_gguf(path: Path) -> None:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise SteerlabError(
            f"'{path}' is not a GGUF file (bad magic bytes): re-download or re-convert it"
        )


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF model once into a cached safetensors + tokenizer directory.

    The cache key is the file's SHA-256 (and the transformers major version), so an
    edited file converts again. The directory
    is written under a temporary name and renamed, so a crash never leaves half a cache.

    Returns:
        The cached directory.
    """
    _check_gguf(path)
    import transformers

    # Saved tokenizers of transformers 5 do not load in 4.x: one cache per major version.
    major = transformers.__version__.split(".", 1)[0]
    target = cache_root() / "gguf" / f"{_sha256(path)[:32]}-tf{major}"
    if (target / "steerlab-converted.json").is_file():
        return target
    quiet()
    # The GGUF reader draws its own tqdm bar on stderr; steerlab shows a status instead.
    with contextlib.redirect_stderr(io.StringIO()):
        _convert_into(path, target)
    return target


def _convert_into(path: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=torch.float32
                )
        except Exception as exc:  # the GGUF reader raises many types for corrupt files
            raise SteerlabError(
                f"cannot read the GGUF model '{path}' ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'corrupt file'}): "
                "re-download it or pass another model"
            ) from None
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        # Tied weights (lm_head = embeddings) are stored once, under the first name, as
        # save_pretrained does; transformers 4.x and 5.x both re-tie them on load.
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            tensors[key] = tensor.detach().contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "steerlab-converted.json").write_text(
            json.dumps({"source": str(path), "file": path.name}, sort_keys=True)
        )
        if target.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def quiet() -> None:
    """Hide transformers' per-tensor progress bars; steerlab shows its own status."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
