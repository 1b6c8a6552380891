"""The vector registry of a vLLM deployment: loaded once per process, the same everywhere.

Every vLLM process (API server, engine core, workers) loads ``$STEERLAB_VECTORS`` once,
when the plugin registers, and never again: a file added later is unknown to all of them
(a 400 at the API), never known to one and not to another. The registry's digest (names and
file contents) is stamped on each request by the API process; the engine core refuses a
request stamped with another digest (the folder changed between the processes' starts),
and each engine checks at start that every worker holds the same digest. Vectors are checked
against the served model (hidden size, layer count, and the weights' fingerprint unless
``STEERLAB_ALLOW_MODEL_MISMATCH=1``), so a vector made for another model stops the server
at start, as ``steerlab serve`` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlab.core.errors import SteerlabError
from steerlab.core.vector import ModelIdentity, SteeringVector

log = logging.getLogger("steerlab.vllm")
ENV_VECTORS = "STEERLAB_VECTORS"
ENV_ALLOW_MISMATCH = "STEERLAB_ALLOW_MODEL_MISMATCH"


@dataclass
class Registry:
    """The vectors of one deployment by name, and a digest of exactly what was loaded."""

    vectors: dict[str, SteeringVector]
    digest: str
    folder: str | None = None
    checked: set[str] = field(default_factory=set)  # models already checked against

    @property
    def names(self) -> dict[int, str]:
        """id(vector) -> its name (steerings refer to the registry's own objects)."""
        return {id(v): k for k, v in self.vectors.items()}

    def check_model(self, identity: ModelIdentity, checkpoint: Path | None) -> None:
        """Refuse vectors that do not fit the served model (once per model per process).

        Raises:
            SteerlabError: naming the file and the fix.
        """
        key = f"{identity.name}|{identity.hidden_size}|{identity.num_layers}"
        if key in self.checked or not self.vectors:
            return
        allow = os.environ.get(ENV_ALLOW_MISMATCH) == "1"
        if checkpoint is not None and any(v.model.fingerprint for v in self.vectors.values()):
            from steerlab.hf.model import checkpoint_fingerprint

            try:
                identity = ModelIdentity(
                    identity.name,
                    identity.architecture,
                    identity.hidden_size,
                    identity.num_layers,
                    checkpoint_fingerprint(checkpoint),
                )
            except (SteerlabError, OSError, KeyError, ValueError) as exc:
                log.warning("steerlab: cannot fingerprint the served weights (%s)", exc)
        for name, vector in sorted(self.vectors.items()):
            try:
                warnings = vector.check_model(identity, allow_mismatch=allow)
            except SteerlabError as exc:
                message = str(exc).replace("--allow-model-mismatch", f"{ENV_ALLOW_MISMATCH}=1")
                raise SteerlabError(f"${ENV_VECTORS}: {name}: {message}") from None
            for warning in warnings:
                log.warning("steerlab: %s: %s", name, warning)
        self.checked.add(key)


def load(folder: str | None) -> Registry:
    """Every ``*.safetensors`` / ``*.gguf`` vector in ``folder`` (None: an empty registry).

    Raises:
        SteerlabError: a folder that cannot be listed (missing, a loop of links), or a file
            name that is not a plain name; an unreadable vector file is skipped with a
            warning, as ``steerlab serve`` does.
    """
    if not folder:
        return Registry({}, hashlib.sha256(b"").hexdigest()[:16])
    from steerlab.formats import load_vector, vector_files

    digest = hashlib.sha256()
    vectors: dict[str, SteeringVector] = {}
    for path in vector_files(Path(folder), env=ENV_VECTORS):
        try:
            data = path.read_bytes()
            vector = load_vector(path)
        except (SteerlabError, OSError) as exc:
            log.warning("steerlab: skipping %s: %s", path.name, str(exc).splitlines()[0])
            continue
        digest.update(path.stem.encode() + b"\0" + hashlib.sha256(data).digest())
        vectors[path.stem] = vector
    return Registry(vectors, digest.hexdigest()[:16], folder)


_registry: Registry | None = None


def registry() -> Registry:
    """This process's registry, loaded once from ``$STEERLAB_VECTORS``."""
    global _registry
    if _registry is None:
        _registry = load(os.environ.get(ENV_VECTORS))
    return _registry


def reset(value: Registry | None = None) -> None:
    """Forget this process's registry (tests, and an engine started in-process with its own
    folder) or set it."""
    global _registry
    _registry = value


def served_identity(model_config: Any) -> tuple[ModelIdentity, Path | None]:
    """The served model's identity from vLLM's model config, and its checkpoint folder."""
    hf = model_config.hf_config
    text = getattr(hf, "get_text_config", lambda: hf)()
    folder = Path(str(model_config.model))
    identity = ModelIdentity(
        name=str(getattr(model_config, "served_model_name", None) or model_config.model),
        architecture=str(getattr(text, "model_type", "unknown")),
        hidden_size=int(text.hidden_size),
        num_layers=int(text.num_hidden_layers),
    )
    return identity, folder if folder.is_dir() else None
