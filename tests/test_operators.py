"""Operators beyond add: ablate and clamp, against the plain reference, on 8 architectures."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from helpers import ALL_POLICIES, EQUIV_ARCHS, STEPS, prompt_ids, random_vector

from steerlab import Sampling, Steering, decode, steer
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy
from steerlab.core.prompts import pad_batch
from steerlab.core.vector import SteeringVector
from steerlab.hf.layers import block_output
from steerlab.hf.reference import reference_generate

GREEDY = Sampling(max_new_tokens=STEPS, stop_at_eos=False)
# Every policy an operator takes (actadd's position-wise vectors have no direction to project).
POLICIES = [p for p in ALL_POLICIES if p != "actadd"]


def ablate(lm, policy: str = "after-prompt", layers=(1, 2)) -> Steering:
    return Steering(
        random_vector(lm, [1, 2], seed=3), layers=layers, policy=policy, operator="ablate"
    )


def clamp(lm, policy: str = "after-prompt", lo: float = 0.5, hi: float = 1.5) -> Steering:
    return Steering(
        random_vector(lm, [1, 2], seed=4),
        layers=(1, 2),
        policy=policy,
        operator="clamp",
        clamp=(lo, hi),
    )


@pytest.fixture(scope="module", params=EQUIV_ARCHS)
def arch_model(request):
    return tiny.model(request.param)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("operator", ["ablate", "clamp", "ablate+add"])
def test_cached_batch_equals_uncached_reference(arch_model, operator, policy):
    lm = arch_model
    if operator == "ablate":
        s = [ablate(lm, policy)]
    elif operator == "clamp":
        s = [clamp(lm, policy, -0.25, 0.25)]
    else:  # ablate then add along another direction, at one shared layer
        s = [Steering(random_vector(lm, [1], seed=5), 4.0, policy=policy), ablate(lm, policy)]
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, lm.tokenizer.pad_token_id)
    out = decode(
        lm.model, ids, mask, s, GREEDY, layer_map=lm.layers, tokenizer=lm.tokenizer,
        return_logits=True,
    )  # fmt: skip
    for r, seq in enumerate(seqs):
        ref_tokens, ref_logits = reference_generate(
            lm.model, seq, s, STEPS, lm.layers, lm.tokenizer
        )
        assert out.tokens[r].tolist() == ref_tokens
        torch.testing.assert_close(out.logits[r], ref_logits, atol=1e-4, rtol=0)


def test_rows_with_different_operators_equal_one_by_one(llama):
    lm = llama
    rows = [
        [ablate(lm, "all")],
        [clamp(lm, "after-prompt", 2.0, 2.0)],
        [Steering(random_vector(lm, [2], seed=6), 3.0)],
    ]
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, 0)
    out = decode(lm.model, ids, mask, rows, GREEDY, layer_map=lm.layers, return_logits=True)
    for r, seq in enumerate(seqs):
        ref, ref_logits = reference_generate(lm.model, seq, rows[r], STEPS, lm.layers)
        assert out.tokens[r].tolist() == ref
        torch.testing.assert_close(out.logits[r], ref_logits, atol=1e-4, rtol=0)


def _block_io(lm, steering: Steering, seq: list[int], prompt_len: int, layer: int):
    """The block's output before and after steering, one forward over ``seq``."""
    seen: dict[str, torch.Tensor] = {}
    block = lm.layers.blocks[layer]

    def grab(name):
        def hook(module, args, output):
            seen[name] = block_output(output).detach().clone()[0]

        return hook

    before = block.register_forward_hook(grab("raw"))  # runs before steer()'s hook
    try:
        with steer(lm.model, steering, prompt_lengths=[prompt_len], layer_map=lm.layers):
            after = block.register_forward_hook(grab("steered"))
            try:
                lm.model(input_ids=torch.tensor([seq]), use_cache=False)
            finally:
                after.remove()
    finally:
        before.remove()
    return seen["raw"], seen["steered"]


