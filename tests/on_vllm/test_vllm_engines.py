"""vLLM's machinery with other engine settings, each in its own process: tensor
parallelism, preemption with recomputation, and the refusal of compiled (non-eager) engines.

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
        {k: torch.randn(lm.info.hidden_size, generator=gen) * 0.8 for k in (9, 12)}, lm.identity
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


def test_a_compiled_engine_is_refused(setup):
    env, prompts = setup
    result = _run({"enforce_eager": False}, [[prompts[0], STEERINGS[1]]], env)
    assert result.returncode != 0
    said = result.stdout + result.stderr  # the engine core logs its failure to stdout
    assert "steerlab steers vLLM in eager mode only" in said and "--enforce-eager" in said
