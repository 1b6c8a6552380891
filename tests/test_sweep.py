"""Sweeps: batched cells equal the per-cell loop, intervals, honest selection, direction,
the policy and context axes, and steerability."""

from __future__ import annotations

import json

import pytest
import tiny

from steerlab import Sampling, Steering, SteerlabError
from steerlab.core.dataset import load_dataset
from steerlab.core.policy import Policy
from steerlab.evaluation import stats
from steerlab.evaluation.judges import keywords
from steerlab.evaluation.metrics import (
    NEUTRAL_TEXT,
    behaviour_probability,
    judged_generation,
    text_perplexity,
)
from steerlab.evaluation.sweep import SweepConfig, neutral_prompts, run_sweep
from steerlab.evaluation.sweep_report import halves, recommend
from steerlab.formats import load_vector
from steerlab.hf.methods import sweep_extractor

PROMPTS = ("the cat", "a dog ran", "hello there friend", "rain", "sun and sea", "ok")
JUDGE = keywords(["e", "a"])


@pytest.fixture(scope="module")
def lm():
    return tiny.model("llama")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {"prompt": f"Question {i}", "positive": "yes good fine", "negative": "no bad awful"}
        for i in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ab") / "ab.jsonl"
    rows = [
        {
            "question": f"Item {i}?\n\nChoices:\n (A) one\n (B) two",
            "answer_matching_behavior": " (A)" if i % 3 else " (B)",
            "answer_not_matching_behavior": " (B)" if i % 3 else " (A)",
        }
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_batched_free_text_cells_equal_the_per_cell_loop(lm, pairs_file, tmp_path):
    data = load_dataset(pairs_file)
    config = SweepConfig(
        layers=(1, 2),
        multipliers=(-4.0, 0.0, 4.0),
        policies=("after-prompt", "all"),
        prompts=PROMPTS,
        max_new_tokens=8,
        batch_rows=40,  # several batches of whole cells
    )
    result = run_sweep(lm, data, config, tmp_path / "s", extractor=sweep_extractor(lm), judge=JUDGE)
    rows = result["rows"]
    assert len(rows) == 2 * 3 * 2
    vector = load_vector(tmp_path / "s" / "vector.safetensors")
    sampling = Sampling(max_new_tokens=8)
    for row in rows:
        m = row["multiplier"]
        steering = (
            [] if m == 0 else [Steering(vector, m, (row["layer"],), Policy.parse(row["policy"]))]
        )
        alone = judged_generation(lm, list(PROMPTS), steering, JUDGE, sampling)
        assert row["example"] == alone.texts[0]
        assert row["behaviour"] == pytest.approx(alone.behaviour, abs=1e-6)
        assert row["fluency"] == pytest.approx(alone.perplexity, rel=1e-6)
        assert row["kl"] == pytest.approx(alone.kl, abs=1e-6)
        assert row["neutral_perplexity"] == pytest.approx(alone.neutral_perplexity, rel=1e-6)
        assert row["behaviour_lo"] <= row["behaviour"] <= row["behaviour_hi"]


def test_batched_ab_cells_equal_the_per_cell_loop(lm, ab_file, tmp_path):
    data = load_dataset(ab_file)
    config = SweepConfig(layers=(1, 3), multipliers=(-2.0, 0.0, 2.0), test_fraction=0.5)
    result = run_sweep(lm, data, config, tmp_path / "ab", extractor=sweep_extractor(lm))
    vector = load_vector(tmp_path / "ab" / "vector.safetensors")
    from steerlab.evaluation.sweep import split

    _, test = split(data, config.test_fraction, config.seed)
    for row in result["rows"]:
        m = row["multiplier"]
        steering = [] if m == 0 else [Steering(vector, m, (row["layer"],))]
        alone = behaviour_probability(lm, test, steering)
        assert row["items"] == pytest.approx(list(alone.scores), abs=1e-6)
        assert row["fluency"] == pytest.approx(
            text_perplexity(lm, NEUTRAL_TEXT, steering), rel=1e-6
        )
    report = (tmp_path / "ab" / "report.md").read_text()
    assert "## Steerability (Tan et al. 2024)" in report and "anti-steerable" in report


def test_the_recommendation_is_chosen_on_one_half_and_reported_on_the_other(
    lm, pairs_file, tmp_path
):
    data = load_dataset(pairs_file)
    config = SweepConfig(
        layers=(1, 2),
        multipliers=(-4.0, 0.0, 4.0),
        prompts=PROMPTS,
        max_new_tokens=8,
        perplexity_bound=1e6,  # a random model: every cell is disfluent
    )
    result = run_sweep(lm, data, config, tmp_path / "h", extractor=sweep_extractor(lm), judge=JUDGE)
    best = result["recommendation"]
    assert best is not None
    sel, rep = halves(len(PROMPTS), config.seed)
    assert set(sel).isdisjoint(rep) and len(sel) + len(rep) == len(PROMPTS)
    row = next(
        r for r in result["rows"]
        if (r["layer"], r["multiplier"], r["policy"]) == (best["layer"], best["multiplier"], best["policy"])
    )  # fmt: skip
    base = next(r for r in result["rows"] if r["multiplier"] == 0)
    assert best["behaviour"] == pytest.approx(stats.mean([row["items"][i] for i in rep]))
    assert best["shift"] == pytest.approx(
        stats.mean([row["items"][i] - base["items"][i] for i in rep])
    )
    assert best["shift_lo"] <= best["shift"] <= best["shift_hi"]
    assert best["report_items"] == len(rep) and best["selection_items"] == len(sel)
    text = (tmp_path / "h" / "report.md").read_text()
    assert (
        "chosen on the selection half" in text and "report prompts (not used to choose it)" in text
    )
    assert "neighbours" in text
    saved = json.loads((tmp_path / "h" / "recommendation.json").read_text())
    assert (saved["layer"], saved["multiplier"]) == (best["layer"], best["multiplier"])


def _rows(values, fluencies=None):
    """Rows with per-item scores at each multiplier (0: the baseline)."""
    out = []
    for m, items in values.items():
        out.append({
            "layer": 1, "multiplier": m, "policy": "after-prompt", "context": "chat",
            "behaviour": stats.mean(items), "fluency": (fluencies or {}).get(m, 1.0),
            "items": items,
        })  # fmt: skip
    return out


def test_direction_decrease_and_target_pick_the_right_cells():
    values = {
        0.0: [0.5] * 8,
        1.0: [0.7] * 8,
        2.0: [0.9] * 8,
        -1.0: [0.3] * 8,
        -2.0: [0.1] * 8,
    }
    rows = _rows(values, {-2.0: 9.0})  # x-2 is too disfluent
    up = recommend(rows, SweepConfig(layers=(1,), multipliers=(0.0,)))
    down = recommend(rows, SweepConfig(layers=(1,), multipliers=(0.0,), direction="decrease"))
    near = recommend(rows, SweepConfig(layers=(1,), multipliers=(0.0,), target=0.65))
    assert (up["multiplier"], down["multiplier"], near["multiplier"]) == (2.0, -1.0, 1.0)
    assert down["shift"] == pytest.approx(-0.2)


def test_neighbours_that_cannot_be_told_apart_are_named():
    noisy = [0.9, 0.1, 0.8, 0.2, 0.9, 0.1, 0.85, 0.15, 0.9, 0.1, 0.8, 0.2]
    rows = _rows({0.0: [0.5] * 12, 1.0: noisy, 2.0: noisy[::-1]})  # same mean, other items
    best = recommend(rows, SweepConfig(layers=(1,), multipliers=(0.0,)))
    assert best["ties"] and "layer 1 x" in best["ties"][0]
    clear = _rows({0.0: [0.5] * 12, 1.0: [0.9] * 12, 2.0: [0.6] * 12})
    assert recommend(clear, SweepConfig(layers=(1,), multipliers=(0.0,)))["ties"] == []


def test_policy_and_context_axes_extract_once_per_context(lm, pairs_file, tmp_path):
    data = load_dataset(pairs_file)
    config = SweepConfig(
        layers=(1,), multipliers=(0.0, 4.0), policies=("after-prompt", "all"),
        contexts=("chat", "raw"), prompts=PROMPTS[:2], max_new_tokens=4,
    )  # fmt: skip
    out = tmp_path / "axes"
    result = run_sweep(lm, data, config, out, extractor=sweep_extractor(lm), judge=JUDGE)
    keys = {(r["context"], r["policy"], r["multiplier"]) for r in result["rows"]}
    assert len(keys) == 2 * 2 * 2
    chat, raw = load_vector(out / "vector.safetensors"), load_vector(out / "vector-raw.safetensors")
    assert chat.notes["chat"] is True and raw.notes["chat"] is False
    assert not chat.directions[1].equal(raw.directions[1])
    calls = []
    run_sweep(
        lm, data, config, out, extractor=sweep_extractor(lm), judge=JUDGE, on_row=calls.append
    )  # resumes: nothing to do
    assert calls == []


def test_stats_intervals_and_steerability():
    lo, hi = stats.bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=1)
    assert 1.0 <= lo < 2.5 < hi <= 4.0
    assert stats.bootstrap_ci([2.0]) == (2.0, 2.0)
    assert stats.symmetric([-4.0, -2.0, 0.0, 2.0, 8.0]) == (-2.0, 0.0, 2.0)
    # item 0 steers with the multiplier, item 1 against it
    import math

    def p(x):
        return 1 / (1 + math.exp(-x))

    scores = {m: [p(0.5 * m), p(-0.25 * m)] for m in (-2.0, 0.0, 2.0)}
    result = stats.steerability(scores)
    assert result is not None and result.anti_steerable == 0.5
    assert result.slope.mean == pytest.approx((0.5 - 0.25) / 2, abs=1e-4)
    assert stats.steerability({0.0: [0.5], 2.0: [0.6]}) is None


