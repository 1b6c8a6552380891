"""steerlab inside stock vLLM (the CPU build): exact policies and operators on continuous
batches, in vLLM's default compiled mode and in eager mode.

One in-process engine per mode (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the default model
in float32 serves every test of that mode. The reference is the plain uncached one
(:func:`steerlab.hf.reference.reference_generate`: the whole sequence recomputed at every
step, one hook per steered position): greedy tokens must be equal, and each chosen token's
log-probability within 2e-3 of the reference's (inductor may reorder sums).
"""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed here (make test builds .venv-vllm)"
)

from steerlab import SteeringVector, load_model, save_vector  # noqa: E402
from steerlab.core.prompts import encode_prompts  # noqa: E402
from steerlab.core.requests import Rules, parse_steerings  # noqa: E402
from steerlab.hf.reference import reference_generate  # noqa: E402
from steerlab.vllm import extra_args, model_dir  # noqa: E402

pytestmark = pytest.mark.slow
TOKENS = 24
LOGPROB_TOLERANCE = 2e-3
PROMPTS = [
    "Write a sentence about the ocean.",
    "Hi",
    "What do you think of cats? Answer in one sentence, please.",
    "Describe your neighbourhood to a visitor who has never been there before.",
]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    d = lm.info.hidden_size
    gen = torch.Generator().manual_seed(0)
    folder = tmp_path_factory.mktemp("vectors")
    vecs = {
        "joy": SteeringVector(
            {k: torch.randn(d, generator=gen) * 0.6 for k in (9, 12)}, lm.identity
        ),
        "calm": SteeringVector(
            {k: torch.randn(d, generator=gen) * 0.6 for k in (5, 9, 20)}, lm.identity
        ),
        "front": SteeringVector({9: torch.randn(3, d, generator=gen) * 0.6}, lm.identity),
    }
    for name, vec in vecs.items():
        save_vector(vec, folder / f"{name}.safetensors")
    ids = [encode_prompts(lm.tokenizer, [p])[0][0].tolist() for p in PROMPTS]
    return lm, vecs, ids, folder


@pytest.fixture(scope="module", params=["compiled", "eager"])
def setup(request, hf):
    lm, vecs, ids, folder = hf
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["STEERLAB_VECTORS"] = str(folder)
    rounds = os.environ.get("STEERLAB_PROJECTIONS")
    os.environ["STEERLAB_PROJECTIONS"] = "1"  # the operators' tests (the default is 0)
    from steerlab.vllm import registry

    registry.reset()  # this process loads the test's folder
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    llm = vllm.LLM(
        model=str(model_dir("smollm2-135m")),
        dtype="float32",
        enforce_eager=request.param == "eager",
        max_model_len=512,
        max_num_seqs=8,
        enable_prefix_caching=True,
        block_size=32,  # the CPU default, 128, would leave the two-turn prompts no full block
        seed=0,
    )
    yield lm, llm, vecs, ids, request.param
    if rounds is None:
        os.environ.pop("STEERLAB_PROJECTIONS", None)
    else:
        os.environ["STEERLAB_PROJECTIONS"] = rounds
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _compiled_only(mode: str) -> None:
    """Host-side behaviour (batching, the prefix cache's hashes, validation, the operators'
    spans) is the same code in both modes: checked once, in vLLM's default compiled mode.
    Eager mode keeps the per-policy exactness test (its hooks skip unsteered steps)."""
    if mode != "compiled":
        pytest.skip("checked in compiled mode (the same host code in both modes)")


_cached: list[int] = []  # the prompt tokens each request of the last _run read from the cache


def _run(llm, prompts, entries_per_row, logprobs=False, salt=None, tokens=TOKENS):
    from vllm import SamplingParams, TokensPrompt

    params = [
        SamplingParams(
            max_tokens=tokens,
            temperature=0.0,
            ignore_eos=True,
            logprobs=1 if logprobs else None,
            extra_args=extra_args(e) if e else None,
        )
        for e in entries_per_row
    ]
    inputs = []
    for p in prompts:
        prompt = TokensPrompt(prompt_token_ids=list(p))
        if salt is not None:
            prompt["cache_salt"] = salt
        inputs.append(prompt)
    outs = llm.generate(inputs, params, use_tqdm=False)
    _cached[:] = [int(o.num_cached_tokens or 0) for o in outs]
    if not logprobs:
        return [list(o.outputs[0].token_ids) for o in outs]
    return [
        (
            list(o.outputs[0].token_ids),
            [
                step[t].logprob
                for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
            ],
        )
        for o in outs
    ]


_references: dict[str, tuple[list[int], list[float]]] = {}


