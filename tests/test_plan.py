"""The engine-independent steering core, on flattened tokens as an engine like vLLM has them."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import make_steering, random_vector

from steerlab import Steering
from steerlab.core.plan import SteeringPlan
from steerlab.core.policy import Policy


def _flat(lengths: list[int], done: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and positions of one mixed step: row r contributes positions done[r]..lengths[r]-1."""
    rows, positions = [], []
    for r, (n, start) in enumerate(zip(lengths, done, strict=True)):
        rows += [r] * (n - start)
        positions += list(range(start, n))
    return torch.tensor(rows), torch.tensor(positions)


@pytest.mark.parametrize(
    "policy", ["all", "after-prompt", "prompt", "window:1-3", "window:0-", "transient"]
)
def test_coefficients_on_flat_tokens_equal_the_policy_span(llama, policy):
    """For every token of a chunked-prefill + decode step, C says exactly what the span says."""
    rng = random.Random(0)
    steerings = [[make_steering(llama, policy)], [], [make_steering(llama, policy, -2.0)]]
    plan = SteeringPlan(steerings)
    prompts = [5, 3, 8]
    bounds = plan.bounds(prompts)
    for _ in range(20):
        lengths = [p + rng.randrange(0, 6) for p in prompts]  # tokens so far, prompt included
        done = [rng.randrange(0, n) for n in lengths]  # already in the cache
        row, t = _flat(lengths, done)
        newest = torch.tensor(
            [bool(i + 1 == len(t) or row[i + 1] != row[i]) for i in range(len(t))]
        )
        for logits_pass in (False, True):
            coef = plan.coefficients(
                bounds, row, t, torch.ones_like(t, dtype=torch.bool), newest, logits_pass
            )
            for i in range(len(t)):
                r, pos = int(row[i]), int(t[i])
                for a, s in enumerate(plan.apps):
                    owners = plan.app_rows[a]
                    mine = owners is not None and r in owners
                    span = s.span(prompts[r])
                    if span.newest_only:
                        want = mine and logits_pass and bool(newest[i]) and pos >= span.lo
                    else:
                        want = mine and span.lo <= pos < span.hi
                    assert bool(coef[i, a]) == want, (policy, r, pos, a)


def test_delta_is_c_times_w_and_zero_rows_get_nothing(llama):
    a, b = random_vector(llama, [1], seed=1), random_vector(llama, [1], seed=2)
    plan = SteeringPlan([[Steering(a, 2.0, policy=Policy("all"))], [], [Steering(b, -1.0)]])
    bounds = plan.bounds([3, 3, 3])
    row = torch.tensor([0, 0, 1, 2, 2])
    t = torch.tensor([0, 2, 1, 1, 2])
    coef = plan.coefficients(bounds, row, t, torch.ones(5, dtype=torch.bool))
    hidden = torch.zeros(5, llama.info.hidden_size)
    delta = plan.delta(1, coef.to(hidden.dtype), t, hidden, all_on=False)
    assert delta is not None
    torch.testing.assert_close(delta[0], 2.0 * a.directions[1])
    torch.testing.assert_close(delta[1], 2.0 * a.directions[1])
    assert torch.equal(delta[2], torch.zeros_like(delta[2]))  # the unsteered row
    assert torch.equal(delta[3], torch.zeros_like(delta[3]))  # t=1 < P-1=2: not yet steered
    torch.testing.assert_close(delta[4], -1.0 * b.directions[1])
    assert plan.delta(0, coef.to(hidden.dtype), t, hidden, all_on=False) is None


def test_multiplier_zero_is_dropped_and_layers_are_collected(llama):
    plan = SteeringPlan([make_steering(llama, "all", 0.0), make_steering(llama, "prompt")])
    assert len(plan.apps) == 1 and plan.layers == [1, 2] and plan.num_rows is None
    assert not plan.transient and plan.persisting


def test_one_steering_on_several_rows_is_one_column(llama):
    s, other = make_steering(llama, "all", 2.0), make_steering(llama, "all", -1.0)
    plan = SteeringPlan([[s], [], [s, other], [s]])
    assert plan.app_rows == [(0, 2, 3), (2,)]
    uniform = SteeringPlan([[s], [s], [s]])
    assert uniform.app_rows == [None] and uniform.num_rows == 3
    twice = SteeringPlan([[s, s], [s]])  # the same steering twice in a row adds twice
    assert twice.app_rows == [(0,), (0, 1)]
    bounds = uniform.bounds([3, 4, 5])
    row, t = torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4])
    coef = uniform.coefficients(bounds, row, t, torch.ones(3, dtype=torch.bool))
    hidden = torch.zeros(3, llama.info.hidden_size)
    delta = uniform.delta(1, coef.to(hidden.dtype), t, hidden, all_on=bool(coef.all()))
    assert delta is not None and delta.shape == (llama.info.hidden_size,)  # a broadcast add
    torch.testing.assert_close(delta, s.delta(1))
