"""The engine seam evaluation uses (score, next-token log-probabilities, decoding with the
unsteered comparison), the engine registry with its capabilities, the judge and method
registries, and re-reading a finished sweep under another rule."""

from __future__ import annotations

import json
import math

import pytest
import tiny
import torch
from helpers import prompt_ids, random_vector

from steerlab import Sampling, Steering, SteerlabError
from steerlab.core.policy import Policy
from steerlab.engines import ENGINES, engine_entry, engine_help, require
from steerlab.hf.reference import reference_logits


def test_score_equals_the_plain_reference_per_row(llama):
    lm = llama
    seqs = prompt_ids(lm)
    a = Steering(random_vector(lm, [1], seed=3), 4.0)
    b = Steering(random_vector(lm, [2], seed=4), -3.0, policy=Policy("all"))
    rows = [[a], [], [b]]
    pairs = [(seqs[0], seqs[1][:5]), (seqs[1], seqs[2]), (seqs[2], seqs[0][:4])]
    got = lm.score(pairs, rows)
    for (ctx, cont), steering, (logprob, greedy) in zip(pairs, rows, got, strict=True):
        logits = reference_logits(lm.model, list(ctx) + list(cont), len(ctx), steering, lm.layers)
        logp = torch.log_softmax(logits, -1)
        want = [float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)]
        assert logprob == pytest.approx(sum(want), abs=1e-4)
        best = logp[len(ctx) - 1 : len(ctx) - 1 + len(cont)].argmax(-1).tolist()
        assert greedy == (best == list(cont))


def test_next_token_logprobs_read_the_position_after_each_prompt(llama):
    lm = llama
    seqs = prompt_ids(lm)
    s = Steering(random_vector(lm, [1], seed=3), 4.0)
    transient = Steering(random_vector(lm, [1], seed=5), 6.0, policy=Policy("transient"))
    rows = [[s], [], [transient]]
    got = lm.next_token_logprobs(seqs, rows, [[5, 6], [7], [8, 9, 10]])
    for seq, steering, tokens, values in zip(
        seqs, rows, [[5, 6], [7], [8, 9, 10]], got, strict=True
    ):
        logits = reference_logits(lm.model, seq, len(seq), steering, lm.layers)[-1]
        logp = torch.log_softmax(logits, -1)
        assert values == pytest.approx([float(logp[t]) for t in tokens], abs=1e-4)


def test_decoding_with_the_unsteered_comparison_through_the_seam(llama):
    """KL and unsteered log-probabilities per step equal the plain reference's, row by row
    (an unsteered row: zero KL), with prompts shared between rows."""
    lm = llama
    seqs = prompt_ids(lm)
    s = Steering(random_vector(lm, [1, 2], seed=3), 4.0)
    rows = [[s], [], [s]]
    out = lm.decode_batch(
        seqs, rows, Sampling(6, stop_at_eos=False), track_unsteered=True, share_prompts=True
    )
    assert out.kl is not None and out.unsteered_logprobs is not None
    for i, (seq, steering) in enumerate(zip(seqs, rows, strict=True)):
        tokens = out.tokens[i].tolist()
        full = list(seq) + tokens
        steered = torch.log_softmax(
            reference_logits(lm.model, full, len(seq), steering, lm.layers), -1
        )[len(seq) - 1 : -1]
        plain = torch.log_softmax(reference_logits(lm.model, full, len(seq), [], lm.layers), -1)[
            len(seq) - 1 : -1
        ]
        kl = (steered.exp() * (steered - plain)).sum(-1)
        assert out.kl[i].tolist() == pytest.approx(kl.tolist(), abs=1e-4)
        want = [float(plain[k, t]) for k, t in enumerate(tokens)]
        assert out.unsteered_logprobs[i].tolist() == pytest.approx(want, abs=1e-4)
    assert float(out.kl[1].abs().max()) < 1e-6 and float(out.kl[0].min()) > 0


def test_the_engine_registry_drives_help_dispatch_and_capability_errors():
    assert set(ENGINES) == {"hf", "vllm"}
    assert "hf:" in engine_help() and "vllm:" in engine_help()
    with pytest.raises(SteerlabError, match="unknown engine 'tgi': use one of hf, vllm"):
        engine_entry("tgi")
    require("hf", "transient", "--policy transient")  # the HF engine runs everything
    for feature, what in [
        ("transient", "--policy transient"),
        ("sites", "--site mlp"),
        ("conditions", "--condition"),
        ("activations", "condition fit"),
    ]:
        with pytest.raises(
            SteerlabError, match=f"{what} needs .* the vllm engine does not run: use --engine hf"
        ):
            require("vllm", feature, what)


def test_judges_and_methods_come_from_registries():
    from steerlab.core.methods import METHODS, method_entry, method_help
    from steerlab.evaluation.judges import JUDGES, judge_help, make_judge

    for name in JUDGES:
        assert f"{name}:" in judge_help()
    for name in METHODS:
        assert f"{name}:" in method_help()
    assert method_entry("bipo").trained and not method_entry("mean-diff").trained
    with pytest.raises(SteerlabError, match="unknown judge 'vibes'"):
        make_judge("vibes", None, None, "m", "b")
    with pytest.raises(SteerlabError, match="--judge llm needs --judge-url"):
        make_judge("llm", None, None, "m", "b")
    with pytest.raises(SteerlabError, match="unknown method 'magic'"):
        method_entry("magic")
    assert make_judge("sentiment", "sea,ocean", None, "m", "b")(["the sea"]) == [50.0]


