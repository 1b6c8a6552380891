"""BiPO: a trained steering vector (frozen model, one layer), on a tiny model."""

from __future__ import annotations

import pytest
import torch

from steerlab.core.dataset import Dataset, Pair
from steerlab.core.errors import SteerlabError
from steerlab.core.steering import Steering
from steerlab.hf.bipo import BipoConfig, pair_logprobs, train_bipo
from steerlab.hf.extraction import build_items
from steerlab.hf.hooks import steer

PAIRS = tuple(
    Pair(f"q{i}", "yes yes", "no no", i) for i in range(6)
)  # the same answers everywhere: an easy direction
DATA = Dataset("pairs", pairs=PAIRS)


def _pairs(lm):
    items, _ = build_items(lm, DATA, "mean", chat=False)
    return [(p.ids, n.ids, p.start) for p, n in zip(items[::2], items[1::2], strict=True)]


def _margin(lm, steering) -> float:
    """Mean (log p(positive) - log p(negative)) over the pairs, under ``steering``."""
    with torch.no_grad(), steer(lm.model, steering, layer_map=lm.layers):
        lp = pair_logprobs(lm.model, _pairs(lm), torch.device("cpu"))
    return float((lp[:, 0] - lp[:, 1]).mean())


def test_bipo_learns_a_direction_that_works_both_ways(llama):
    lm = llama
    params = [p.detach().clone() for p in lm.model.parameters()]
    result = train_bipo(lm, DATA, 2, BipoConfig(steps=60, lr=0.05, batch_size=4), chat=False)
    assert all(torch.equal(a, b) for a, b in zip(params, lm.model.parameters(), strict=True))
    assert all(p.requires_grad for p in lm.model.parameters())  # restored
    losses = result.losses
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    v = result.vector
    assert v.layers == [2] and v.method == "bipo" and v.notes["steps"] == 60
    base = _margin(lm, [])
    up = _margin(lm, [Steering(v, 1.0, policy="all")])
    down = _margin(lm, [Steering(v, -1.0, policy="all")])
    assert down < base < up


def test_bipo_is_reproducible_from_its_seed(llama):
    config = BipoConfig(steps=5, lr=0.05, batch_size=2, seed=3)
    a, b = (train_bipo(llama, DATA, 1, config, chat=False) for _ in range(2))
    assert torch.equal(a.vector.directions[1], b.vector.directions[1]) and a.losses == b.losses
    other = train_bipo(
        llama, DATA, 1, BipoConfig(steps=5, lr=0.05, batch_size=2, seed=4), chat=False
    )
    assert not torch.equal(a.vector.directions[1], other.vector.directions[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=0.0), "learning rate must be a positive"),
        (dict(lr=-1.0), "learning rate must be a positive"),
        (dict(lr=float("nan")), "learning rate must be a positive"),
        (dict(steps=0), "at least 1 step"),
        (dict(beta=0.0), "beta must be a positive"),
        (dict(batch_size=0), "batch size must be at least 1"),
    ],
)
def test_bad_bipo_settings_are_refused(kwargs, message):
    with pytest.raises(SteerlabError, match=message):
        BipoConfig(**kwargs)


def test_bipo_needs_two_pairs_and_a_real_layer(llama):
    with pytest.raises(SteerlabError, match="at least 2 pairs, got 1"):
        train_bipo(llama, Dataset("pairs", pairs=PAIRS[:1]), 1)
    with pytest.raises(SteerlabError, match="layer 9 does not exist"):
        train_bipo(llama, DATA, 9)
    with pytest.raises(SteerlabError, match="this is a unpaired set"):
        train_bipo(llama, Dataset("unpaired"), 1)


def test_pair_logprobs_equal_one_sequence_at_a_time(llama):
    pairs = [([5, 6, 7, 8, 9, 10], [5, 6, 7, 20, 21], 3), ([11, 12, 13], [11, 12, 14, 15], 2)]
    got = pair_logprobs(llama.model, pairs, torch.device("cpu"))
    for i, (pos, neg, start) in enumerate(pairs):
        for k, seq in enumerate((pos, neg)):
            logits = llama.model(input_ids=torch.tensor([seq])).logits[0].float().detach()
            logp = torch.log_softmax(logits, -1)
            want = sum(float(logp[t - 1, seq[t]]) for t in range(start, len(seq)))
            assert float(got[i, k]) == pytest.approx(want, abs=1e-4)