def _reference(lm, vecs, prompt, entries, tokens=TOKENS):
    """Greedy tokens and each token's log-probability from the plain uncached reference
    (memoised: both modes compare with the same reference)."""
    key = json.dumps([prompt, entries, tokens])
    if key not in _references:
        rules = Rules(num_layers=lm.info.num_layers, transient=False, sites=False, conditions=False)
        steerings = parse_steerings(entries, vecs, rules)
        out, logits = reference_generate(
            lm.model, prompt, steerings, tokens, lm.layers, lm.tokenizer
        )
        logp = torch.log_softmax(logits.float(), -1)
        _references[key] = (out, [float(logp[i, t]) for i, t in enumerate(out)])
    return _references[key]


def _assert_exact(lm, vecs, llm, prompts, rows, tokens=TOKENS):
    got = _run(llm, prompts, rows, logprobs=True, tokens=tokens)
    for prompt, entries, (tok, lps) in zip(prompts, rows, got, strict=True):
        ref_tok, ref_lps = _reference(lm, vecs, prompt, entries, tokens)
        assert tok == ref_tok, entries
        worst = max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True))
        assert worst < LOGPROB_TOLERANCE, (entries, worst)


POLICIES = [
    ("after-prompt", "joy"),
    ("all", "joy"),
    ("prompt", "calm"),
    ("from-marker:assistant", "joy"),
    ("from-marker:<|im_start|>", "calm"),
    ("actadd", "front"),
    ("window:2-9", "calm"),
    ("window:0-", "joy"),
    ("window:3-", "calm"),
]


@pytest.mark.parametrize(("policy", "vector"), POLICIES)
def test_every_policy_equals_the_plain_reference_and_changes_the_text(setup, policy, vector):
    lm, llm, vecs, ids, mode = setup
    one_layer = [{"vector": vector, "multiplier": 4.0, "layers": [9], "policy": policy}]
    several = [{"vector": vector, "multiplier": 3.0, "policy": policy}]
    # one layer on all four prompts; every layer of the vector on the shortest and longest
    for entries, prompts in ((one_layer, ids), (several, [ids[1], ids[3]])):
        rows = [entries] * len(prompts)
        _assert_exact(lm, vecs, llm, prompts, rows)
        # a policy the plugin ignored would leave every prompt's text as it was
        plain = _run(llm, prompts, [[]] * len(prompts))
        assert _run(llm, prompts, rows) != plain, (mode, policy, entries)


OPERATOR_POLICIES = [
    "after-prompt",
    "all",
    "prompt",
    "from-marker:assistant",
    "window:2-9",
    "window:1-",
]


@pytest.mark.parametrize("policy", OPERATOR_POLICIES)
def test_every_operator_under_every_policy_equals_the_plain_reference(setup, policy):
    lm, llm, vecs, ids, mode = setup
    _compiled_only(mode)
    rows = [
        [{"vector": "joy", "operator": "ablate", "policy": policy}],
        [
            {
                "vector": "calm",
                "operator": "clamp",
                "clamp": [3.0, 3.0],
                "layers": [9],
                "policy": policy,
            }
        ],
        [
            {"vector": "joy", "operator": "ablate", "layers": [9], "policy": policy},
            {"vector": "calm", "multiplier": 4.0, "layers": [9], "policy": policy},
        ],
    ]
    prompts = [ids[0], ids[2], ids[3]]
    _assert_exact(lm, vecs, llm, prompts, rows, tokens=16)
    changed = _run(llm, prompts, rows, tokens=16) != _run(llm, prompts, [[]] * 3, tokens=16)
    assert changed, (mode, policy)


def test_concurrent_mixed_requests_equal_each_alone(setup):
    lm, llm, vecs, ids, mode = setup
    _compiled_only(mode)
    mixes = [
        [{"vector": "joy", "multiplier": 4.0, "policy": "after-prompt"}],
        [],
        [{"vector": "calm", "multiplier": -3.0, "policy": "all"}],
        [{"vector": "joy", "multiplier": 2.0, "layers": [12], "policy": "window:1-5"}],
        [{"vector": "front", "multiplier": 5.0, "policy": "actadd"}],
        [],
        [
            {"vector": "calm", "multiplier": 6.0, "policy": "prompt"},
            {"vector": "joy", "multiplier": -2.0},
        ],
        [{"vector": "joy", "operator": "ablate", "layers": [9]}],
    ]
    prompts = [ids[i % len(ids)] for i in range(len(mixes))]
    together = _run(llm, prompts, mixes)
    alone = [_run(llm, [p], [m])[0] for p, m in zip(prompts, mixes, strict=True)]
    assert together == alone
    plain = _run(llm, prompts, [[]] * len(prompts))
    assert together[1] == plain[1] and together[5] == plain[5]  # unsteered rows untouched
    changed = [i for i in range(len(mixes)) if together[i] != plain[i]]
    assert {0, 2, 4, 6} <= set(changed), changed  # the strong steerings changed their text


