"""vLLM's machinery with other engine settings, each in its own process: tensor and
pipeline parallelism, preemption with recomputation, and vectors made for another model.

SmolLM2-135M has 9 attention heads (3 KV heads), so TP=2 cannot split it; TP=3 can, with
the threads of 3 workers bound by hand to this machine's 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (make test builds .venv-vllm)")

from steerlab import SteeringVector, load_model, save_vector  # noqa: E402
from steerlab.core.prompts import prompt_ids  # noqa: E402

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("tp_run.py")
STEERINGS = [
    [],
    [{"vector": "joy", "multiplier": 8.0, "policy": "after-prompt"}],
    [{"vector": "joy", "multiplier": -6.0, "layers": [12], "policy": "all"}],
    [{"vector": "joy", "multiplier": 5.0, "policy": "window:1-6"}],
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    folder = tmp_path_factory.mktemp("vectors")
    gen = torch.Generator().manual_seed(0)
    vec = SteeringVector(
        {k: torch.randn(lm.info.hidden_size, generator=gen) * 0.8 for k in (9, 12, 20)},
        lm.identity,
    )
    save_vector(vec, folder / "joy.safetensors")
    env = {**os.environ, "STEERLAB_VECTORS": str(folder), "VLLM_CPU_KVCACHE_SPACE": "1"}
    texts = [
        "Write a sentence about the ocean.",
        "Tell me about cats and dogs, in detail.",
        "Hi",
        "Describe a market on a rainy morning, its sounds and smells.",
    ]
    return env, [prompt_ids(lm.tokenizer, t) for t in texts]


def _run(options: dict, requests: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), json.dumps(options), json.dumps(requests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _tokens(result: subprocess.CompletedProcess) -> list[list[int]]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_tensor_parallel_3_equals_1(setup):
    env, prompts = setup
    requests = [[prompts[0], s] for s in STEERINGS]
    one = _tokens(_run({}, requests, env))
    three = _tokens(
        _run({"tensor_parallel_size": 3}, requests, {**env, "VLLM_CPU_OMP_THREADS_BIND": "0|1|0"})
    )
    assert three == one
    assert len({json.dumps(t) for t in one}) == len(one)  # every steering acted


def test_preemption_and_chunked_prefill_keep_the_semantics(setup):
    """A KV cache of 12 blocks for 8 concurrent requests forces preemption and recomputation;
    a 16-token step budget splits every prompt into chunks. Each request equals itself
    served alone on a roomy engine."""
    env, prompts = setup
    requests = [[prompts[i % 4], STEERINGS[(i + i // 4) % 4]] for i in range(8)]
    alone = _tokens(_run({"one_by_one": True}, requests, env))
    tight = _run(
        {
            "num_gpu_blocks_override": 12,
            "max_num_batched_tokens": 16,
            "max_model_len": 128,
            "max_num_seqs": 8,
            "enable_chunked_prefill": True,
        },
        requests,
        env,
    )
    assert _tokens(tight) == alone


def test_pipeline_parallel_2_equals_1(setup):
    """Two pipeline stages (layers 0-14 and 15-29), each steering its own layers: layer 20
    lives on the second stage. vLLM's default compiled mode: this CPU build's eager mode
    cannot run pipeline parallelism (its second stage never allocates the tensors it
    receives, with or without the plugin)."""
    env, prompts = setup
    steerings = [*STEERINGS, [{"vector": "joy", "multiplier": 6.0, "layers": [20]}]]
    requests = [[prompts[1], s] for s in steerings]
    one = _tokens(_run({"enforce_eager": False}, requests, env))
    two = _run(
        {"pipeline_parallel_size": 2, "distributed_executor_backend": "mp", "enforce_eager": False},
        requests,
        {**env, "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )
    assert _tokens(two) == one
    assert len({json.dumps(t) for t in one}) == len(one)  # every steering acted, layer 20 too


@pytest.mark.parametrize(
    ("width", "layers", "message"),
    [(1024, (9,), "hidden size 1024"), (64, (9,), "hidden size 64"), (576, (9, 35), "40-layer")],
)
def test_a_vector_for_another_model_stops_the_engine_at_start(
    setup, tmp_path, width, layers, message
):
    """A vector whose width or layers do not fit the served model is refused when the
    engine starts (as `steerlab serve` does), never inside a forward."""
    env, prompts = setup
    from steerlab.core.vector import ModelIdentity

    other = ModelIdentity("other", "llama", width, 40)
    vec = SteeringVector({k: torch.ones(width) for k in layers}, other)
    save_vector(vec, tmp_path / "wide.safetensors")
    result = _run({}, [[prompts[0], []]], {**env, "STEERLAB_VECTORS": str(tmp_path)})
    said = result.stdout + result.stderr
    assert result.returncode != 0 and "wide" in said and message in said, said[-2000:]
