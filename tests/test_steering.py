"""The contract of ../shared/DESIGN.md: every policy against its plain reference."""

from __future__ import annotations

import threading

import pytest
import tiny
import torch
from helpers import random_vector

from steerlab import Sampling, Steering, SteerlabError, decode, steer
from steerlab.core.policy import Policy
from steerlab.core.prompts import pad_batch
from steerlab.hf.layers import block_output
from steerlab.hf.reference import reference_generate

EQUIV_ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2", "gemma2", "opt", "phi3", "mistral"]
PERSISTING = ["all", "after-prompt", "from-marker:h", "prompt", "actadd"]
ALL_POLICIES = [*PERSISTING, "transient"]
PROMPTS = ["hello there", "a much longer prompt here, with more", "hi"]
STEPS = 16
GREEDY = Sampling(max_new_tokens=STEPS, stop_at_eos=False)


def _steering(lm, policy: str, multiplier: float = 4.0) -> Steering:
    if policy == "actadd":
        return Steering(random_vector(lm, [1], rows=3), multiplier, policy=Policy.parse(policy))
    return Steering(random_vector(lm, [1, 2]), multiplier, policy=Policy.parse(policy))


def _ids(lm, prompts=PROMPTS):
    return [lm.tokenizer(p)["input_ids"] for p in prompts]


@pytest.fixture(scope="module", params=EQUIV_ARCHS)
def arch_model(request):
    return tiny.model(request.param)


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_batched_cached_equals_uncached_reference(arch_model, policy):
    """(1)+(2)+(3): left-padded cached batch == per-row full recomputation with set S."""
    lm = arch_model
    s = [_steering(lm, policy)]
    seqs = _ids(lm)
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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("policy", PERSISTING)
def test_hf_generate_with_cache_equals_reference(arch, policy):
    """steer() around the model's own generate(): cached == uncached recomputation."""
    lm = tiny.model(arch)
    s = _steering(lm, policy)
    seq = _ids(lm)[0]
    with steer(lm.model, s, tokenizer=lm.tokenizer):
        gen = lm.model.generate(
            torch.tensor([seq]),
            attention_mask=torch.ones(1, len(seq), dtype=torch.long),
            max_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
        )
    ref, _ = reference_generate(lm.model, seq, [s], STEPS, lm.layers, lm.tokenizer)
    assert gen[0, len(seq) :].tolist() == ref


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_generate_left_padded_batch_equals_one_by_one(arch):
    lm = tiny.model(arch)
    s = _steering(lm, "after-prompt")
    seqs = _ids(lm)
    ids, mask = pad_batch(seqs, 0)
    with steer(lm.model, s):
        gen = lm.model.generate(
            ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0
        )
    for r, seq in enumerate(seqs):
        ref, _ = reference_generate(lm.model, seq, [s], STEPS, lm.layers)
        assert gen[r, ids.shape[1] :].tolist() == ref


def test_after_prompt_equals_steering_newest_token(llama):
    """(4) With a cache, after-prompt is the same intervention as 'steer the newest token'."""
    lm = llama
    s = _steering(lm, "after-prompt")
    seq = _ids(lm)[0]
    delta = {layer: s.delta(layer) for layer in s.layers}
    handles = []

    def make(layer):
        def hook(module, args, output):
            h = block_output(output).clone()
            h[:, -1] += delta[layer]
            return output.__class__((h, *output[1:])) if isinstance(output, tuple) else h

        return hook

    try:
        for layer in s.layers:
            handles.append(lm.layers.blocks[layer].register_forward_hook(make(layer)))
        newest = lm.model.generate(
            torch.tensor([seq]), max_new_tokens=STEPS, do_sample=False, pad_token_id=0
        )
    finally:
        for h in handles:
            h.remove()
    with steer(lm.model, s):
        ours = lm.model.generate(
            torch.tensor([seq]), max_new_tokens=STEPS, do_sample=False, pad_token_id=0
        )
    assert ours.tolist() == newest.tolist()


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_multiplier_zero_is_unsteered_bit_for_bit(llama, policy):
    """(5)"""
    lm = llama
    seqs = _ids(lm)
    ids, mask = pad_batch(seqs, 0)
    plain = decode(lm.model, ids, mask, [], GREEDY, layer_map=lm.layers, return_logits=True)
    zero = decode(
        lm.model,
        ids,
        mask,
        [_steering(lm, policy, 0.0)],
        GREEDY,
        layer_map=lm.layers,
        tokenizer=lm.tokenizer,
        return_logits=True,
    )
    assert torch.equal(plain.tokens, zero.tokens)
    assert torch.equal(plain.logits, zero.logits)


def test_generated_tokens_stay_steered_with_cache(llama):
    """(6) The steering-vectors bug (#60): with a KV cache the generated tokens were no longer
    steered, because the hook compared against the current call's length (1 token)."""
    lm = llama
    s = _steering(lm, "after-prompt", 6.0)
    seq = _ids(lm)[0]
    seen: list[torch.Tensor] = []
    with steer(lm.model, s) as st:

        def spy(module, args, output):
            seen.append(st._forward["coef"].clone())

        h = lm.layers.blocks[1].register_forward_hook(spy)
        try:
            lm.model.generate(
                torch.tensor([seq]), max_new_tokens=6, do_sample=False, pad_token_id=0
            )
        finally:
            h.remove()
    assert len(seen) == 6
    assert seen[0][0, :, 0].tolist() == [0.0] * (len(seq) - 1) + [1.0]  # only P-1 in the prefill
    for step in seen[1:]:
        assert step.shape[1] == 1 and bool(step.all())  # every cached step is steered
    # and it matters: prompt-only steering differs from after-prompt on the generated tokens
    ref_after, _ = reference_generate(lm.model, seq, [s], STEPS, lm.layers)
    ref_prompt, _ = reference_generate(
        lm.model, seq, [_steering(lm, "prompt", 6.0)], STEPS, lm.layers
    )
    assert ref_after != ref_prompt