@pytest.mark.parametrize("policy", ["after-prompt", "window:2-5", "prompt"])
def test_ablation_zeroes_the_projection_exactly_at_the_steered_positions(llama, policy):
    lm = llama
    s = ablate(lm, policy, layers=(1,))
    seq = prompt_ids(lm)[1]
    prompt_len = 8
    raw, out = _block_io(lm, s, seq, prompt_len, layer=1)
    u = s.unit(1)
    steered = set(s.span(prompt_len).positions(len(seq)))
    assert steered
    for t in range(len(seq)):
        if t in steered:
            assert abs(float(out[t] @ u)) < 1e-5
            change = out[t] - raw[t]  # only along u
            torch.testing.assert_close(change, (change @ u) * u, atol=1e-5, rtol=0)
        elif t < min(steered):
            assert torch.equal(out[t], raw[t])  # before the first steered token: untouched
        else:
            assert abs(float(out[t] @ u)) > 1e-4  # not projected out where not steered


@pytest.mark.parametrize(("lo", "hi"), [(-0.1, 0.1), (1.0, 3.0), (2.5, 2.5)])
def test_clamping_keeps_the_projection_in_its_range(llama, lo, hi):
    lm = llama
    s = Steering(random_vector(lm, [1], seed=4), policy="all", operator="clamp", clamp=(lo, hi))
    seq = prompt_ids(lm)[1]
    raw, out = _block_io(lm, s, seq, len(seq), layer=1)
    u = s.unit(1)
    p_raw, p_out = raw @ u, out @ u
    assert bool(((p_out >= lo - 1e-5) & (p_out <= hi + 1e-5)).all())
    inside = (p_raw >= lo) & (p_raw <= hi)
    torch.testing.assert_close(out[inside], raw[inside], atol=1e-6, rtol=0)
    torch.testing.assert_close(p_out, p_raw.clamp(lo, hi), atol=1e-5, rtol=0)


def test_ablate_then_add_sets_the_projection_to_the_added_amount(llama):
    lm = llama
    v = random_vector(lm, [1], seed=7)
    both = [Steering(v, 2.0, policy="all"), Steering(v, policy="all", operator="ablate")]
    seq = prompt_ids(lm)[0]
    _, out = _block_io(lm, both, seq, len(seq), layer=1)
    u = v.directions[1] / v.directions[1].norm()
    torch.testing.assert_close(
        out @ u, torch.full((len(seq),), 2.0 * float(v.directions[1].norm())), atol=1e-4, rtol=0
    )


def test_multiplier_zero_turns_an_operator_off_bit_for_bit(llama):
    lm = llama
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, 0)
    off = Steering(random_vector(lm, [1]), 0.0, operator="ablate")
    a = decode(lm.model, ids, mask, [off], GREEDY, layer_map=lm.layers, return_logits=True)
    b = decode(lm.model, ids, mask, [], GREEDY, layer_map=lm.layers, return_logits=True)
    assert torch.equal(a.logits, b.logits)


