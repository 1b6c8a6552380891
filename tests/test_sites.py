"""Steering and reading at the attention and MLP outputs (sites), on 8 architectures."""

from __future__ import annotations

import dataclasses

import pytest
import tiny
import torch
from helpers import EQUIV_ARCHS, STEPS, prompt_ids, random_vector

from steerlab import Sampling, Steering, decode, extract, steer
from steerlab.core.dataset import Dataset, Pair
from steerlab.core.errors import SteerlabError
from steerlab.core.prompts import pad_batch
from steerlab.hf.layers import LayerMap, as_tokens, block_output
from steerlab.hf.reference import reference_generate

GREEDY = Sampling(max_new_tokens=STEPS, stop_at_eos=False)


@pytest.fixture(scope="module", params=EQUIV_ARCHS)
def arch_model(request):
    return tiny.model(request.param)


@pytest.mark.parametrize("policy", ["after-prompt", "all", "transient"])
@pytest.mark.parametrize("site", ["attn", "mlp"])
@pytest.mark.parametrize("operator", ["add", "ablate"])
def test_cached_batch_equals_uncached_reference_at_each_site(arch_model, site, policy, operator):
    lm = arch_model
    v = random_vector(lm, [1, 2], seed=8)
    s = [
        Steering(v, 4.0 if operator == "add" else 1.0, policy=policy, operator=operator, site=site)
    ]
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, lm.tokenizer.pad_token_id)
    out = decode(lm.model, ids, mask, s, GREEDY, layer_map=lm.layers, return_logits=True)
    plain = decode(lm.model, ids, mask, [], GREEDY, layer_map=lm.layers, return_logits=True)
    assert not torch.equal(out.logits, plain.logits)
    for r, seq in enumerate(seqs):
        ref_tokens, ref_logits = reference_generate(lm.model, seq, s, STEPS, lm.layers)
        assert out.tokens[r].tolist() == ref_tokens
        torch.testing.assert_close(out.logits[r], ref_logits, atol=1e-4, rtol=0)


def test_adding_at_the_mlp_output_equals_adding_at_the_block_output(arch_model):
    """What the MLP adds goes straight into the residual stream (pre-norm, post-norm and
    parallel blocks alike), so adding v there is adding v to the block's output."""
    lm = arch_model
    v = random_vector(lm, [1, 2], seed=9)
    seqs = prompt_ids(lm)
    ids, mask = pad_batch(seqs, lm.tokenizer.pad_token_id)
    runs = [
        decode(lm.model, ids, mask, [Steering(v, 3.0, site=site)], GREEDY, layer_map=lm.layers,
               return_logits=True)
        for site in ("mlp", "block")
    ]  # fmt: skip
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].logits, runs[1].logits, atol=1e-4, rtol=0)


def _site_output(lm, site: str, layer: int, seq: list[int], steering=()):
    seen = {}

    def grab(module, args, output):
        seen["out"] = as_tokens(block_output(output), 1, len(seq)).detach().clone()[0]

    with steer(lm.model, list(steering), prompt_lengths=[len(seq)], layer_map=lm.layers):
        handle = lm.layers.site(layer, site).register_forward_hook(grab)
        try:
            lm.model(input_ids=torch.tensor([seq]), use_cache=False)
        finally:
            handle.remove()
    return seen["out"]


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_ablation_at_a_site_zeroes_that_output_along_the_direction(arch_model, site):
    lm = arch_model
    s = Steering(random_vector(lm, [2], seed=3), policy="all", operator="ablate", site=site)
    seq = prompt_ids(lm)[1]
    out = _site_output(lm, site, 2, seq, [s])
    assert float((out @ s.unit(2)).abs().max()) < 1e-5
    assert float((_site_output(lm, site, 2, seq) @ s.unit(2)).abs().max()) > 1e-3


@pytest.mark.parametrize("site", ["attn", "mlp"])
def test_extraction_at_a_site_reads_that_output_and_steers_there(arch_model, site):
    lm = arch_model
    pairs = tuple(Pair(None, f"good {i}", f"bad bad {i}", i) for i in range(4))
    data = Dataset("pairs", pairs=pairs)
    vec = extract(lm, data, [2], site=site, read_position="last", chat=False)
    assert vec.layer_convention == f"{site}-output" and vec.site == site
    # the mean difference of that output at the read tokens, one sequence at a time
    from steerlab.hf.extraction import build_items

    items, _ = build_items(lm, data, "last", chat=False)
    reads = {True: [], False: []}
    for it in items:
        reads[it.positive].append(_site_output(lm, site, 2, it.ids)[it.start : it.end].mean(0))
    expected = torch.stack(reads[True]).mean(0) - torch.stack(reads[False]).mean(0)
    torch.testing.assert_close(vec.directions[2], expected, atol=1e-4, rtol=0)
    assert Steering(vec, 2.0).site == site  # steering acts where the vector was read
    assert Steering(vec, 2.0, site="block").site == "block"


