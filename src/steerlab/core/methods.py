"""Extraction methods by name: one registry for ``--method``'s help and its dispatch.

An *aggregator* method reads activations once and combines them
(:mod:`steerlab.core.aggregators`); a *trained* method optimises the vector
(``steerlab.hf.extraction.TRAINERS``). Adding a method is one entry here and its function.
"""

from __future__ import annotations

from dataclasses import dataclass

from steerlab.core.aggregators import AGGREGATORS
from steerlab.core.errors import SteerlabError


@dataclass(frozen=True)
class Method:
    """An extraction method: a line of help, and whether it is trained (not aggregated)."""

    summary: str
    trained: bool = False


METHODS: dict[str, Method] = {
    "mean-diff": Method("the mean of the paired differences (CAA)"),
    "pca-diff": Method("the first principal component of the paired differences (RepE)"),
    "logistic": Method("a logistic probe's direction"),
    "bipo": Method("BiPO, trained on pairs by preference optimisation (one layer)", trained=True),
}
assert all(name in METHODS for name in AGGREGATORS)


def method_help() -> str:
    """The ``--method`` help text, from the registry."""
    return "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())


def method_entry(name: str) -> Method:
    """The method ``name``.

    Raises:
        SteerlabError: an unknown name, listing the known ones.
    """
    if name not in METHODS:
        raise SteerlabError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name]
