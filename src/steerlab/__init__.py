"""steerlab: activation steering with exact position policies, evaluation and serving.

Where steering happens: :mod:`steerlab.steering` (the ``steer()`` context manager and its
hooks) and :mod:`steerlab.generation` (the decoding loop, including ``transient``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from steerlab.errors import SteerlabError
from steerlab.generation import Decoded, Sampling, decode, generate
from steerlab.layers import LayerMap, find_layers, resolve_layers
from steerlab.model import LoadedModel, ModelInfo, describe, load_model
from steerlab.policy import Policy
from steerlab.steering import Steerer, Steering, steer
from steerlab.vector import DatasetInfo, ModelIdentity, SteeringVector

__all__ = [
    "DatasetInfo",
    "Decoded",
    "LayerMap",
    "LoadedModel",
    "ModelIdentity",
    "ModelInfo",
    "Policy",
    "Sampling",
    "Steerer",
    "Steering",
    "SteeringVector",
    "SteerlabError",
    "__version__",
    "decode",
    "describe",
    "find_layers",
    "generate",
    "load_model",
    "resolve_layers",
    "steer",
]
