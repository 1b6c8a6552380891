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

from steerlab import Sampling, Steering, decode, steer
from steerlab.core.policy import Policy
from steerlab.core.prompts import pad_batch
from steerlab.hf.layers import block_output
from steerlab.hf.reference import reference_generate, reference_logits

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
def test_multiplier_zero_is_unsteered_bit_for_bit(arch_model, policy):
    """(5) on every architecture"""
    lm = arch_model
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
    """Transient steering: every step's logits equal recomputing the whole sequence with only
    the newest position steered (so every earlier position's keys and values in the cache
    are the unsteered ones), its KL and unsteered log-probabilities equal the plain
    reference's, and it is not after-prompt."""
    lm = llama
    seq = prompt_ids(lm)[1]
    ids, mask = pad_batch([seq], 0)
    vec = random_vector(lm, [1, 2])
    transient = [Steering(vec, 6.0, policy=Policy("transient"))]
    t = decode(
        lm.model, ids, mask, transient, GREEDY, layer_map=lm.layers, track_unsteered=True,
        return_logits=True,
    )  # fmt: skip
    a = decode(lm.model, ids, mask, [Steering(vec, 6.0)], GREEDY, layer_map=lm.layers)
    assert t.tokens.tolist() != a.tokens.tolist()
    tokens = t.tokens[0].tolist()
    assert t.kl is not None and t.unsteered_logprobs is not None and t.logits is not None
    for step in range(STEPS):
        prefix = seq + tokens[:step]
        # steered: only the newest position; the cache a persisting steering would have
        # changed (every earlier position) is recomputed unsteered here
        steered = reference_logits(lm.model, prefix, len(seq), transient, lm.layers)[-1]
        plain = reference_logits(lm.model, prefix, len(seq), [], lm.layers)[-1]
        torch.testing.assert_close(t.logits[0, step], steered, atol=1e-4, rtol=0)
        logp, logq = torch.log_softmax(steered, -1), torch.log_softmax(plain, -1)
        kl = float((logp.exp() * (logp - logq)).sum())
        assert abs(float(t.kl[0, step]) - kl) < 1e-4, (step, float(t.kl[0, step]), kl)
        assert abs(float(t.unsteered_logprobs[0, step]) - float(logq[tokens[step]])) < 1e-4
    assert float(t.kl[0].max()) > 1e-3  # the steering changed something to compare


