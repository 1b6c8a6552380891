"""decode() against the plain reference of docs/design.md: every policy, 8 architectures."""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import (
    ALL_POLICIES,
    EQUIV_ARCHS,
    STEPS,
    make_steering,
    prompt_ids,
    random_vector,
)

from steerlab import Sampling, Steering, decode
from steerlab.core.policy import Policy
from steerlab.core.prompts import pad_batch
from steerlab.hf.reference import reference_generate

GREEDY = Sampling(max_new_tokens=STEPS, stop_at_eos=False)


@pytest.fixture(scope="module", params=EQUIV_ARCHS)
def arch_model(request):
    return tiny.model(request.param)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_batched_cached_equals_uncached_reference(arch_model, policy):
    """(1)+(2)+(3): left-padded cached batch == per-row full recomputation with set S."""
    lm = arch_model
    s = [make_steering(lm, policy)]
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, lm.tokenizer.pad_token_id)
    out = decode(
        lm.model,
        ids,
        mask,
        s,
        GREEDY,
        layer_map=lm.layers,
        tokenizer=lm.tokenizer,
        return_logits=True,
    )
    for r, seq in enumerate(seqs):
        ref_tokens, ref_logits = reference_generate(
            lm.model, seq, s, STEPS, lm.layers, lm.tokenizer
        )
        assert out.tokens[r].tolist() == ref_tokens
        torch.testing.assert_close(out.logits[r], ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_multiplier_zero_is_unsteered_bit_for_bit(llama, policy):
    """(5)"""
    lm = llama
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, 0)
    plain = decode(lm.model, ids, mask, [], GREEDY, layer_map=lm.layers, return_logits=True)
    zero = decode(
        lm.model,
        ids,
        mask,
        [make_steering(lm, policy, 0.0)],
        GREEDY,
        layer_map=lm.layers,
        tokenizer=lm.tokenizer,
        return_logits=True,
    )
    assert torch.equal(plain.tokens, zero.tokens)
    assert torch.equal(plain.logits, zero.logits)


def test_per_row_vectors_and_multipliers_equal_one_by_one(llama):
    lm = llama
    seqs = prompt_ids(lm)
    rows = [
        [Steering(random_vector(lm, [1], seed=5), 3.0)],
        [],
        [
            Steering(random_vector(lm, [2], seed=6), -2.0, policy=Policy("all")),
            Steering(random_vector(lm, [1], seed=7), 1.5, policy=Policy("transient")),
        ],
    ]
    ids, mask = pad_batch(seqs, 0)
    out = decode(lm.model, ids, mask, rows, GREEDY, layer_map=lm.layers, return_logits=True)
    for r, seq in enumerate(seqs):
        ref, ref_logits = reference_generate(lm.model, seq, rows[r], STEPS, lm.layers)
        assert out.tokens[r].tolist() == ref
        torch.testing.assert_close(out.logits[r], ref_logits, atol=1e-4, rtol=0)


def test_several_vectors_same_and_different_layers(llama):
    lm = llama
    s = [
        Steering(random_vector(lm, [1], seed=8), 2.0),
        Steering(random_vector(lm, [1, 3], seed=9), -1.0),
        Steering(random_vector(lm, [2], seed=10), 0.5, scale="relative"),
    ]
    seq = prompt_ids(lm)[0]
    ids, mask = pad_batch([seq], 0)
    out = decode(lm.model, ids, mask, s, GREEDY, layer_map=lm.layers)
    ref, _ = reference_generate(lm.model, seq, s, STEPS, lm.layers)
    assert out.tokens[0].tolist() == ref


def test_relative_scale_has_norm_of_multiplier_times_residual_norm(llama):
    vec = random_vector(llama, [1])
    s = Steering(vec, 0.5, scale="relative")
    assert float(s.delta(1).norm()) == pytest.approx(0.5 * vec.residual_norms[1], rel=1e-5)


def test_transient_differs_from_after_prompt_and_keeps_cache_unsteered(llama):
    lm = llama
    seq = prompt_ids(lm)[1]
    ids, mask = pad_batch([seq], 0)
    vec = random_vector(lm, [1, 2])
    t = decode(
        lm.model,
        ids,
        mask,
        [Steering(vec, 6.0, policy=Policy("transient"))],
        GREEDY,
        layer_map=lm.layers,
        track_unsteered=True,
    )
    a = decode(lm.model, ids, mask, [Steering(vec, 6.0)], GREEDY, layer_map=lm.layers)
    assert t.tokens.tolist() != a.tokens.tolist()
    assert t.kl is not None and bool((t.kl >= -1e-6).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    lm = tiny.model("llama")
    lm.model.to("cuda", dtype)
    s = make_steering(lm, "after-prompt")
    seq = prompt_ids(lm)[0]
    ids, mask = pad_batch([seq], 0)
    out = decode(lm.model, ids, mask, [s], Sampling(4, stop_at_eos=False), layer_map=lm.layers)
    assert out.tokens.shape == (1, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt"])
def test_transient_shares_the_blocks_below_its_layer(arch):
    """The cheaper loop: blocks up to the lowest transient layer run once per token, the ones
    above twice, and the numbers equal the plain two-pass loop exactly."""
    lm = tiny.model(arch)
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, 0)
    rows = [
        [Steering(random_vector(lm, [2], seed=5), 4.0, policy=Policy("transient"))],
        [Steering(random_vector(lm, [1], seed=6), 2.0)],  # persisting, in the same batch
        [
            Steering(random_vector(lm, [2, 3], seed=7), -3.0, policy=Policy("transient")),
            Steering(random_vector(lm, [1], seed=8), 1.5, policy=Policy("all")),
        ],
    ]
    calls = {0: 0, 3: 0}

    def count(i):
        def hook(module, args, output):
            calls[i] += 1

        return hook

    # A child of the block runs only when the block computes (a replayed block does not).
    handles = [next(lm.layers.blocks[i].children()).register_forward_hook(count(i)) for i in calls]
    try:
        shared = decode(lm.model, ids, mask, rows, GREEDY, layer_map=lm.layers, return_logits=True)
    finally:
        for h in handles:
            h.remove()
    plain = decode(
        lm.model, ids, mask, rows, GREEDY, layer_map=lm.layers, return_logits=True, share=False
    )
    assert torch.equal(shared.tokens, plain.tokens)
    torch.testing.assert_close(shared.logits, plain.logits, atol=1e-5, rtol=0)
    # block 0 (below layer 2) computes once per token, block 3 (above it) twice per step
    assert calls[0] <= STEPS + 2 and calls[3] >= 2 * (STEPS - 1), calls
