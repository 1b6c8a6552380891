"""Run greedy requests on a vLLM engine built with the given options; print the tokens as
JSON (used by test_vllm_engines.py). vLLM starts its workers with spawn, hence the guard.

Usage: python tp_run.py '{"tensor_parallel_size": 3}' '[[prompt ids, [entries]], ...]'
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams, TokensPrompt

    from steerlab.vllm import extra_args, model_dir

    options, requests = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    one_by_one = options.pop("one_by_one", False)  # each request alone, one engine
    settings = dict(dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    llm = LLM(model=str(model_dir()), **{**settings, **options})
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    params = [
        SamplingParams(
            max_tokens=16, temperature=0, ignore_eos=True, extra_args=extra_args(e) if e else None
        )
        for _, e in requests
    ]
    if one_by_one:
        outs = [
            llm.generate([p], [q], use_tqdm=False)[0] for p, q in zip(prompts, params, strict=True)
        ]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