def test_patched_layer_is_original_plus_alpha_v_and_others_unchanged(llama):
    lm = llama
    vec = random_vector(lm, [1])
    ids = torch.tensor([_ids(lm)[0]])
    plain = lm.model(ids, output_hidden_states=True).hidden_states
    captured = {}

    def grab(layer):
        def hook(module, args, output):
            captured[layer] = block_output(output).clone()

        return hook

    with steer(lm.model, vec, multiplier=2.5, policy="all"):
        hs = [lm.layers.blocks[i].register_forward_hook(grab(i)) for i in range(4)]
        try:
            # hooks registered after steer's run after it: they see the steered output of block 1
            lm.model(ids)
        finally:
            for h in hs:
                h.remove()
    torch.testing.assert_close(captured[1], plain[2] + 2.5 * vec.directions[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(captured[0], plain[1], atol=0, rtol=0)


def test_no_hooks_remain_after_exception_and_midway_failure(llama, monkeypatch):
    lm = llama
    vec = random_vector(lm, [0, 1, 2, 3])

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())

    before = count()
    with pytest.raises(RuntimeError), steer(lm.model, vec, policy="all"):
        assert count() == before + 5
        raise RuntimeError("boom")
    assert count() == before
    # a failure halfway through registration (third block) leaves nothing behind
    block = lm.layers.blocks[2]
    original = block.register_forward_hook

    def broken(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(block, "register_forward_hook", broken)
    with pytest.raises(KeyboardInterrupt), steer(lm.model, vec, policy="all"):
        pass
    monkeypatch.setattr(block, "register_forward_hook", original)
    assert count() == before


def test_sequential_calls_do_not_interfere(llama):
    lm = llama
    ids = torch.tensor([_ids(lm)[0]])
    a, b = random_vector(lm, [1], seed=1), random_vector(lm, [1], seed=2)
    with steer(lm.model, a, policy="all"):
        la = lm.model(ids).logits
    with steer(lm.model, b, policy="all"):
        lb = lm.model(ids).logits
    with steer(lm.model, a, policy="all"):
        la2 = lm.model(ids).logits
    plain = lm.model(ids).logits
    assert torch.equal(la, la2) and not torch.equal(la, lb) and not torch.equal(la, plain)


def test_two_threads_with_different_vectors_do_not_interfere(llama):
    lm = llama
    ids = torch.tensor([_ids(lm)[1]])
    vecs = [random_vector(lm, [1, 2], seed=s) for s in (3, 4)]
    expected = []
    for v in vecs:
        with steer(lm.model, v, policy="all"):
            expected.append(lm.model(ids).logits)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        for _ in range(20):
            with steer(lm.model, vecs[i], policy="all"):
                results[i].append(lm.model(ids).logits)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        for got in results[i]:
            torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=0)


def test_per_row_vectors_and_multipliers_equal_one_by_one(llama):
    lm = llama
    seqs = _ids(lm)
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
    seq = _ids(lm)[0]
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
    seq = _ids(lm)[1]
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


def test_sampling_and_beam_search_run_under_steer(llama):
    lm = llama
    s = _steering(lm, "after-prompt")
    ids = torch.tensor([_ids(lm)[0]])
    with steer(lm.model, s):
        sampled = lm.model.generate(ids, max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0)
        beams = lm.model.generate(
            ids, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0
        )
    assert sampled.shape[1] > ids.shape[1] and beams.shape[1] > ids.shape[1]
    seeded = [
        decode(
            lm.model,
            ids,
            torch.ones_like(ids),
            [s],
            Sampling(8, temperature=0.8, seed=3, stop_at_eos=False),
            layer_map=lm.layers,
        ).tokens
        for _ in range(2)
    ]
    assert torch.equal(seeded[0], seeded[1])


def test_invalid_combinations_are_one_line_errors(llama):
    lm = llama
    vec = random_vector(lm, [1])
    with pytest.raises(SteerlabError, match="position-wise"):
        Steering(vec, 1.0, policy=Policy("actadd"))
    with pytest.raises(SteerlabError, match="has no layer 3"):
        Steering(vec, 1.0, layers=(3,))
    with pytest.raises(SteerlabError, match="transient"), steer(lm.model, vec, policy="transient"):
        pass
    with pytest.raises(SteerlabError, match="unknown policy"):
        Policy.parse("sometimes")
    with (
        pytest.raises(SteerlabError, match="does not occur"),
        steer(lm.model, vec, policy="from-marker:QQQ", tokenizer=lm.tokenizer),
    ):
        lm.model(torch.tensor([_ids(lm)[0]]))
    with pytest.raises(SteerlabError, match="finite"):
        Steering(vec, float("nan"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision(dtype):
    lm = tiny.model("llama")
    lm.model.to("cuda", dtype)
    s = _steering(lm, "after-prompt")
    seq = _ids(lm)[0]
    ids, mask = pad_batch([seq], 0)
    out = decode(lm.model, ids, mask, [s], Sampling(4, stop_at_eos=False), layer_map=lm.layers)
    assert out.tokens.shape == (1, 4)