def _zero_vector(lm) -> SteeringVector:
    v = random_vector(lm, [1, 2])
    dirs = dict(v.directions)
    dirs[2] = torch.zeros_like(dirs[2])
    return SteeringVector(directions=dirs, model=lm.identity, method="random")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(operator="clamp", clamp=(2.0, 1.0)), "lo > hi"),
        (dict(operator="clamp", clamp=(0.0, math.inf)), "finite ends"),
        (dict(operator="clamp", clamp=(math.nan, 1.0)), "finite ends"),
        (dict(operator="clamp"), "needs clamp=(lo, hi)"),
        (dict(operator="add", clamp=(0.0, 1.0)), "needs operator 'clamp'"),
        (dict(operator="ablate", clamp=(0.0, 1.0)), "needs operator 'clamp'"),
        (dict(operator="ablate", multiplier=4.0), "multiplier applies to operator add only"),
        (dict(operator="ablate", scale="relative"), "scale relative"),
        (dict(operator="rotate"), "operator must be one of add, ablate, clamp"),
    ],
)
def test_bad_operator_settings_are_one_line_errors(llama, kwargs, message):
    with pytest.raises(
        SteerlabError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as info:
        Steering(random_vector(llama, [1]), **kwargs)
    assert "\n" not in str(info.value)


def test_ablating_or_clamping_a_zero_direction_is_refused(llama):
    v = _zero_vector(llama)
    for kwargs in (dict(operator="ablate"), dict(operator="clamp", clamp=(0.0, 1.0))):
        with pytest.raises(SteerlabError, match="non-zero direction.*layer 2"):
            Steering(v, **kwargs)
    Steering(v, operator="ablate", layers=(1,))  # layer 1 is fine
    Steering(v, 2.0)  # adding a zero vector is allowed (it adds nothing)


def test_position_wise_vectors_cannot_be_ablated(llama):
    with pytest.raises(SteerlabError, match="one direction per layer"):
        Steering(random_vector(llama, [1], rows=3), policy=Policy("actadd"), operator="ablate")


# ----- conditional steering -------------------------------------------------------------


def _condition_setup(lm):
    from steerlab import Condition
    from steerlab.hf.conditions import prompt_scores

    cond_vec = random_vector(lm, [1], seed=11)
    seqs = prompt_ids(lm)
    probe = Condition(cond_vec, 1, 0.0)
    scores = prompt_scores(lm.model, lm.layers, seqs, probe)
    assert len(set(scores)) == len(scores)
    ordered = sorted(scores)
    threshold = (ordered[0] + ordered[1]) / 2  # every prompt but the lowest-scoring one
    return Condition(cond_vec, 1, threshold), scores, threshold


def test_a_false_condition_leaves_its_row_unsteered_bit_for_bit(llama):
    lm = llama
    cond, scores, threshold = _condition_setup(lm)
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, 0)
    plain = Steering(random_vector(lm, [1, 2], seed=2), 4.0, policy="all")
    gated = Steering(plain.vector, 4.0, policy="all", condition=cond)
    out = decode(lm.model, ids, mask, [gated], GREEDY, layer_map=lm.layers, return_logits=True)
    steered = decode(lm.model, ids, mask, [plain], GREEDY, layer_map=lm.layers, return_logits=True)
    unsteered = decode(lm.model, ids, mask, [], GREEDY, layer_map=lm.layers, return_logits=True)
    for r, score in enumerate(scores):
        expected = steered if score > threshold else unsteered
        assert torch.equal(out.logits[r], expected.logits[r]), r
    assert sum(s > threshold for s in scores) == len(scores) - 1
    below = Steering(
        plain.vector, 4.0, policy="all", condition=dataclass_replace(cond, above=False)
    )
    flipped = decode(lm.model, ids, mask, [below], GREEDY, layer_map=lm.layers, return_logits=True)
    for r, score in enumerate(scores):
        expected = unsteered if score > threshold else steered
        assert torch.equal(flipped.logits[r], expected.logits[r]), r


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_condition_last_token_reads_the_last_prompt_token(llama):
    from steerlab import Condition
    from steerlab.hf.conditions import prompt_scores

    lm = llama
    cond = Condition(random_vector(lm, [1], seed=11), 1, 0.0, reduce="last")
    seq = prompt_ids(lm)[1]
    raw, _ = _block_io(lm, [], seq, len(seq), layer=1)
    assert prompt_scores(lm.model, lm.layers, [seq], cond)[0] == pytest.approx(
        float(raw[-1] @ cond.unit()), abs=1e-5
    )
    mean = prompt_scores(lm.model, lm.layers, [seq], dataclass_replace(cond, reduce="mean"))[0]
    assert mean == pytest.approx(float((raw @ cond.unit()).mean()), abs=1e-5)