def _two_turns(lm, llm, first, second, salts):
    """Turn 1 generates 64 tokens steered by ``first``; turn 2's prompt is turn 1's prompt,
    its generated ids and a new user turn, steered by ``second``. ``salts``: each turn's
    cache salt (turn 2 can read turn 1's blocks only under the same salt)."""
    from steerlab.core.prompts import prompt_ids

    tok = lm.tokenizer
    prompt = prompt_ids(tok, "Tell me a story about a lighthouse keeper.", chat=True)
    turn1 = _run(llm, [prompt], [first], salt=salts[0], tokens=64)[0]
    follow = tok(
        "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )["input_ids"]
    return _run(llm, [prompt + turn1 + follow], [second], salt=salts[1], tokens=24)[0]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("window:1-", "window:1-"),
        ("window:1-", None),
        ("after-prompt", "after-prompt"),
        (None, None),
        ("all", None),
        (None, "after-prompt"),
    ],
)
def test_prefix_caching_equals_recomputation_across_turns(setup, first, second):
    """A block is reused only when this request's recomputation would write the same keys and
    values: turn 2 equals the same request under a fresh cache salt (nothing shared), and
    reads from the cache exactly the blocks before the first position that turn 1 steered
    and turn 2 does not (turn 2 steers only its own generated tokens here)."""
    lm, llm, vecs, ids, mode = setup
    _compiled_only(mode)
    from steerlab.core.prompts import prompt_ids

    def entries(policy):
        return [] if policy is None else [{"vector": "calm", "multiplier": 8.0, "policy": policy}]

    case = f"{first}-{second}"
    # the steering of turn 1 really changes turn 2's prompt (else the case tests nothing)
    if first is not None:
        steered = _two_turns(lm, llm, entries(first), [], (f"a1-{case}", f"a2-{case}"))
        assert steered != _two_turns(lm, llm, [], [], (f"b1-{case}", f"b2-{case}"))

    # one salt for both turns: the cache holds this case's turn 1 and nothing else
    shared = _two_turns(lm, llm, entries(first), entries(second), (case, case))
    read = _cached[0]
    fresh = _two_turns(lm, llm, entries(first), entries(second), (f"c1-{case}", f"c2-{case}"))
    assert _cached[0] == 0
    assert shared == fresh, (first, second)
    # by hand: turn 1 cached its full blocks of prompt and 63 computed tokens; window:1-
    # counts from the first generated token, after-prompt from the last prompt token
    p1 = len(prompt_ids(lm.tokenizer, "Tell me a story about a lighthouse keeper.", chat=True))
    cached = (p1 + 63) // 32 * 32
    differs = {None: cached, "window:1-": p1, "after-prompt": p1 - 1, "all": 0}[first]
    assert read == min(cached, differs // 32 * 32), (first, second, read, p1)


def test_bad_steering_is_refused_before_the_engine_and_the_engine_serves_on(setup):
    from vllm import SamplingParams, TokensPrompt
    from vllm.exceptions import VLLMValidationError

    lm, llm, vecs, ids, mode = setup
    _compiled_only(mode)
    for entries, message in [
        ([{"vector": "nope"}], "unknown vector"),
        ([{"vector": "joy", "layers": [99]}], "layer 99 does not exist"),
        ([{"vector": "joy", "layers": [9, 9]}], "twice"),
        ([{"vector": "joy", "multiplier": float("inf")}], "finite"),
        ([{"vector": "joy", "multiplier": 600}, {"vector": "joy", "multiplier": 600}], "cap"),
        ([{"vector": "../../etc/passwd"}], "unknown vector"),
        ([{"vector": "joy", "policy": "transient"}], "Hugging Face engine"),
        ([{"vector": "joy", "policy": "window:99999999999999999999-"}], "window bounds"),
        ([{"vector": "joy", "policy": "window:600-"}], "context"),
        ([{"vector": "joy", "policy": "from-marker:QQQ"}], "does not occur"),
        ([{"vector": "joy", "operator": "clamp", "clamp": [2, 1]}], "lo > hi"),
        ([{"vector": "joy", "operator": "spin"}], "operator must be one of"),
        ([{"vector": "joy", "site": "mlp"}], "Hugging Face engine"),
        ([{"vector": "joy", "condition": {"vector": "calm", "layer": 9}}], "Hugging Face"),
        (
            [
                {"vector": "joy", "operator": "ablate", "layers": [9]},
                {"vector": "calm", "operator": "ablate", "layers": [9]},
            ],
            "ablate/clamp",
        ),
    ]:
        params = SamplingParams(max_tokens=4, extra_args=extra_args(entries))
        with pytest.raises(VLLMValidationError, match=message):
            llm.generate([TokensPrompt(prompt_token_ids=ids[0])], params, use_tqdm=False)
        assert len(_run(llm, [ids[1]], [[]], tokens=4)[0]) == 4  # and it serves on


def test_compiled_mode_traces_the_steering_with_no_graph_break(setup):
    lm, llm, vecs, ids, mode = setup
    if mode != "compiled":
        pytest.skip("eager mode compiles nothing")
    import torch._dynamo

    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
