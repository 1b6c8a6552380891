"""Tensor parallelism on the CPU build: every rank adds the same delta to its replicated
residual, so steered tokens under TP equal TP=1. SmolLM2-135M has 9 attention heads (3 KV
heads), so TP=2 cannot split it; TP=3 can, with the threads of 3 workers bound by hand to
this machine's 2 cores."""

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


def _run(tp: int, prompt: list[int], env: dict[str, str]) -> list[list[int]]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tp), json.dumps(prompt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_tensor_parallel_3_equals_1(tmp_path):
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    gen = torch.Generator().manual_seed(0)
    vec = SteeringVector(
        {k: torch.randn(lm.info.hidden_size, generator=gen) * 0.8 for k in (9, 12)}, lm.identity
    )
    save_vector(vec, tmp_path / "joy.safetensors")
    env = {
        **os.environ,
        "STEERLAB_VECTORS": str(tmp_path),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1|0",
    }
    prompt = prompt_ids(lm.tokenizer, "Write a sentence about the ocean.")
    one = _run(1, prompt, {k: v for k, v in env.items() if k != "VLLM_CPU_OMP_THREADS_BIND"})
    three = _run(3, prompt, env)
    assert three == one
    assert one[1] != one[0] and one[2] != one[0]  # the steering acted
