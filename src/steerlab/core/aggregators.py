"""Aggregators: turn positive and negative activations at one layer into a direction.

Each is a small callable ``(pos [N, d], neg [M, d]) -> [d]`` made by a factory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from steerlab.core.errors import SteerlabError

Aggregator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mean_diff() -> Aggregator:
    """CAA: ``mean(pos) - mean(neg)``."""

    def aggregate(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return pos.double().mean(0) - neg.double().mean(0)

    return aggregate


def _project_mean(direction: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``u`` scaled by the mean difference's component along it (sign and size like CAA)."""
    unit = direction / direction.norm()
    md = pos.double().mean(0) - neg.double().mean(0)
    return unit * torch.dot(md, unit)


def pca_diff() -> Aggregator:
    """RepE/repeng: first principal component of the paired differences.

    The component is taken around zero (the differences and their negations), its sign
    aligned with the mean difference and its length the mean difference's projection.
    """

    def aggregate(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        if pos.shape != neg.shape:
            raise SteerlabError("pca-diff needs paired data: use mean-diff or logistic")
        diffs = pos.double() - neg.double()  # [N, d]
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        return _project_mean(vh[0], pos, neg)

    return aggregate


def logistic(l2: float = 1e-3, steps: int = 200) -> Aggregator:
    """A logistic-regression probe's weight direction (positive = label 1).

    Args:
        l2: ridge penalty on the weights, relative to the data's scale.
        steps: L-BFGS iterations.
    """

    def aggregate(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pos, neg]).double()  # [N + M, d]
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
        center = x.mean(0)
        scale = (x - center).std().clamp_min(1e-12)
        z = (x - center) / scale
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
            loss = loss + l2 * (w * w).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        with torch.enable_grad():
            opt.step(closure)  # type: ignore[no-untyped-call]
        direction = w.detach()
        if float(direction.norm()) == 0.0:
            raise SteerlabError(
                "the logistic probe found no direction: the classes are not separable"
            )
        return _project_mean(direction, pos, neg)

    return aggregate


AGGREGATORS: dict[str, Callable[[], Aggregator]] = {
    "mean-diff": mean_diff,
    "pca-diff": pca_diff,
    "logistic": logistic,
}


def get_aggregator(name: str) -> Aggregator:
    """The aggregator called ``name``.

    Raises:
        SteerlabError: an unknown name.
    """
    if name not in AGGREGATORS:
        raise SteerlabError(f"unknown method '{name}': use one of {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name]()
