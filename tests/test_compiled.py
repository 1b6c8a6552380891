"""steer() under compiled static-cache generate(): exact in any order of calls, or refused.

On CUDA transformers compiles the forward whenever a static cache is used; here the same
compile is forced on the CPU (``CompileConfig._compile_all_devices``).
"""

from __future__ import annotations

import pytest
import tiny
import torch
from helpers import random_vector

from steerlab import Sampling, Steering, SteerlabError, decode, steer
from steerlab.core.policy import Policy
from steerlab.core.prompts import pad_batch

PROMPTS = ["hello there", "a much longer prompt here", "hi", "abc def"]
STEPS = 12

pytestmark = pytest.mark.slow  # each first compile takes tens of seconds on 2 cores


def _setup():
    from transformers import CompileConfig

    lm = tiny.model("llama")
    seqs = [lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    ids, mask = pad_batch(seqs, 0)
    config = CompileConfig()
    config._compile_all_devices = True
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=STEPS,
        do_sample=False,
        pad_token_id=0,
        cache_implementation="static",
        compile_config=config,
    )
    return lm, ids, mask, kwargs


def _exact(lm, ids, mask, steerings):
    return decode(
        lm.model, ids, mask, steerings, Sampling(STEPS, stop_at_eos=False), layer_map=lm.layers
    ).tokens


def test_compiled_static_cache_follows_every_steering_in_any_order():
    lm, ids, mask, kwargs = _setup()
    width = ids.shape[1]
    a = Steering(random_vector(lm, [1, 2], seed=1), 4.0, policy=Policy("after-prompt"))
    b = Steering(random_vector(lm, [1], seed=2), -3.0, policy=Policy("all"))
    w = Steering(random_vector(lm, [2], seed=3), 5.0, policy=Policy.parse("window:2-6"))
    actadd = Steering(random_vector(lm, [1], seed=4, rows=3), 4.0, policy=Policy("actadd"))
    sequence = [[], [a], [], [b], [a], [w], [actadd], [a, b], []]
    for steerings in sequence:
        if steerings:
            with steer(lm.model, steerings, tokenizer=lm.tokenizer):
                got = lm.model.generate(ids, **kwargs)
        else:
            got = lm.model.generate(ids, **kwargs)
        want = _exact(lm, ids, mask, steerings)
        names = [str(s.policy) for s in steerings] or ["unsteered"]
        assert torch.equal(got[:, width:], want), names
    assert hasattr(lm.model, "_compiled_call")  # the compiled path really ran


def test_a_model_compiled_before_steerlab_is_refused():
    import torch._dynamo.config as dynamo

    lm, ids, mask, kwargs = _setup()
    dynamo.skip_nnmodule_hook_guards = True  # as if compiled before steerlab was imported
    try:
        lm.model.generate(ids, **kwargs)
        with (
            pytest.raises(SteerlabError, match="compiled before"),
            steer(lm.model, random_vector(lm, [1]), multiplier=2.0),
        ):
            pass
    finally:
        dynamo.skip_nnmodule_hook_guards = False
