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
from steerlab.core.sampling import Sampling  # noqa: E402
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

    # 32-token blocks: rows and twins read their prompts' cached blocks (twins.py)
    engine = VllmEngine(
        "smollm2-135m", root / "vllm", max_model_len=512, max_num_seqs=32, block_size=32
    )
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


def test_twins_score_every_token_when_an_identical_twin_ran_before(both):
    """Two identical steered rows make identical twins: the second finds the first's blocks
    in the prefix cache, the block holding the prompt's last token included (32 tokens
    generated after a prompt of about 35, 32-token blocks). Each twin still computes every
    position it scores: KL and unsteered log-probabilities per token equal the Hugging Face
    engine's for both rows, and equal each other."""
    lm, engine, _, _ = both
    vector = engine.vectors["vector"]
    ids = prompt_ids(lm.tokenizer, PROMPTS[1])
    steering = [[Steering(vector, 4.0, (9,))]] * 3
    sampling = Sampling(max_new_tokens=32, stop_at_eos=False)
    hf = lm.decode_batch([ids] * 3, steering, sampling, track_unsteered=True)
    for first in range(2):  # a batch of three, then the same batch again (all cached)
        vl = engine.decode_batch([ids] * 3, steering, sampling, track_unsteered=True)
        assert vl.kl is not None and vl.unsteered_logprobs is not None
        assert hf.kl is not None and hf.unsteered_logprobs is not None
        assert vl.lengths == hf.lengths == [32] * 3, (first, vl.lengths)
        assert bool((vl.tokens == hf.tokens).all())
        assert float((vl.kl - hf.kl).abs().max()) <= 1e-3
        assert float((vl.unsteered_logprobs - hf.unsteered_logprobs).abs().max()) <= 1e-3
        assert float(vl.kl[:, :32].min()) > 0  # every position scored, none left at zero


def test_on_a_small_cpu_machine_the_one_worker_gets_every_cpu():
    """vLLM's CPU default keeps a core per worker for its scheduler: on 2 cores the worker
    computed on one. steerlab's engine gives a lone worker every CPU of a small machine,
    unless the environment sets the binding."""
    from steerlab.vllm.engine import ENV_BIND, ENV_RESERVED, cpu_threads

    assert cpu_threads({}, 1, [0, 1]) == {ENV_BIND: "0,1", ENV_RESERVED: "0"}
    assert cpu_threads({}, 1, [3, 1, 2, 0]) == {ENV_BIND: "0,1,2,3", ENV_RESERVED: "0"}
    assert cpu_threads({ENV_BIND: "0"}, 1, [0, 1]) == {}
    assert cpu_threads({}, 2, [0, 1]) == {}  # tensor or pipeline parallel: vLLM's own
    assert cpu_threads({}, 1, list(range(16))) == {}  # a large machine: vLLM's own
    assert cpu_threads({}, 1, [0]) == {}


def test_on_the_cpu_prompts_shorter_than_128_tokens_can_share_blocks():
    """vLLM's CPU build defaults to 128-token blocks, so a chat prompt shorter than that is
    never read from the prefix cache; steerlab's engine asks for 32 unless told."""
    from steerlab.vllm.engine import CPU_BLOCK_SIZE, block_sizes

    assert CPU_BLOCK_SIZE == 32
    assert block_sizes(None) == {"block_size": 32}
    assert block_sizes(64) == {"block_size": 64}
