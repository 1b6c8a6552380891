"""Evaluation on any engine: the same small sweep on the Hugging Face engine and on vLLM
(vLLM's default compiled mode, one continuous batch; KL from an unsteered twin per row)
gives the same completions and the same numbers, and the same recommendation.

Tolerances, stated: fp32 on both; greedy completions identical; behaviour identical (the same
judge on the same texts); KL per token within 1e-3 absolute and perplexity within 0.1%
relative per cell (the two engines' logits agree to about 1e-5); scored log-probabilities
within 1e-3.
"""

from __future__ import annotations

import math
import shutil

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (make test builds .venv-vllm)")

from steerlab import Steering, load_model  # noqa: E402
from steerlab.core.dataset import load_dataset  # noqa: E402
from steerlab.core.files import sentiment_dataset_path  # noqa: E402
from steerlab.core.prompts import prompt_ids  # noqa: E402
from steerlab.evaluation.judges import sentiment  # noqa: E402
from steerlab.evaluation.sweep import SweepConfig, run_sweep  # noqa: E402
from steerlab.hf.methods import sweep_extractor  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = (
    "Tell me about your day.",
    "Write a sentence about the ocean.",
    "What do you think of cats?",
    "Describe your neighbourhood.",
)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    data = load_dataset(sentiment_dataset_path()).subset(list(range(60)))
    config = SweepConfig(
        layers=(6, 9), multipliers=(-4.0, 0.0, 4.0), max_new_tokens=12, prompts=PROMPTS
    )
    judge = sentiment()
    on_hf = run_sweep(lm, data, config, root / "hf", extractor=sweep_extractor(lm), judge=judge)
    (root / "vllm").mkdir()
    shutil.copy(root / "hf" / "vector.safetensors", root / "vllm" / "vector.safetensors")
    from steerlab.vllm.engine import VllmEngine

    engine = VllmEngine("smollm2-135m", root / "vllm", max_model_len=512, max_num_seqs=32)
    on_vllm = run_sweep(engine, data, config, root / "vllm", judge=judge)
    yield lm, engine, on_hf, on_vllm
    engine.close()


def test_a_sweep_gives_the_same_numbers_and_recommendation_on_both_engines(both):
    lm, engine, on_hf, on_vllm = both
    assert len(on_hf["rows"]) == len(on_vllm["rows"]) == 6
    for a, b in zip(on_hf["rows"], on_vllm["rows"], strict=True):
        assert (a["layer"], a["multiplier"]) == (b["layer"], b["multiplier"])
        assert a["example"] == b["example"], (a["layer"], a["multiplier"])
        assert a["behaviour"] == b["behaviour"]
        assert abs(a["kl"] - b["kl"]) <= 1e-3, (a["kl"], b["kl"])
        assert abs(a["perplexity"] / b["perplexity"] - 1) <= 1e-3
        assert (b["kl"] > 0) == (b["multiplier"] != 0)
    best_hf, best_vllm = on_hf["recommendation"], on_vllm["recommendation"]
    assert (best_hf is None) == (best_vllm is None)
    if best_hf is not None:
        assert (best_hf["layer"], best_hf["multiplier"]) == (
            best_vllm["layer"],
            best_vllm["multiplier"],
        )


def test_scores_and_next_token_logprobs_agree_across_engines(both):
    lm, engine, _, _ = both
    vector = engine.vectors["vector"]
    rows = [[Steering(vector, 4.0, (9,))], [], [Steering(vector, -4.0, (6,), "all")]]
    ctx = [prompt_ids(lm.tokenizer, p) for p in PROMPTS[:3]]
    cont = [lm.tokenizer(" The sea is calm.", add_special_tokens=False)["input_ids"]] * 3
    pairs = list(zip(ctx, cont, strict=True))
    for (a, ga), (b, gb) in zip(lm.score(pairs, rows), engine.score(pairs, rows), strict=True):
        assert abs(a - b) < 1e-3 and ga == gb
    tokens = [[330, 331], [42], [7, 8, 9]]
    hf = lm.next_token_logprobs(ctx, rows, tokens)
    vl = engine.next_token_logprobs(ctx, rows, tokens)
    for x, y in zip(hf, vl, strict=True):
        assert all(abs(p - q) < 1e-3 for p, q in zip(x, y, strict=True)), (x, y)
        assert all(math.isfinite(p) for p in y)


def test_on_the_cpu_the_kv_cache_is_a_fixed_size_unless_the_environment_says():
    """vLLM's CPU default reserves 92% of the machine and refuses to start beside a model this
    process already holds (the sweep's extraction): the engine asks for a fixed size."""
    from steerlab.vllm.engine import CPU_KV_CACHE_GIB, cpu_kv_cache

    assert cpu_kv_cache({}) == {"kv_cache_memory_bytes": CPU_KV_CACHE_GIB * 2**30}
    assert cpu_kv_cache({"VLLM_CPU_KVCACHE_SPACE": "2"}) == {}
