"""steerlab: activation steering with exact position policies, evaluation and serving.

Where things live (docs/design.md, "Layout"):

* :mod:`steerlab.core`: engine-independent: vectors, policies (:mod:`steerlab.core.policy`
  owns which positions each policy steers), the steering math (:mod:`steerlab.core.plan`),
  datasets, aggregators, prompt rendering, the engine seam.
* :mod:`steerlab.formats`: vector files (safetensors, llama.cpp GGUF), atomic writes.
* :mod:`steerlab.hf`: the Hugging Face engine: loading, layer discovery, the steering hooks
  (:mod:`steerlab.hf.hooks`), decoding incl. ``transient`` (:mod:`steerlab.hf.decoding`),
  extraction and the plain reference.
* :mod:`steerlab.evaluation` and :mod:`steerlab.serving` above them; :mod:`steerlab.cli` on top.

Importing ``steerlab`` loads neither the server (fastapi, uvicorn) nor matplotlib.
"""

from __future__ import annotations

from steerlab._version import __version__
from steerlab.core.condition import Condition
from steerlab.core.dataset import Dataset, load_dataset
from steerlab.core.decoded import Decoded
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy, Span
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.core.vector import DatasetInfo, ModelIdentity, SteeringVector
from steerlab.formats import export_gguf, import_gguf, load_vector, save_vector
from steerlab.hf.decoding import decode
from steerlab.hf.engine import generate
from steerlab.hf.extraction import extract
from steerlab.hf.hooks import no_steering, steer
from steerlab.hf.layers import LayerMap, find_layers, resolve_layers
from steerlab.hf.model import LoadedModel, ModelInfo, describe, load_model

__all__ = [
    "Condition",
    "Dataset",
    "DatasetInfo",
    "Decoded",
    "LayerMap",
    "LoadedModel",
    "ModelIdentity",
    "ModelInfo",
    "Policy",
    "Sampling",
    "Span",
    "Steering",
    "SteeringVector",
    "SteerlabError",
    "__version__",
    "decode",
    "describe",
    "export_gguf",
    "extract",
    "find_layers",
    "generate",
    "import_gguf",
    "load_dataset",
    "load_model",
    "load_vector",
    "no_steering",
    "resolve_layers",
    "save_vector",
    "steer",
]