def test_unknown_sites_and_block_only_formats_are_refused(llama, tmp_path):
    from steerlab.formats import export_gguf

    lm = llama
    with pytest.raises(SteerlabError, match="site must be one of block, attn, mlp"):
        Steering(random_vector(lm, [1]), site="ffn")
    other = dataclasses.replace(lm.layers, model_type="bloom")
    with pytest.raises(SteerlabError, match="site 'mlp' is not known for architecture 'bloom'"):
        other.site(1, "mlp")
    assert isinstance(lm.layers, LayerMap) and lm.layers.site(1, "block") is lm.layers.blocks[1]
    pairs = tuple(Pair(None, f"good {i}", f"bad {i}", i) for i in range(2))
    vec = extract(lm, Dataset("pairs", pairs=pairs), [1, 2], site="attn", chat=False)
    with pytest.raises(SteerlabError, match="extract it with --site block"):
        export_gguf(vec, tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    with pytest.raises(SteerlabError, match="site must be one of"):
        extract(lm, Dataset("pairs", pairs=pairs), [1], site="ffn")


def test_a_condition_is_read_at_its_vectors_site(llama):
    from steerlab import Condition
    from steerlab.hf.conditions import prompt_scores

    lm = llama
    pairs = tuple(Pair(None, f"good {i}", f"bad bad {i}", i) for i in range(4))
    vec = extract(lm, Dataset("pairs", pairs=pairs), [2], site="mlp", chat=False)
    cond = Condition(vec, 2, 0.0)
    seq = prompt_ids(lm)[1]
    want = float((_site_output(lm, "mlp", 2, seq) @ cond.unit()).mean())
    assert prompt_scores(lm.model, lm.layers, [seq], cond)[0] == pytest.approx(want, abs=1e-5)


# Written by hand from each architecture's modeling code, independently of
# steerlab.hf.layers: where the block lives, and the module whose *input* is the residual
# stream right after the attention has been added to it (None: a parallel block, whose MLP
# does not read the attention's output).
_BLOCK = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
    "phi3": "model.layers", "gemma2": "model.layers", "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers",
}  # fmt: skip
_AFTER_ATTENTION = {
    "llama": "post_attention_layernorm", "mistral": "post_attention_layernorm",
    "qwen2": "post_attention_layernorm", "phi3": "post_attention_layernorm",
    "gemma2": "pre_feedforward_layernorm", "gpt2": "ln_2", "opt": "final_layer_norm",
    "gpt_neox": None,
}  # fmt: skip


def test_the_attention_site_against_hand_arithmetic_on_the_residual_stream(arch_model):
    """Steering the attention site of block 2 adds alpha*v to the residual stream right after
    the attention, before the MLP reads it: that stream equals the unsteered one plus
    alpha*v at every position, and for a parallel block (GPT-NeoX) the block's output does."""
    lm = arch_model
    arch = lm.info.architecture
    block = lm.model
    for name in _BLOCK[arch].split("."):
        block = getattr(block, name)
    block = block[2]
    v = random_vector(lm, [2], seed=12)
    alpha = 3.0
    seq = prompt_ids(lm)[1]
    ids = torch.tensor([seq])

    def run(steering) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        handles = [
            block.register_forward_hook(
                lambda m, a, out: seen.__setitem__("out", (out[0] if isinstance(out, tuple) else out).reshape(len(seq), -1).clone())
            )
        ]  # fmt: skip
        if _AFTER_ATTENTION[arch] is not None:
            handles.append(
                getattr(block, _AFTER_ATTENTION[arch]).register_forward_pre_hook(
                    lambda m, a: seen.__setitem__("mid", a[0].reshape(len(seq), -1).clone())
                )
            )
        try:
            with torch.no_grad(), steer(lm.model, steering, prompt_lengths=[len(seq)]):
                lm.model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return seen.get("mid", seen["out"]), seen["out"]

    plain_mid, _ = run([])
    steered_mid, _ = run([Steering(v, alpha, policy="all", site="attn")])
    torch.testing.assert_close(steered_mid, plain_mid + alpha * v.directions[2], atol=1e-5, rtol=0)
    # after-prompt: only position P-1 of the prompt
    after_mid, _ = run([Steering(v, alpha, policy="after-prompt", site="attn")])
    torch.testing.assert_close(after_mid[:-1], plain_mid[:-1], atol=0, rtol=0)
    torch.testing.assert_close(
        after_mid[-1], plain_mid[-1] + alpha * v.directions[2], atol=1e-5, rtol=0
    )