def test_free_text_sweeps_use_the_shipped_prompts_by_default():
    assert len(neutral_prompts()) >= 24 and len(set(neutral_prompts())) == len(neutral_prompts())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(direction="up"), "--direction must be increase or decrease"),
        (dict(contexts=("template",)), "--contexts takes chat, raw"),
        (dict(samples=0), "--samples must be at least 1"),
        (dict(samples=3, temperature=0.0), "needs a --temperature above 0"),
        (dict(policies=()), "at least one policy"),
        (dict(target=float("nan")), "--target must be a finite number"),
    ],
)
def test_bad_sweep_settings_are_refused(kwargs, message):
    with pytest.raises(SteerlabError, match=message):
        SweepConfig(layers=(1,), multipliers=(0.0, 1.0), **kwargs)


def test_sampled_completions_per_prompt_are_averaged(lm, pairs_file, tmp_path):
    data = load_dataset(pairs_file)
    config = SweepConfig(
        layers=(1,), multipliers=(0.0, 4.0), prompts=PROMPTS[:3], samples=3, max_new_tokens=6,
    )  # fmt: skip
    result = run_sweep(lm, data, config, tmp_path / "k", extractor=sweep_extractor(lm), judge=JUDGE)
    for row in result["rows"]:
        assert len(row["items"]) == 3 and row["n_test"] == 3


def test_neighbours_are_adjacent_in_the_whole_grid():
    same = [0.9, 0.1] * 6
    rows = _rows({0.0: [0.5] * 12, -4.0: same, 4.0: same[::-1]})
    best = recommend(rows, SweepConfig(layers=(1,), multipliers=(0.0,)))
    assert best["ties"] == []  # -4 is two steps from 4: the baseline lies between them