def test_conditions_outside_decode_and_bad_conditions_are_refused(llama):
    from steerlab import Condition

    lm = llama
    cond = Condition(random_vector(lm, [1], seed=11), 1, 0.0)
    s = Steering(random_vector(lm, [1]), 2.0, condition=cond)
    with (
        pytest.raises(SteerlabError, match="decided from the prompt before decoding"),
        steer(lm.model, s, layer_map=lm.layers),
    ):
        pass
    with pytest.raises(SteerlabError, match="has no layer 3"):
        Condition(cond.vector, 3, 0.0)
    with pytest.raises(SteerlabError, match="finite"):
        Condition(cond.vector, 1, math.nan)
    with pytest.raises(SteerlabError, match="zero at layer 2"):
        Condition(_zero_vector(lm), 2, 0.0)
    foreign = Condition(random_vector(tiny.model("llama", hidden=48), [1]), 1, 0.0)
    with pytest.raises(SteerlabError, match="condition vector was made on"):
        Steering(random_vector(lm, [1]), 2.0, condition=foreign)


def test_fit_condition_separates_a_labelled_set(llama):
    from steerlab.core.condition import best_threshold
    from steerlab.core.dataset import Dataset, Text
    from steerlab.hf.condition_fit import fit_condition

    assert best_threshold([3.0, 4.0], [1.0, 2.0]) == (2.5, True, 1.0)
    assert best_threshold([1.0, 2.0], [3.0, 4.0]) == (2.5, False, 1.0)
    lm = llama
    texts = [Text(None, f"happy {i}", True, i) for i in range(5)]
    texts += [Text(None, f"sad sad {i}", False, 5 + i) for i in range(5)]
    fit = fit_condition(lm, Dataset("unpaired", texts=tuple(texts)), random_vector(lm, [1]), 1)
    pos, neg = fit.positive, fit.negative
    c = fit.condition
    right = sum(c.holds(x) for x in pos) + sum(not c.holds(x) for x in neg)
    assert fit.accuracy == right / 10
    # Independently: each prompt's score from the plain hidden states, and the best accuracy
    # any threshold in either direction reaches on them (brute force).
    from steerlab.core.prompts import prompt_ids as render

    def score(text: str, vector) -> float:
        ids = torch.tensor([render(lm.tokenizer, text, chat=True)])
        hidden = lm.model(ids, output_hidden_states=True).hidden_states[2][0]  # block 1
        return float((hidden @ vector.unit(1)).mean())

    def best(pos_s: list[float], neg_s: list[float]) -> float:
        cuts = sorted(pos_s + neg_s)
        candidates = (
            [cuts[0] - 1]
            + [(a + b) / 2 for a, b in zip(cuts, cuts[1:], strict=False)]
            + [cuts[-1] + 1]
        )
        return max(
            (sum(s > t for s in pos_s) + sum(s <= t for s in neg_s)) / 10 if up else
            (sum(s < t for s in pos_s) + sum(s >= t for s in neg_s)) / 10
            for t in candidates for up in (True, False)
        )  # fmt: skip

    with torch.no_grad():
        pos_s = [score(t.text, fit.condition.vector) for t in texts[:5]]
        neg_s = [score(t.text, fit.condition.vector) for t in texts[5:]]
    assert list(pos) == pytest.approx(pos_s, abs=1e-5) and list(neg) == pytest.approx(
        neg_s, abs=1e-5
    )
    assert fit.accuracy == best(pos_s, neg_s)
    # A planted direction (the classes' mean difference) separates this set perfectly.
    with torch.no_grad():

        def mean_hidden(items) -> torch.Tensor:
            rows = [
                lm.model(
                    torch.tensor([render(lm.tokenizer, t.text, chat=True)]),
                    output_hidden_states=True,
                )
                .hidden_states[2][0]
                .mean(0)
                for t in items
            ]
            return torch.stack(rows).mean(0)

        planted_dir = mean_hidden(texts[:5]) - mean_hidden(texts[5:])
    planted = random_vector(lm, [1])
    planted = dataclass_replace(planted, directions={1: planted_dir})
    sure = fit_condition(lm, Dataset("unpaired", texts=tuple(texts)), planted, 1)
    assert sure.accuracy == 1.0 and sure.condition.above and sure.auc == 1.0
