"""The steering vector: an immutable, self-describing value.

Its metadata schema lives here (:meth:`SteeringVector.metadata`, :func:`from_metadata`);
the files that carry it are :mod:`steerlab.formats`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property
from types import MappingProxyType
from typing import Any, Literal

import torch

from steerlab._version import __version__
from steerlab.core.errors import SteerlabError

FORMAT_VERSION = 1
LAYER_CONVENTION = "block-output"  # layer l = output of decoder block l = hidden_states[l + 1]
# Where in block l a vector was read: the block's output, or what its attention or its MLP
# adds to the residual stream (docs/design.md, "Sites").
Site = Literal["block", "attn", "mlp"]
SITES: tuple[Site, ...] = ("block", "attn", "mlp")
SITE_CONVENTIONS: dict[str, str] = {
    "block": "block-output",
    "attn": "attn-output",
    "mlp": "mlp-output",
}


def _version() -> str:
    return __version__


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a vector was made on."""

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        for key in ("name", "architecture"):
            if not isinstance(getattr(self, key), str):
                raise SteerlabError(f"model {key} must be a string, got {getattr(self, key)!r}")
        for key in ("hidden_size", "num_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SteerlabError(
                    f"model {key} must be a positive integer, got {value!r} "
                    f"({type(value).__name__})"
                )
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise SteerlabError(f"model fingerprint must be a string, got {self.fingerprint!r}")


@dataclass(frozen=True)
class DatasetInfo:
    """Which data a vector was made from."""

    path: str
    sha256: str
    size: int
    format: str


