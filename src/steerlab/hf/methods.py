"""How a method makes a vector on the Hugging Face engine: aggregators read activations once
(:func:`steerlab.hf.extraction.extract`), trained methods optimise it (:data:`TRAINERS`; the
names and help are :data:`steerlab.core.methods.METHODS`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from steerlab.core.dataset import Dataset
from steerlab.core.methods import method_entry
from steerlab.core.vector import SteeringVector
from steerlab.hf.engine import LoadedModel
from steerlab.hf.extraction import extract


def sweep_extractor(lm: LoadedModel, progress: bool = False) -> Any:
    """A sweep's extractor on this model: ``(train, config, chat) -> vector``, extracted with
    ``config.method`` at ``config.layers``, or (``bipo``) trained per layer with ``config.seed``
    (see :func:`steerlab.evaluation.sweep.run_sweep`)."""

    def make(train: Dataset, config: Any, chat: bool) -> SteeringVector:
        if not method_entry(config.method).trained:
            return extract(
                lm, train, list(config.layers), method=config.method, progress=progress, chat=chat
            )
        return TRAINERS[config.method](lm, train, tuple(config.layers), config.seed, chat, progress)

    return make


def _bipo_vector(
    lm: LoadedModel, train: Dataset, layers: tuple[int, ...], seed: int, chat: bool, progress: bool
) -> SteeringVector:
    """BiPO trained at each layer, the layers' directions in one vector."""
    from steerlab.hf.bipo import BipoConfig, train_bipo

    trained = [
        train_bipo(lm, train, layer, BipoConfig(seed=seed), chat=chat, progress=progress)
        for layer in layers
    ]
    first = trained[0].vector
    return SteeringVector(
        directions={
            layer: t.vector.directions[layer] for layer, t in zip(layers, trained, strict=True)
        },
        model=first.model,
        method="bipo",
        read_position="trained",
        residual_norms={k: v for t in trained for k, v in t.vector.residual_norms.items()},
        dataset=first.dataset,
        notes={**dict(first.notes), "final_loss": [t.losses[-1] for t in trained]},
    )


#: The trained methods of :data:`steerlab.core.methods.METHODS`, by name.
TRAINERS: dict[str, Callable[..., SteeringVector]] = {"bipo": _bipo_vector}
