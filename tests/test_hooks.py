"""steer(): hooks around the model's own generate(), their lifetime and isolation."""

from __future__ import annotations

import threading

import pytest
import tiny
import torch
from helpers import (
    EQUIV_ARCHS,
    PERSISTING,
    STEPS,
    make_steering,
    prompt_ids,
    random_vector,
    run_threads,
)

from steerlab import Sampling, Steering, SteerlabError, decode, steer
from steerlab.core.policy import Policy
from steerlab.core.prompts import pad_batch
from steerlab.hf.layers import block_output
from steerlab.hf.reference import reference_generate

GREEDY = Sampling(max_new_tokens=STEPS, stop_at_eos=False)


@pytest.fixture(scope="module", params=EQUIV_ARCHS)
def arch_model(request):
    return tiny.model(request.param)


@pytest.mark.parametrize("policy", PERSISTING)
def test_hf_generate_padded_per_row_batch_equals_reference(arch_model, policy):
    """steer(per_row=...) around the model's own generate() on a left-padded batch of three
    prompts of different lengths: each row (steered by the policy, unsteered, steered by
    another vector and multiplier) equals its own uncached recomputation."""
    lm = arch_model
    s = make_steering(lm, policy)
    other = Steering(random_vector(lm, [2], seed=9), -3.0, policy=Policy("all"))
    rows = [[s], [], [s.with_multiplier(-2.0), other]]
    seqs = prompt_ids(lm)
    assert len({len(q) for q in seqs}) == 3  # the batch is really padded
    pad = lm.tokenizer.pad_token_id
    ids, mask = pad_batch(seqs, pad)
    with steer(lm.model, per_row=rows, tokenizer=lm.tokenizer):
        gen = lm.model.generate(
            ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=pad
        )
    for r, seq in enumerate(seqs):
        ref, _ = reference_generate(lm.model, seq, rows[r], STEPS, lm.layers, lm.tokenizer)
        assert gen[r, ids.shape[1] :].tolist() == ref, r


def test_after_prompt_equals_steering_newest_token(arch_model):
    """(4) With a cache, after-prompt is the same intervention as 'steer the newest token'."""
    lm = arch_model
    s = make_steering(lm, "after-prompt")
    seq = prompt_ids(lm)[0]
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


def test_generated_tokens_stay_steered_with_cache(arch_model):
    """(6) The steering-vectors bug (#60): with a KV cache the generated tokens were no longer
    steered, because the hook compared against the current call's length (1 token)."""
    lm = arch_model
    s = make_steering(lm, "after-prompt", 6.0)
    seq = prompt_ids(lm)[0]
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
        lm.model, seq, [make_steering(lm, "prompt", 6.0)], STEPS, lm.layers
    )
    assert ref_after != ref_prompt


def test_patched_layer_is_original_plus_alpha_v_and_others_unchanged(llama):
    lm = llama
    vec = random_vector(lm, [1])
    ids = torch.tensor([prompt_ids(lm)[0]])
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
    ids = torch.tensor([prompt_ids(lm)[0]])
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
    ids = torch.tensor([prompt_ids(lm)[1]])
    vecs = [random_vector(lm, [1, 2], seed=s) for s in (3, 4)]
    expected = []
    for v in vecs:
        with steer(lm.model, v, policy="all"):
            expected.append(lm.model(ids).logits)
    barrier = threading.Barrier(2)

    def work(i: int) -> list[torch.Tensor]:
        barrier.wait()
        got = []
        for _ in range(20):
            with steer(lm.model, vecs[i], policy="all"):
                got.append(lm.model(ids).logits)
        return got

    results = run_threads([(work, 0), (work, 1)])  # a worker's exception fails the test here
    for i in (0, 1):
        assert len(results[i]) == 20
        for got in results[i]:
            torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=0)


def _newest_token_hooks(lm, steerings: dict[int, torch.Tensor]):
    """Independent of steer(): add a row's delta at the newest position of every forward
    (``steerings`` maps a batch row to its [d] delta at layer 1; other rows get nothing)."""

    def hook(module, args, output):
        h = block_output(output).clone()
        for row, delta in steerings.items():
            h[row, -1] += delta
        return output.__class__((h, *output[1:])) if isinstance(output, tuple) else h

    return lm.layers.blocks[1].register_forward_hook(hook)