@dataclass(frozen=True)
class SteeringVector:
    """Per-layer steering directions plus what they are and where they came from.

    A direction is ``[d]`` for an ordinary vector or ``[k, d]`` for a position-wise
    (ActAdd) vector whose row ``i`` is added at prompt position ``i``. Every operation
    returns a new object; tensors are cloned on the way in and kept on the CPU in float32.

    Attributes:
        directions: layer index -> tensor.
        model: identity of the model the vector belongs to.
        method: how it was made (``mean-diff``, ``pca-diff``, ``logistic``, ``actadd``,
            ``imported``, or an arithmetic expression).
        read_position: ``answer``, ``last``, ``mean`` or ``all`` (ActAdd).
        residual_norms: layer -> mean residual-stream norm of the read activations.
        dataset: the extraction data, if any.
        layer_convention: where in block ``l`` the vector was read: ``block-output`` (the
            default: ``hidden_states[l + 1]``), ``attn-output`` or ``mlp-output``.
        steerlab_version: the version that made it.
        created: ISO-8601 UTC time of creation.
        notes: free-form extra metadata (e.g. number of pairs).
    """

    directions: Mapping[int, torch.Tensor]
    model: ModelIdentity
    method: str = "mean-diff"
    read_position: str = "answer"
    residual_norms: Mapping[int, float] = field(default_factory=dict)
    dataset: DatasetInfo | None = None
    layer_convention: str = LAYER_CONVENTION
    steerlab_version: str = field(default_factory=_version)
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    notes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise SteerlabError("directions is empty: a steering vector needs at least one layer")
        if self.layer_convention not in SITE_CONVENTIONS.values():
            raise SteerlabError(
                f"unknown layer convention {self.layer_convention!r}: this steerlab reads "
                f"{', '.join(SITE_CONVENTIONS.values())}"
            )
        clean: dict[int, torch.Tensor] = {}
        shape: tuple[int, ...] | None = None
        for layer in sorted(self.directions):
            tensor = self.directions[layer]
            if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
                raise SteerlabError(f"direction for layer {layer} must be a [d] or [k, d] tensor")
            if not tensor.is_floating_point():
                raise SteerlabError(
                    f"direction for layer {layer} holds {str(tensor.dtype).removeprefix('torch.')}"
                    " values: a steering vector is floating point"
                )
            if tensor.numel() == 0:
                raise SteerlabError(f"direction for layer {layer} is empty ({list(tensor.shape)})")
            if tensor.shape[-1] != self.model.hidden_size:
                raise SteerlabError(
                    f"direction for layer {layer} has width {tensor.shape[-1]}, but the model's "
                    f"hidden size is {self.model.hidden_size}"
                )
            if not 0 <= int(layer) < self.model.num_layers:
                raise SteerlabError(
                    f"layer {layer} is outside 0..{self.model.num_layers - 1} for this model"
                )
            if shape is not None and tuple(tensor.shape) != shape:
                raise SteerlabError("all layers of a vector must have the same shape")
            shape = tuple(tensor.shape)
            if not torch.isfinite(tensor).all():
                raise SteerlabError(f"direction for layer {layer} contains NaN or infinity")
            clean[int(layer)] = tensor.detach().to("cpu", torch.float32).clone()
        object.__setattr__(self, "directions", MappingProxyType(clean))
        object.__setattr__(
            self,
            "residual_norms",
            MappingProxyType({int(k): float(v) for k, v in self.residual_norms.items()}),
        )
        object.__setattr__(self, "notes", MappingProxyType(dict(self.notes)))

    # ----- shape -------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """The layers this vector has, ascending."""
        return list(self.directions)

    @property
    def site(self) -> Site:
        """The site its layer convention names (``block``, ``attn`` or ``mlp``)."""
        return next(s for s in SITES if SITE_CONVENTIONS[s] == self.layer_convention)

    def unit(self, layer: int) -> torch.Tensor:
        """The float32 unit direction at ``layer`` (flattened for a position-wise vector).

        Raises:
            SteerlabError: the vector is zero there.
        """
        direction = self.directions[layer].float().reshape(-1)
        norm = float(direction.norm())
        if norm == 0.0:
            raise SteerlabError(f"the vector is zero at layer {layer}: it has no direction")
        return direction / norm

    def peaks(self, layers: Sequence[int]) -> torch.Tensor:
        """The largest ``|entry|`` of the direction at each of ``layers`` (float32,
        ``[len(layers)]``): a multiple of the direction overflows a dtype exactly when this
        entry's multiple does, since the directions are finite and rounding is monotonic."""
        return torch.tensor([self._peaks[layer] for layer in layers], dtype=torch.float32)

    @cached_property
    def _peaks(self) -> dict[int, float]:
        # computed once per vector: steerings check overflow on every request they serve
        return {layer: float(d.abs().max()) for layer, d in self.directions.items()}

    @property
    def positionwise(self) -> bool:
        """True for a ``[k, d]`` ActAdd vector."""
        return next(iter(self.directions.values())).dim() == 2

    @property
    def rows(self) -> int:
        """k for a position-wise vector, 1 otherwise."""
        first = next(iter(self.directions.values()))
        return int(first.shape[0]) if first.dim() == 2 else 1

    def norms(self) -> dict[int, float]:
        """Frobenius norm of each layer's direction."""
        return {layer: float(t.norm()) for layer, t in self.directions.items()}

    # ----- arithmetic (each returns a new vector) ------------------------------------------
    def _with(self, directions: Mapping[int, torch.Tensor], method: str) -> SteeringVector:
        return replace(self, directions=dict(directions), method=method)

    def scale(self, factor: float) -> SteeringVector:
        """Every direction multiplied by ``factor``."""
        if not math.isfinite(factor):
            raise SteerlabError(f"scale factor must be finite, got {factor}")
        return self._with({k: v * factor for k, v in self.directions.items()}, self.method)

    def __mul__(self, factor: float) -> SteeringVector:
        return self.scale(float(factor))

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self.scale(-1.0)

    def _combine(self, other: SteeringVector, sign: float, symbol: str) -> SteeringVector:
        if (self.model.hidden_size, self.model.num_layers) != (
            other.model.hidden_size,
            other.model.num_layers,
        ):
            raise SteerlabError("cannot combine vectors made for models of different shapes")
        if self.positionwise != other.positionwise or (
            self.positionwise and self.rows != other.rows
        ):
            raise SteerlabError("cannot combine a position-wise vector with a different shape")
        out: dict[int, torch.Tensor] = {}
        for layer in sorted(set(self.directions) | set(other.directions)):
            a = self.directions.get(layer)
            b = other.directions.get(layer)
            if a is None:
                assert b is not None
                out[layer] = sign * b
            elif b is None:
                out[layer] = a
            else:
                out[layer] = a + sign * b
        return self._with(out, f"({self.method} {symbol} {other.method})")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0, "-")

    def normalize(self) -> SteeringVector:
        """Each layer's direction scaled to unit norm (zero directions stay zero)."""
        out = {k: v / v.norm() if float(v.norm()) > 0 else v for k, v in self.directions.items()}
        return self._with(out, self.method)

    def select(self, layers: Iterable[int]) -> SteeringVector:
        """Only the given layers.

        Raises:
            SteerlabError: a requested layer is not in the vector.
        """
        chosen = list(layers)
        missing = [layer for layer in chosen if layer not in self.directions]
        if missing:
            raise SteerlabError(
                f"the vector has no layer {missing[0]}: it has layers {_span(self.layers)}"
            )
        return replace(
            self,
            directions={k: self.directions[k] for k in chosen},
            residual_norms={k: v for k, v in self.residual_norms.items() if k in chosen},
        )

    def tiled(self, rows: int) -> SteeringVector:
        """A position-wise copy with every direction repeated ``rows`` times (for ``actadd``)."""
        if self.positionwise:
            raise SteerlabError("the vector is position-wise already")
        if rows < 1:
            raise SteerlabError(f"rows must be at least 1, got {rows}")
        tiles = {k: v.unsqueeze(0).repeat(rows, 1) for k, v in self.directions.items()}
        return replace(self, directions=tiles, method=f"{self.method} x{rows} rows")

    # ----- compatibility ------------------------------------------------------------------
    def check_model(self, model: ModelIdentity, allow_mismatch: bool = False) -> list[str]:
        """Check that this vector fits ``model``.

        Returns:
            Warnings (e.g. an unknown fingerprint); empty when everything matches.

        Raises:
            SteerlabError: a different hidden size or layer count, or a different model of
                the same shape without ``allow_mismatch``.
        """
        mine = self.model
        if mine.hidden_size != model.hidden_size:
            raise SteerlabError(
                f"the vector is for hidden size {mine.hidden_size} ({mine.name}), but the "
                f"model has {model.hidden_size}: extract a vector for this model"
            )
        if max(self.layers) >= model.num_layers or (
            mine.fingerprint is not None and mine.num_layers != model.num_layers
        ):
            raise SteerlabError(
                f"the vector is for a {mine.num_layers}-layer model ({mine.name}), but this "
                f"model has {model.num_layers} layers: extract a vector for this model"
            )
        if mine.fingerprint is None:
            return [f"the vector does not record its model's weights (made for {mine.name})"]
        if mine.fingerprint != model.fingerprint:
            if not allow_mismatch:
                raise SteerlabError(
                    f"the vector was made on another model ({mine.name}, fingerprint "
                    f"{mine.fingerprint}) of the same shape: pass --allow-model-mismatch "
                    "(Python: allow_mismatch=True) to transfer it"
                )
            return [f"transferring a vector made on {mine.name} to {model.name}"]
        return []

    # ----- files --------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready data."""
        return {
            "format_version": FORMAT_VERSION,
            "model": vars(self.model).copy(),
            "method": self.method,
            "read_position": self.read_position,
            "residual_norms": {str(k): v for k, v in self.residual_norms.items()},
            "dataset": None if self.dataset is None else vars(self.dataset).copy(),
            "layer_convention": self.layer_convention,
            "steerlab_version": self.steerlab_version,
            "created": self.created,
            "notes": dict(self.notes),
            "layers": self.layers,
            "shape": list(next(iter(self.directions.values())).shape),
        }