def test_cli_refuses_an_engine_without_a_capability_in_one_line(tmp_path):
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "steerlab.cli", *args], capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip

    vec = tmp_path / "v.safetensors"
    from steerlab.formats import save_vector

    save_vector(random_vector(tiny.model("llama"), [1]), vec)
    for args, message in [
        (
            ["generate", "hi", "-v", str(vec), "--engine", "vllm", "--policy", "transient"],
            "transient",
        ),
        (["generate", "hi", "-v", str(vec), "--engine", "vllm", "--site", "mlp"], "--site mlp"),
        (
            ["condition", "fit", str(vec), "-v", str(vec), "-l", "1", "--engine", "vllm"],
            "condition fit",
        ),
        (["sweep", str(vec), "--engine", "nope"], "unknown engine"),
    ]:
        r = run(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_finished_sweep_reread_under_another_rule_starts_no_engine(tmp_path):
    from steerlab.core.dataset import Dataset, Pair
    from steerlab.evaluation.judges import keywords
    from steerlab.evaluation.sweep import SweepConfig, run_sweep
    from steerlab.hf.methods import sweep_extractor

    lm = tiny.model("llama")
    pairs = tuple(Pair(f"q{i}", f"good {i}", f"bad bad {i}", i) for i in range(12))
    data = Dataset("pairs", pairs=pairs)
    config = SweepConfig(layers=(1, 2), multipliers=(-4.0, 0.0, 4.0), max_new_tokens=4,
                         prompts=("the cat", "a dog", "hello", "rain"))  # fmt: skip
    judge = keywords(["a", "e"])
    first = run_sweep(lm, data, config, tmp_path, extractor=sweep_extractor(lm), judge=judge)
    results = (tmp_path / "results.jsonl").read_text()
    started: list[int] = []

    def engine():
        started.append(1)
        return lm

    import dataclasses

    again = run_sweep(
        engine, data, dataclasses.replace(config, direction="decrease"), tmp_path, judge=judge
    )
    assert not started  # no cell left to score: no engine, no extraction
    assert (tmp_path / "results.jsonl").read_text() == results
    assert [r["behaviour"] for r in again["rows"]] == [r["behaviour"] for r in first["rows"]]
    rule = json.loads((tmp_path / "recommendation.json").read_text())
    assert "decrease" in (tmp_path / "report.md").read_text()
    if first["recommendation"] and rule:
        assert rule["shift"] <= first["recommendation"]["shift"] or math.isnan(rule["shift"])


def test_projection_rounds_are_refused_by_name_where_an_engine_has_none():
    """The vLLM plugin starts without projection rounds (additions only): an ablate or clamp
    entry is a one-line refusal naming the setting that enables it; with one round, one per
    layer passes and a second at the same layer is refused."""
    from steerlab.core.requests import EntryError, Rules, parse_steerings

    vector = random_vector(tiny.model(), layers=[1, 2])
    vectors = {"v": vector}
    ablate = [{"vector": "v", "operator": "ablate", "layers": [1]}]
    with pytest.raises(EntryError, match=r"STEERLAB_PROJECTIONS=1") as none:
        parse_steerings(ablate, vectors, Rules(num_layers=4, max_projections=0))
    assert "\n" not in str(none.value)
    adds = [{"vector": "v", "multiplier": 2.0, "layers": [1]}]
    assert len(parse_steerings(adds, vectors, Rules(num_layers=4, max_projections=0))) == 1
    assert len(parse_steerings(ablate, vectors, Rules(num_layers=4, max_projections=1))) == 1
    with pytest.raises(EntryError, match=r"at most 1 per layer"):
        parse_steerings(ablate * 2, vectors, Rules(num_layers=4, max_projections=1))


@pytest.mark.parametrize(("rows", "expected"), [(50, 50), (1024, 1024), (10**9, 1024)])
def test_a_sweeps_batch_rows_reach_vllm_bounded(monkeypatch, rows, expected):
    """--batch-rows becomes the rows vLLM runs at once, never more than it can size buffers
    for (a huge value would have vLLM allocate per-request buffers for every one at start)."""
    import dataclasses

    import steerlab.engines as engines
    from steerlab.cli.common import engine_loader

    seen = []
    entry = dataclasses.replace(engines.ENGINES["vllm"], load=lambda options: seen.append(options))
    monkeypatch.setitem(engines.ENGINES, "vllm", entry)
    engine_loader("vllm", "smollm2-135m", None, None, rows=rows)()
    assert [o.max_num_seqs for o in seen] == [expected]
    engine_loader("vllm", "smollm2-135m", None, None)()
    assert seen[-1].max_num_seqs == engines.EngineOptions("m").max_num_seqs  # the default