def test_sampling_under_steer_equals_an_independent_newest_token_hook(llama):
    """Sampling with a seed under steer(after-prompt) draws the same tokens as the same
    seeded sampling with a hand-written hook that adds v at the newest position."""
    lm = llama
    vec = random_vector(lm, [1], seed=4)
    ids = torch.tensor([prompt_ids(lm)[0]])
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0)
    torch.manual_seed(7)
    with steer(lm.model, vec, multiplier=6.0, layers=[1]):
        ours = lm.model.generate(ids, **kwargs)
    handle = _newest_token_hooks(lm, {0: 6.0 * vec.directions[1]})
    try:
        torch.manual_seed(7)
        theirs = lm.model.generate(ids, **kwargs)
    finally:
        handle.remove()
    torch.manual_seed(7)
    plain = lm.model.generate(ids, **kwargs)
    assert ours.tolist() == theirs.tolist() and ours.tolist() != plain.tolist()
    seeded = [
        decode(
            lm.model, ids, torch.ones_like(ids), [Steering(vec, 6.0)],
            Sampling(8, temperature=0.8, seed=3, stop_at_eos=False), layer_map=lm.layers,
        ).tokens
        for _ in range(2)
    ]  # fmt: skip
    assert torch.equal(seeded[0], seeded[1])


def test_beam_search_maps_each_beam_to_its_source_row(llama):
    """Beam search with num_return_sequences repeats each row num_beams times; with per-row
    steering every beam must carry its own row's vector: each row's returned sequences equal
    that row searched alone, and the two rows' steerings are not swapped."""
    lm = llama
    a, b = random_vector(lm, [1], seed=4), random_vector(lm, [1], seed=5)
    rows = [[Steering(a, 6.0)], [Steering(b, -6.0)]]
    seqs = [lm.tokenizer(p)["input_ids"] for p in ("hello there", "good night!")]
    assert len(seqs[0]) == len(seqs[1])  # no padding: the mapping is what is tested
    kwargs = dict(
        max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0
    )
    with steer(lm.model, per_row=rows):
        together = lm.model.generate(torch.tensor(seqs), **kwargs)
    assert together.shape[0] == 4
    for r, seq in enumerate(seqs):
        with steer(lm.model, rows[r]):
            alone = lm.model.generate(torch.tensor([seq]), **kwargs)
        assert together[2 * r : 2 * r + 2].tolist() == alone.tolist(), r
    with steer(lm.model, per_row=rows[::-1]):
        swapped = lm.model.generate(torch.tensor(seqs), **kwargs)
    assert swapped.tolist() != together.tolist()


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
        lm.model(torch.tensor([prompt_ids(lm)[0]]))
    with pytest.raises(SteerlabError, match="finite"):
        Steering(vec, float("nan"))


def test_a_thread_started_inside_steer_is_steered(llama):
    """The Hugging Face streaming pattern: Thread(target=model.generate) + TextIteratorStreamer."""
    from transformers import TextIteratorStreamer

    lm = llama
    s = make_steering(lm, "after-prompt", 6.0)
    ids = torch.tensor([prompt_ids(lm)[0]])
    kwargs = dict(max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    with steer(lm.model, s):
        same_thread = lm.model.generate(ids, **kwargs)
    plain = lm.model.generate(ids, **kwargs)
    assert not torch.equal(same_thread, plain)
    streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True)
    result = {}
    with steer(lm.model, s):
        worker = threading.Thread(
            target=lambda: result.setdefault(
                "ids", lm.model.generate(ids, streamer=streamer, **kwargs)
            )
        )
        worker.start()
        text = "".join(streamer)
        worker.join()
    assert torch.equal(result["ids"], same_thread)
    assert text == lm.tokenizer.decode(same_thread[0, ids.shape[1] :])


def test_no_steering_keeps_a_concurrent_thread_unsteered(llama):
    from steerlab import no_steering

    lm = llama
    ids = torch.tensor([prompt_ids(lm)[0]])
    plain = lm.model(ids).logits
    got = {}
    with steer(lm.model, random_vector(lm, [1]), policy="all"):

        def work():
            with no_steering():
                got["logits"] = lm.model(ids).logits

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    assert torch.equal(got["logits"], plain)
