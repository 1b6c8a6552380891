from __future__ import annotations

import json

import pytest
import tiny
import torch
from helpers import SHARED

from steerlab.core.aggregators import get_aggregator, logistic, mean_diff, pca_diff
from steerlab.core.dataset import load_dataset
from steerlab.core.prompts import encode, render
from steerlab.hf.extraction import build_items, extract


@pytest.fixture(scope="module")
def ab_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ab.jsonl"
    rows = []
    for i in range(40):
        q = f"Question {i} {'x' * (i % 7)}?\n\nChoices:\n (A) yes\n (B) no"
        a, b = (" (A)", " (B)") if i % 2 else (" (B)", " (A)")
        rows.append(
            json.dumps(
                {"question": q, "answer_matching_behavior": a, "answer_not_matching_behavior": b}
            )
        )
    path.write_text("\n".join(rows) + "\n")
    return load_dataset(path)


@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [
        {
            "prompt": f"Say something {i}",
            "positive": "good " * (1 + i % 5),
            "negative": "bad day " * (1 + i % 3),
        }
        for i in range(36)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_dataset(path)


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_size_1_equals_32(arch, side, ab_dataset, pairs_dataset):
    lm = tiny.model(arch)
    for data in (ab_dataset, pairs_dataset):
        one = extract(lm, data, "all", batch_size=1)
        many = extract(lm, data, "all", batch_size=32, padding_side=side)
        for layer in one.layers:
            torch.testing.assert_close(
                many.directions[layer], one.directions[layer], atol=1e-5, rtol=1e-5
            )
            assert many.residual_norms[layer] == pytest.approx(one.residual_norms[layer], rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_shared_prefix_and_plain_batches_read_the_same_vector(arch, ab_dataset, pairs_dataset):
    """The CPU strategy (shared prompt prefix through the cache) and the accelerator one (one
    plain padded forward per batch) give the same vector."""
    lm = tiny.model(arch)
    for data in (ab_dataset, pairs_dataset):
        shared = extract(lm, data, "all", batch_size=8, share_prefix=True)
        plain = extract(lm, data, "all", batch_size=8, share_prefix=False)
        for layer in shared.layers:
            torch.testing.assert_close(
                plain.directions[layer], shared.directions[layer], atol=1e-5, rtol=1e-5
            )


def test_matches_independent_unbatched_mean_difference(ab_dataset):
    lm = tiny.model("llama")
    vec = extract(lm, ab_dataset, [0, 2], batch_size=8)
    assert vec.read_position == "answer"
    diffs = {0: [], 2: []}
    for p in ab_dataset.pairs:
        acts = []
        for completion in (p.positive, p.negative):
            ids = encode(lm.tokenizer, render(lm.tokenizer, p.prompt, assistant_prefix=completion))
            hs = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            # the letter: the character-level tokenizer puts it second to last ("(A)")
            acts.append({layer: hs[layer + 1][0, len(ids) - 2] for layer in (0, 2)})
        for layer in (0, 2):
            diffs[layer].append(acts[0][layer] - acts[1][layer])
    for layer in (0, 2):
        expected = torch.stack(diffs[layer]).mean(0)
        torch.testing.assert_close(vec.directions[layer], expected, atol=1e-5, rtol=1e-5)


def test_read_positions(ab_dataset, pairs_dataset):
    lm = tiny.model("llama")
    items, read = build_items(lm, ab_dataset)
    assert read == "answer"
    first = items[0]
    assert lm.tokenizer.decode(first.ids[first.start : first.end]) in ("A", "B")
    items, read = build_items(lm, pairs_dataset)
    assert read == "mean"
    text = lm.tokenizer.decode(items[0].ids[items[0].start : items[0].end])
    assert text == pairs_dataset.pairs[0].positive
    items, _ = build_items(lm, pairs_dataset, "last")
    assert all(it.end == len(it.ids) and it.start == it.end - 1 for it in items)


def test_deterministic_bits(pairs_dataset):
    lm = tiny.model("gpt2")
    a = extract(lm, pairs_dataset, "all", batch_size=7)
    b = extract(lm, pairs_dataset, "all", batch_size=7)
    assert all(torch.equal(a.directions[k], b.directions[k]) for k in a.layers)


def test_metadata_is_complete(pairs_dataset):
    lm = tiny.model("llama")
    v = extract(lm, pairs_dataset, "1-2", method="pca-diff")
    meta = v.metadata()
    assert meta["model"]["fingerprint"] == lm.info.fingerprint and meta["model"]["num_layers"] == 4
    assert meta["dataset"]["sha256"] == pairs_dataset.info.sha256 and meta["dataset"]["size"] == 36
    assert (
        meta["method"] == "pca-diff"
        and meta["layers"] == [1, 2]
        and meta["layer_convention"] == "block-output"
    )
    assert set(v.residual_norms) == {1, 2} and all(n > 0 for n in v.residual_norms.values())


def _planted(n=200, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    base = torch.randn(n, d, generator=gen) * 2
    strength = 1.0 + torch.rand(n, 1, generator=gen)
    noise = torch.randn(n, d, generator=gen) * 0.3
    pos = base + strength * direction + noise
    neg = base - strength * direction + torch.randn(n, d, generator=gen) * 0.3
    return pos, neg, direction


@pytest.mark.parametrize("factory", [mean_diff, pca_diff, logistic])
def test_aggregators_recover_planted_direction(factory):
    pos, neg, direction = _planted()
    got = factory()(pos, neg).float()
    cosine = torch.nn.functional.cosine_similarity(got, direction, dim=0)
    assert cosine > 0.95  # and the sign points from negative to positive


def test_unknown_method_and_unpaired_pca():
    from steerlab import SteerlabError

    with pytest.raises(SteerlabError, match="unknown method 'svm'"):
        get_aggregator("svm")
    with pytest.raises(SteerlabError, match="pca-diff needs paired data"):
        pca_diff()(torch.zeros(3, 4), torch.zeros(2, 4))


def test_unpaired_and_actadd(tmp_path):
    lm = tiny.model("llama")
    data = tmp_path / "u.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "label": lab}) + "\n"
            for t, lab in [("so happy", 1), ("great", 1), ("awful stuff", 0)]
        )
    )
    v = extract(lm, load_dataset(data), "all", method="logistic")
    assert v.read_position == "mean" and v.method == "logistic"
    act = tmp_path / "act.jsonl"
    act.write_text(json.dumps({"positive": "Love", "negative": "Hate it"}) + "\n")
    a = extract(lm, load_dataset(act, format="actadd"), [1])
    assert a.positionwise and a.rows == 7 and a.directions[1].shape == (7, 32)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is absent")
def test_real_model_shared_dataset_matches_unbatched():
    """SmolLM2 on a real A/B set: batched extraction == an independent unbatched loop."""
    from steerlab import load_model

    lm = load_model()
    data = load_dataset(
        SHARED / "datasets/model-written-evals/advanced-ai-risk/corrigible-neutral-HHH.jsonl"
    )
    data = data.subset(list(range(24)))
    vec = extract(lm, data, [6, 12], batch_size=16)
    diffs = {6: torch.zeros(576, dtype=torch.float64), 12: torch.zeros(576, dtype=torch.float64)}
    with torch.no_grad():
        for p in data.pairs:
            acts = []
            for completion in (p.positive, p.negative):
                ids = encode(
                    lm.tokenizer, render(lm.tokenizer, p.prompt, assistant_prefix=completion)
                )
                hs = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
                letter = ids.index(lm.tokenizer.convert_tokens_to_ids(completion[1]), len(ids) - 3)
                acts.append({k: hs[k + 1][0, letter].double() for k in diffs})
            for k in diffs:
                diffs[k] += acts[0][k] - acts[1][k]
    for k in diffs:
        cos = torch.nn.functional.cosine_similarity(
            vec.directions[k].double(), diffs[k] / len(data), dim=0
        )
        assert cos >= 0.9999


def test_pairs_that_share_no_first_token_read_the_same_with_prefix_sharing(llama):
    """The character tokenizer has no BOS: "good" and "bad" share no prefix to run once."""
    from steerlab.core.dataset import Dataset, Pair

    pairs = tuple(Pair(None, f"good {i}", f"bad bad {i}", i) for i in range(4))
    data = Dataset("pairs", pairs=pairs)
    shared, plain = (
        extract(llama, data, [2], read_position="last", chat=False, share_prefix=flag)
        for flag in (True, False)
    )
    torch.testing.assert_close(shared.directions[2], plain.directions[2], atol=1e-5, rtol=0)
