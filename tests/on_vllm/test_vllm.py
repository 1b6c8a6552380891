"""steerlab inside stock vLLM (the CPU build): exact policies on continuous batches.

One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the default model in
float32 serves every test; steerlab's Hugging Face ``decode`` is the reference.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed here (make test builds .venv-vllm)"
)

from steerlab import Sampling, Steering, SteeringVector, decode, load_model, save_vector  # noqa: E402
from steerlab.core.policy import Policy  # noqa: E402
from steerlab.core.prompts import encode_prompts, left_padded  # noqa: E402
from steerlab.vllm import extra_args, model_dir  # noqa: E402

pytestmark = pytest.mark.slow
TOKENS = 32
PROMPTS = [
    "Write a sentence about the ocean.",
    "Hi",
    "What do you think of cats? Answer in one sentence, please.",
    "Describe your neighbourhood to a visitor who has never been there before.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
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
    os.environ["STEERLAB_VECTORS"] = str(folder)
    from steerlab.vllm import plugin

    plugin._registry = None  # this process may have loaded an empty registry before
    llm = vllm.LLM(
        model=str(model_dir("smollm2-135m")),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=8,
        enable_prefix_caching=True,
        seed=0,
    )
    ids = [
        encode_prompts(lm.tokenizer, [p])[0][0].tolist() for p in PROMPTS
    ]  # chat-templated ids, unpadded
    return lm, llm, vecs, ids


def _vllm(llm, prompts, entries_per_row, salt=None):
    from vllm import SamplingParams, TokensPrompt

    params = [
        SamplingParams(
            max_tokens=TOKENS,
            temperature=0.0,
            ignore_eos=True,
            extra_args=extra_args(e) if e else None,
        )
        for e in entries_per_row
    ]
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _hf(lm, vecs, prompts, entries_per_row):
    rows = []
    for entries in entries_per_row:
        rows.append(
            [
                Steering(
                    vecs[e["vector"]],
                    e.get("multiplier", 1.0),
                    None if e.get("layers") is None else tuple(e["layers"]),
                    Policy.parse(e.get("policy", "after-prompt")),
                    operator=e.get("operator", "add"),
                    clamp=None if e.get("clamp") is None else tuple(e["clamp"]),
                )
                for e in entries
            ]
        )
    ids, mask = left_padded(lm.tokenizer, prompts)
    out = decode(
        lm.model,
        ids,
        mask,
        rows,
        Sampling(TOKENS, stop_at_eos=False),
        layer_map=lm.layers,
        tokenizer=lm.tokenizer,
    )
    return out.tokens.tolist()


POLICIES = [
    ("after-prompt", "joy"),
    ("all", "joy"),
    ("prompt", "calm"),
    ("from-marker:assistant", "joy"),
    ("actadd", "front"),
    ("window:2-9", "calm"),
    ("window:0-", "joy"),
]


@pytest.mark.parametrize(("policy", "vector"), POLICIES)
def test_every_policy_equals_the_hugging_face_engine(setup, policy, vector):
    lm, llm, vecs, ids = setup
    one_layer = [{"vector": vector, "multiplier": 4.0, "layers": [9], "policy": policy}]
    several = [{"vector": vector, "multiplier": 3.0, "policy": policy}]
    for entries in (one_layer, several):
        rows = [entries] * len(ids)
        assert _vllm(llm, ids, rows) == _hf(lm, vecs, ids, rows), (policy, entries)


def test_ablate_and_clamp_equal_the_hugging_face_engine(setup):
    lm, llm, vecs, ids = setup
    rows = [
        [{"vector": "joy", "operator": "ablate", "policy": "all"}],
        [{"vector": "calm", "operator": "clamp", "clamp": [3.0, 3.0], "layers": [9]}],
        [
            {"vector": "joy", "operator": "ablate", "layers": [9]},
            {"vector": "calm", "multiplier": 4.0, "layers": [9]},
        ],
        [],
    ]
    together = _vllm(llm, ids, rows)
    assert together == _hf(lm, vecs, ids, rows)
    assert together[1] != _vllm(llm, ids[1:2], [[]])[0]  # the clamp changed the text


def test_concurrent_mixed_requests_equal_each_alone(setup):
    lm, llm, vecs, ids = setup
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
        [{"vector": "joy", "multiplier": 8.0, "layers": [9]}],
    ]
    prompts = [ids[i % len(ids)] for i in range(len(mixes))]
    together = _vllm(llm, prompts, mixes)
    alone = [_vllm(llm, [p], [m])[0] for p, m in zip(prompts, mixes, strict=True)]
    assert together == alone
    plain = _vllm(llm, prompts, [[]] * len(prompts))
    assert together[1] == plain[1] and together[5] == plain[5]  # unsteered rows untouched
    assert together[0] != plain[0]


def test_prefix_caching_never_mixes_steered_and_unsteered_blocks(setup):
    lm, llm, vecs, ids = setup
    long = ids[3] * 3  # several full KV blocks of shared prefix
    steered = [{"vector": "calm", "multiplier": 4.0, "policy": "all"}]
    a = _vllm(llm, [long], [steered])
    b = _vllm(llm, [long], [[]])
    c = _vllm(llm, [long], [steered])
    assert a == c and a != b
    assert a == _hf(lm, vecs, [long], [steered])
    assert b == _hf(lm, vecs, [long], [[]])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"vector": "nope"}], "unknown vector"),
        ([{"vector": "joy", "layers": [99]}], "has no layer 99"),
        ([{"vector": "joy", "multiplier": float("inf")}], "finite"),
        ([{"vector": "../../etc/passwd"}], "unknown vector"),
        ([{"vector": "joy", "policy": "transient"}], "Hugging Face engine"),
        ([{"vector": "joy", "operator": "clamp", "clamp": [2, 1]}], "lo > hi"),
        ([{"vector": "joy", "operator": "spin"}], "operator must be one of"),
        ([{"vector": "joy", "site": "mlp"}], "Hugging Face engine only"),
        ([{"vector": "joy", "condition": {"vector": "calm", "layer": 9}}], "Hugging Face"),
    ],
)
def test_bad_steering_is_refused_before_the_engine(setup, entries, message):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=message):
        SamplingParams(max_tokens=4, extra_args=extra_args(entries))
