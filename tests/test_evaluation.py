from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import tiny
import torch
from helpers import SHARED

from steerlab import Sampling, Steering, SteerlabError
from steerlab.core.dataset import load_dataset
from steerlab.core.vector import SteeringVector
from steerlab.evaluation.judges import keywords, llm, sentiment
from steerlab.evaluation.metrics import (
    behaviour_probability,
    distinct_n,
    judged_generation,
    text_perplexity,
)
from steerlab.evaluation.policies import compare_policies
from steerlab.evaluation.sweep import SweepConfig, run_sweep, split
from steerlab.evaluation.sweep_report import recommend
from steerlab.hf.methods import sweep_extractor


@pytest.fixture(scope="module")
def ab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ab") / "ab.jsonl"
    rows = [
        {
            "question": f"Item {i}?\n\nChoices:\n (A) one\n (B) two",
            "answer_matching_behavior": " (A)",
            "answer_not_matching_behavior": " (B)",
        }
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def planted_vector(lm, layer: int) -> SteeringVector:
    """A vector that writes the 'A minus B' unembedding direction into the last block."""
    tok = lm.tokenizer
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    w = lm.model.get_output_embeddings().weight.detach()
    return SteeringVector({layer: (w[a] - w[b]).float()}, lm.identity, method="planted")


@contextmanager
def chat_stub(reply):
    """A local OpenAI-compatible chat endpoint answering ``reply(prompt)``; yields its base
    URL and the prompts it saw."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            answer = reply(body["messages"][0]["content"])
            payload = json.dumps(
                {"choices": [{"message": {"role": "assistant", "content": answer}}]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()


def test_ab_probability_rises_on_a_planted_model(ab_file):
    lm = tiny.model("llama")
    data = load_dataset(ab_file)
    vec = planted_vector(lm, 3)
    base = behaviour_probability(lm, data).mean
    up = behaviour_probability(lm, data, [Steering(vec, 4.0)]).mean
    down = behaviour_probability(lm, data, [Steering(vec, -4.0)]).mean
    assert down < base < up
    assert behaviour_probability(lm, data, [Steering(vec, 100.0)]).mean > 0.9
    # the batched scores equal one-by-one scores
    single = [
        behaviour_probability(lm, data.subset([i]), [Steering(vec, 4.0)]).mean
        for i in range(len(data))
    ]
    assert behaviour_probability(
        lm, data, [Steering(vec, 4.0)], batch_size=5
    ).scores == pytest.approx(single, abs=1e-5)


def test_yesno_probability(tmp_path):
    lm = tiny.model("llama")
    path = tmp_path / "yn.jsonl"
    path.write_text(
        json.dumps(
            {
                "question": "Say it?",
                "answer_matching_behavior": " Yes",
                "answer_not_matching_behavior": " No",
            }
        )
        + "\n"
    )
    tok = lm.tokenizer
    w = lm.model.get_output_embeddings().weight.detach()
    vec = SteeringVector(
        {3: (w[tok.convert_tokens_to_ids("Y")] - w[tok.convert_tokens_to_ids("N")]).float()},
        lm.identity,
    )
    data = load_dataset(path)
    assert (
        behaviour_probability(lm, data, [Steering(vec, 4.0)]).mean
        > behaviour_probability(lm, data).mean
    )
    with pytest.raises(SteerlabError, match="needs an ab or yesno dataset"):
        pairs = tmp_path / "p.jsonl"
        pairs.write_text(json.dumps({"positive": "a", "negative": "b"}) + "\n")
        behaviour_probability(lm, load_dataset(pairs))


def test_judges_and_distinct_n():
    s = sentiment()
    good, bad = s(["I love this wonderful day!", "This is awful and I hate it."])
    assert good > 0.5 and bad < -0.5
    k = keywords(["ocean", "sea"])
    assert k(["The ocean and the sea", "nothing here"]) == [40.0, 0.0]
    with pytest.raises(SteerlabError, match="at least one word"):
        keywords([" "])
    assert distinct_n(["a b c d"], 2) == 1.0
    assert distinct_n(["a b a b a b"], 2) == pytest.approx(2 / 5)


def test_llm_judge_against_a_local_stub_server():
    with chat_stub(lambda text: "8" if "happy" in text else "Score: 2") as (base, seen):
        judge = llm(f"{base}/v1", "stub", "happiness")
        assert judge(["so happy", "meh"]) == [0.8, 0.2]
        assert seen[0]["model"] == "stub" and "happiness" in seen[0]["messages"][0]["content"]
    dead = llm(base, "stub", "x", timeout=2)
    with pytest.raises(SteerlabError, match="the LLM judge"):
        dead(["x"])


def test_kl_zero_unsteered_and_positive_steered():
    lm = tiny.model("llama")
    vec = planted_vector(lm, 2)
    judge = keywords(["A"])
    plain = judged_generation(lm, ["hi", "hello"], [], judge, Sampling(6))
    steered = judged_generation(lm, ["hi", "hello"], [Steering(vec, 3.0)], judge, Sampling(6))
    assert plain.kl == pytest.approx(0.0, abs=1e-6)
    assert steered.kl > 0.01
    assert (
        plain.neutral_perplexity
        == pytest.approx(text_perplexity(lm, "The library opens at nine."), rel=1)
        or plain.neutral_perplexity > 0
    )
    assert steered.neutral_perplexity != plain.neutral_perplexity


def test_split_never_scores_training_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"P{i % 10}", "positive": f"good {i}", "negative": f"bad {i}"})
            + "\n"
            for i in range(50)
        )
    )
    data = load_dataset(path)
    train, test = split(data, 0.3, seed=1)
    assert {p.prompt for p in train.pairs}.isdisjoint({p.prompt for p in test.pairs})
    assert len(train) + len(test) == 50 and len(test) == 15
    assert split(data, 0.3, seed=1)[1].pairs == test.pairs
    with pytest.raises(SteerlabError, match="between 0 and 1"):
        split(data, 1.5, 0)


def test_sweep_writes_files_resumes_and_plots_open(ab_file, tmp_path):
    from PIL import Image

    lm = tiny.model("llama")
    data = load_dataset(ab_file)
    cfg = SweepConfig(layers=(1, 3), multipliers=(-2.0, 0.0, 2.0), test_fraction=0.4)
    out = tmp_path / "sweep"
    result = run_sweep(lm, data, cfg, out, extractor=sweep_extractor(lm))
    assert len(result["rows"]) == 6
    for name in (
        "results.csv",
        "results.json",
        "results.jsonl",
        "report.md",
        "vector.safetensors",
        "manifest.json",
    ):
        assert (out / name).is_file(), name
    for png in ("behaviour_vs_multiplier.png", "behaviour_vs_layer.png", "tradeoff.png"):
        with Image.open(out / png) as im:
            assert (
                im.size[0] > 300 and im.size[1] > 200 and len(set(im.convert("L").getdata())) > 10
            )
    assert "Rule: the largest increase" in (out / "report.md").read_text()
    # resume: a killed run keeps its rows; a rerun computes only the missing ones
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    calls = []
    again = run_sweep(lm, data, cfg, out, extractor=sweep_extractor(lm), on_row=calls.append)
    assert len(calls) == 3 and len(again["rows"]) == 6
    with pytest.raises(SteerlabError, match="different run"):
        run_sweep(
            lm,
            data,
            SweepConfig(layers=(2,), multipliers=(1.0,)),
            out,
            extractor=sweep_extractor(lm),
        )


def test_recommendation_rule():
    rows = [
        {"layer": 1, "multiplier": 0.0, "behaviour": 0.5, "fluency": 2.0},
        {"layer": 1, "multiplier": 4.0, "behaviour": 0.9, "fluency": 5.0},
        {"layer": 1, "multiplier": 2.0, "behaviour": 0.7, "fluency": 3.0},
    ]
    best = recommend(rows, bound=2.0)
    assert best is not None and best["multiplier"] == 2.0 and best["shift"] == pytest.approx(0.2)
    assert recommend(rows, bound=1.2) is None


def test_compare_policies_writes_table_and_plot(tmp_path):
    lm = tiny.model("llama")
    vec = planted_vector(lm, 2)
    rows = compare_policies(
        lm, vec, 2, 2.0, ["hi", "hello"], keywords(["A"]), tmp_path, max_new_tokens=6
    )
    assert [r["policy"] for r in rows] == [
        "unsteered",
        "after-prompt",
        "transient",
        "all",
        "prompt",
        "actadd",
    ]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["kl"] > 0 for r in rows[1:])
    assert (tmp_path / "policies.png").stat().st_size > 5000 and (
        tmp_path / "policies.md"
    ).is_file()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is absent")
def test_real_model_small_sweep_on_shared_dataset(tmp_path):
    from steerlab import load_model

    lm = load_model()
    data = load_dataset(SHARED / "datasets/model-written-evals/persona/narcissism.jsonl").subset(
        list(range(120))
    )
    cfg = SweepConfig(layers=(8, 14), multipliers=(-4.0, 0.0, 4.0), max_test_items=24)
    result = run_sweep(lm, data, cfg, tmp_path, extractor=sweep_extractor(lm))
    rows = {(r["layer"], r["multiplier"]): r["behaviour"] for r in result["rows"]}
    assert len(rows) == 6 and all(0 <= v <= 1 for v in rows.values())
    # The 135M model is near chance on these items (../shared/datasets/README.md), so only
    # the pipeline is asserted: one shared baseline, and steering changes the scores.
    assert rows[(8, 0.0)] == rows[(14, 0.0)]
    assert rows[(8, 4.0)] != rows[(8, 0.0)] and rows[(14, -4.0)] != rows[(14, 0.0)]
    assert (tmp_path / "report.md").is_file()


@pytest.mark.slow
def test_real_model_sentiment_vector_changes_greedy_output():
    from steerlab import generate, load_model
    from steerlab.core.files import sentiment_dataset_path
    from steerlab.hf.extraction import extract

    lm = load_model()
    vec = extract(lm, load_dataset(sentiment_dataset_path()), [9])
    prompts = ["Write a sentence about the ocean.", "What do you think of cats?"]
    plain, _ = generate(lm, prompts, [], Sampling(24))
    pos, _ = generate(lm, prompts, [Steering(vec, 4.0)], Sampling(24))
    neg, _ = generate(lm, prompts, [Steering(vec, -6.0)], Sampling(24))
    assert plain != pos and plain != neg
    judge = sentiment()
    assert sum(judge(neg)) < sum(judge(plain))
    assert torch.is_tensor(vec.directions[9])


def test_axbench_judge_rates_three_ways_and_takes_the_harmonic_mean():
    from steerlab.evaluation.judges import AXBENCH_TEMPLATES, axbench, harmonic

    def reply(text):
        if "express the concept" in text:
            return "2" if "ocean" in text.split("Response:")[1] else "0"
        return "Rating: 1" if "relevant to the instruction" in text else "2"

    with chat_stub(reply) as (base, bodies):
        judge = axbench(f"{base}/v1", "stub", "the ocean")
        scores = judge(["the ocean is wide", "cats sleep"], ["Tell me a fact.", "Hi"])
        seen = [b["messages"][0]["content"] for b in bodies]
        assert scores == [pytest.approx(3 / (1 / 2 + 1 / 1 + 1 / 2)), 0.0]
        assert len(seen) == 6 and all("the ocean" in t for t in seen[::3])
        assert "Tell me a fact." in seen[1]  # the instruction rating sees the prompt
        assert set(AXBENCH_TEMPLATES) == {"concept", "instruction", "fluency"}
        with pytest.raises(SteerlabError, match="needs each completion's prompt"):
            judge(["x"])
        # in a sweep, the judge gets each row's prompt
        from steerlab.evaluation.metrics import judged_rows

        lm = tiny.model("llama")
        rows = judged_rows(lm, ["a", "b"], [[], []], judge, Sampling(max_new_tokens=3))
        last = bodies[-2]["messages"][0]["content"]
        assert len(rows.scores) == 2 and last.count("Instruction:\nb") == 1
    assert harmonic([2.0, 2.0, 2.0]) == 2.0 and harmonic([2.0, 0.0, 1.0]) == 0.0
