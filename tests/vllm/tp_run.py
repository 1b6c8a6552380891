"""Greedy tokens under tensor parallelism, as JSON on stdout (run by test_vllm_tp.py).

vLLM starts its workers with spawn, hence the __main__ guard.
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams, TokensPrompt

    from steerlab.vllm import extra_args, model_dir

    tp, prompt = int(sys.argv[1]), json.loads(sys.argv[2])
    llm = LLM(
        model=str(model_dir()),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        tensor_parallel_size=tp,
        seed=0,
    )
    outs = []
    for entries in (
        [],
        [{"vector": "joy", "multiplier": 8.0, "policy": "after-prompt"}],
        [{"vector": "joy", "multiplier": -6.0, "layers": [12], "policy": "all"}],
    ):
        params = SamplingParams(
            max_tokens=16,
            temperature=0,
            ignore_eos=True,
            extra_args=extra_args(entries) if entries else None,
        )
        result = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        outs.append(list(result[0].outputs[0].token_ids))
    print("RESULT " + json.dumps(outs), flush=True)