def _span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(x) for x in layers)


def from_metadata(
    directions: Mapping[int, torch.Tensor], meta: Mapping[str, Any]
) -> SteeringVector:
    """A vector from its tensors and the metadata written by :meth:`SteeringVector.metadata`.

    Raises:
        SteerlabError: metadata with missing keys or values of the wrong type.
    """
    try:
        if not isinstance(meta, Mapping):
            raise TypeError("the metadata is not a JSON object")
        dataset = meta.get("dataset")
        norms = meta.get("residual_norms") or {}
        notes = meta.get("notes") or {}
        if not isinstance(norms, Mapping) or not isinstance(notes, Mapping):
            raise TypeError("residual_norms and notes must be objects")
        return SteeringVector(
            directions=directions,
            model=ModelIdentity(**meta["model"]),
            method=str(meta["method"]),
            read_position=str(meta["read_position"]),
            residual_norms={int(k): float(v) for k, v in norms.items()},
            dataset=None if dataset is None else DatasetInfo(**dataset),
            layer_convention=str(meta.get("layer_convention", LAYER_CONVENTION)),
            steerlab_version=str(meta["steerlab_version"]),
            created=str(meta["created"]),
            notes=notes,
        )
    except SteerlabError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise SteerlabError(
            f"broken steerlab metadata ({what[:120]}): re-extract or re-export the vector"
        ) from None