@pytest.mark.parametrize("side", ["left", "right"])
def test_half_precision_adds_exactly_v_and_leaves_other_rows_alone(side):
    """bfloat16 on the CPU: the steered block output is the plain one plus the vector cast to
    bfloat16, bit for bit, at real tokens only (left or right padding); an unsteered row in
    the same batch is bit-identical to an unsteered batch; greedy decoding runs."""
    lm = tiny.model("llama")
    lm.model.to(torch.bfloat16)
    seqs = prompt_ids(lm)[:2]
    ids, mask = pad_batch(seqs, 0, side=side)
    vec = random_vector(lm, [1])
    rows = [[Steering(vec, 3.0, policy=Policy("all"))], []]
    captured: list[torch.Tensor] = []

    def record(module, args, output) -> None:
        captured.append(block_output(output).detach().clone())

    with torch.no_grad():
        handle = lm.layers.blocks[1].register_forward_hook(record)
        try:
            lm.model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
        with steer(lm.model, per_row=rows):
            # registered after steer()'s hook, so it sees the steered output
            handle = lm.layers.blocks[1].register_forward_hook(record)
            try:
                lm.model(input_ids=ids, attention_mask=mask)
            finally:
                handle.remove()
    plain, steered = captured
    delta = (3.0 * vec.directions[1]).to(torch.bfloat16)
    real = mask[0].bool()
    assert steered.dtype == torch.bfloat16
    assert torch.equal(steered[0, real], plain[0, real] + delta)
    assert torch.equal(steered[0, ~real], plain[0, ~real])  # padding is never steered
    assert torch.equal(steered[1], plain[1])
    ids, mask = pad_batch(seqs, 0)  # decoding takes left-padded prompts
    out = decode(
        lm.model, ids, mask, [[Steering(vec, 3.0)], []], Sampling(4, stop_at_eos=False),
        layer_map=lm.layers,
    )  # fmt: skip
    alone = decode(
        lm.model, ids, mask, [[], []], Sampling(4, stop_at_eos=False), layer_map=lm.layers
    )
    assert torch.equal(out.tokens[1], alone.tokens[1])


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


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_shared_prompts_and_shadow_equal_the_reference(arch_model, policy):
    """share_prompts (each distinct prompt prefilled once) and the chunked unsteered shadow:
    tokens, logits, KL and unsteered log-probabilities equal the plain reference, with rows
    that share a prompt, unsteered rows, and rows that stop early (EOS) while others go on."""
    lm = arch_model
    seqs = prompt_ids(lm)
    rows_seqs = [seqs[0], seqs[1], seqs[0], seqs[2], seqs[1], seqs[0]]
    s = make_steering(lm, policy)
    rows = [[s], [s], [], [s.with_multiplier(-3.0)], [], [s.with_multiplier(2.0)]]
    ids, mask = pad_batch(rows_seqs, lm.tokenizer.pad_token_id)
    first = decode(lm.model, ids, mask, rows, GREEDY, layer_map=lm.layers, tokenizer=lm.tokenizer)
    row0 = first.tokens[0].tolist()
    stop = next((k for k in range(2, STEPS) if row0[k] not in row0[:k]), 0)
    eos = row0[stop]  # row 0 stops after stop + 1 tokens, others whenever they meet it
    stopping = Sampling(max_new_tokens=STEPS, stop_at_eos=True)
    out = decode(
        lm.model, ids, mask, rows, stopping, layer_map=lm.layers, tokenizer=lm.tokenizer,
        eos_token_id=eos, return_logits=True, track_unsteered=True, share_prompts=True,
    )  # fmt: skip
    assert out.kl is not None and out.unsteered_logprobs is not None
    assert out.lengths[0] == stop + 1 and len(set(out.lengths)) > 1
    for r, seq in enumerate(rows_seqs):
        n = out.lengths[r]
        ref_tokens, ref_logits = reference_generate(
            lm.model, seq, rows[r], STEPS, lm.layers, lm.tokenizer
        )
        assert out.tokens[r, :n].tolist() == ref_tokens[:n]
        torch.testing.assert_close(out.logits[r, :n], ref_logits[:n], atol=1e-4, rtol=0)
        full = seq + ref_tokens[: n - 1]
        plain = reference_logits(lm.model, full, len(seq), [], lm.layers)[len(seq) - 1 :]
        logq = torch.log_softmax(plain.float(), -1)
        logp = torch.log_softmax(ref_logits[:n].float(), -1)
        picked = torch.tensor(ref_tokens[:n])[:, None]
        torch.testing.assert_close(
            out.unsteered_logprobs[r, :n], logq.gather(-1, picked).squeeze(-1), atol=1e-4, rtol=0
        )
        kl = (logp.exp() * (logp - logq)).sum(-1)
        torch.testing.assert_close(out.kl[r, :n], kl, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("policy", "shared"), [("after-prompt", True), ("all", False)])
def test_shared_prompts_prefill_each_distinct_prompt_once(llama, policy, shared):
    lm = llama
    seqs = prompt_ids(lm)
    rows_seqs = [q for _ in range(4) for q in seqs]
    s = make_steering(lm, policy)
    ids, mask = pad_batch(rows_seqs, lm.tokenizer.pad_token_id)
    shapes: list[tuple[int, ...]] = []
    handle = lm.layers.base.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        decode(lm.model, ids, mask, [s], GREEDY, layer_map=lm.layers, share_prompts=True)
    finally:
        handle.remove()
    width = ids.shape[1]
    assert shapes[0] == ((len(seqs), width - 1) if shared else (len(rows_seqs), width))
    assert shapes[1] == ((len(rows_seqs), 1) if shared else (len(rows_seqs), 1))
