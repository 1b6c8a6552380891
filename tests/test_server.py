"""The OpenAI-compatible server: the real openai client on loopback, isolation, validation."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import tiny
from helpers import random_vector, start_server

from steerlab import SteerlabError
from steerlab.formats import save_vector
from steerlab.serving.app import Limits, create_app, load_vectors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lm = tiny.model("llama")
    vdir = tmp_path_factory.mktemp("vectors")
    save_vector(random_vector(lm, [1, 2], seed=1, scale=2.0), vdir / "happy.safetensors")
    save_vector(random_vector(lm, [1, 3], seed=2, scale=2.0), vdir / "sad.safetensors")
    save_vector(random_vector(lm, [2], seed=3, scale=2.0), vdir / "formal.safetensors")
    (vdir / "notes.txt").write_text("ignored")
    vectors = load_vectors(vdir, lm)
    app = create_app(lm, vectors, Limits(max_tokens=64, max_batch=8), model_name="tiny")
    base, stop = start_server(app)
    yield base
    stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_vectors(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    data = httpx.get(server + "/v1/vectors").json()["data"]
    assert [v["id"] for v in data] == ["formal", "happy", "sad"]
    assert data[1]["layers"] == [1, 2] and data[1]["model"]["architecture"] == "llama"
    # names, layers, norms and method, but no local paths or notes without --expose-metadata
    assert "metadata" not in data[1] and "dataset" not in json.dumps(data)


def test_chat_completion_with_openai_client_steered_and_not(client):
    messages = [{"role": "user", "content": "hello there"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    steered = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        extra_body={"steering": [{"vector": "happy", "multiplier": 8, "layers": [1]}]},
    )
    assert plain.choices[0].message.content and steered.choices[0].message.content
    assert plain.choices[0].message.content != steered.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.prompt_tokens > 0
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    assert again.choices[0].message.content == plain.choices[0].message.content


def test_streaming_chat_and_completions(client):
    messages = [{"role": "user", "content": "stream me"}]
    steering = {"steering": [{"vector": "sad", "multiplier": 6, "policy": "transient"}]}
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, extra_body=steering
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=16, stream=True, extra_body=steering
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    done = client.completions.create(model="tiny", prompt="once upon", max_tokens=10)
    parts = list(
        client.completions.create(model="tiny", prompt="once upon", max_tokens=10, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text


def test_concurrent_requests_do_not_leak_steering(client):
    """Many concurrent greedy requests with different vectors and multipliers equal the same
    requests served alone."""
    requests = []
    for i in range(16):
        vec = ["happy", "sad", "formal", None][i % 4]
        steering = (
            []
            if vec is None
            else [
                {
                    "vector": vec,
                    "multiplier": [-6, 3, 9][i % 3],
                    "policy": ["after-prompt", "all", "transient"][i % 3],
                }
            ]
        )
        requests.append(
            ({"role": "user", "content": f"prompt number {i} " + "x" * (i % 5)}, steering)
        )

    def ask(item):
        message, steering = item
        r = client.chat.completions.create(
            model="tiny",
            messages=[message],
            max_tokens=10 + len(message["content"]) % 4,
            extra_body={"steering": steering},
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(ask, requests))
    alone = [ask(item) for item in requests]
    assert together == alone
    assert len(set(alone)) > 8


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"steering": [{"vector": "nope", "multiplier": 1}]}, 404, "unknown vector 'nope'"),
        ({"steering": [{"vector": "../../etc/passwd", "multiplier": 1}]}, 404, "unknown vector"),
        (
            {"steering": [{"vector": "happy", "multiplier": 1, "layers": [7]}]},
            400,
            "layer 7 does not exist in the served model",
        ),
        ({"steering": [{"vector": "happy", "multiplier": 1e9}]}, 400, "multiplier must be within"),
        ({"steering": [{"vector": "happy", "multiplier": "big"}]}, 400, "finite number"),
        ({"steering": [{"vector": "happy", "policy": "actadd"}]}, 400, "position-wise"),
        ({"steering": [{"vector": "happy", "policy": "from-marker:ZZZ"}]}, 400, "does not occur"),
        ({"steering": {"vector": "happy"}}, 400, "must be a list"),
        (
            {"steering": [{"vector": "happy", "operator": "clamp", "clamp": [3, 1]}]},
            400,
            "lo > hi",
        ),
        ({"steering": [{"vector": "happy", "operator": "clamp", "clamp": "0,1"}]}, 400, "[lo, hi]"),
        ({"steering": [{"vector": "happy", "operator": "clamp"}]}, 400, "needs clamp"),
        ({"steering": [{"vector": "happy", "operator": "spin"}]}, 400, "operator must be one of"),
        (
            {"steering": [{"vector": "happy", "condition": {"vector": "zz", "layer": 1}}]},
            404,
            "unknown vector 'zz'",
        ),
        (
            {"steering": [{"vector": "happy", "condition": {"vector": "sad", "layer": 2}}]},
            400,
            "threshold",
        ),
        (
            {
                "steering": [
                    {"vector": "happy", "condition": {"vector": "sad", "layer": 2, "threshold": 0}}
                ]
            },
            400,
            "has no layer 2",
        ),
        ({"steering": [{"vector": "happy", "condition": [1]}]}, 400, "must be an object"),
        ({"steering": [{"vector": "happy", "site": "ffn"}]}, 400, "site must be one of"),
        (
            {"steering": [{"vector": "happy", "operator": "ablate", "multiplier": 4}]},
            400,
            "add only",
        ),
        ({"max_tokens": 100000}, 400, "above this server's limit"),
        ({"max_tokens": 0}, 400, "positive integer"),
        ({"messages": []}, 400, "'messages'"),
        ({"temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x" * 300}], "max_tokens": 10}, 400, "context"),
    ],
)
def test_validation_errors_are_openai_style(server, body, status, fragment):
    payload = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **body,
    }
    r = httpx.post(server + "/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_ablate_and_clamp_requests_equal_decode(server, client):
    from steerlab import Sampling, Steering, decode
    from steerlab.core.prompts import encode_prompts

    lm = tiny.model("llama")
    vector = random_vector(lm, [1, 2], seed=1, scale=2.0)  # the server's "happy"
    cases = [
        ({"operator": "ablate", "policy": "all"}, dict(operator="ablate", policy="all")),
        (
            {"operator": "clamp", "clamp": [1.5, 1.5], "layers": [2]},
            dict(operator="clamp", clamp=(1.5, 1.5), layers=(2,)),
        ),
    ]
    for entry, kwargs in cases:
        r = client.completions.create(
            model="tiny",
            prompt="the cat sat",
            max_tokens=8,
            extra_body={"steering": [{"vector": "happy", **entry}]},
        )
        ids, mask = encode_prompts(lm.tokenizer, ["the cat sat"], chat=False)
        out = decode(lm.model, ids, mask, [Steering(vector, **kwargs)], Sampling(8))
        assert r.choices[0].text == lm.tokenizer.decode(out.tokens[0], skip_special_tokens=True)


def test_conditional_steering_applies_only_where_the_condition_holds(client):
    def ask(steering):
        r = client.completions.create(
            model="tiny", prompt="the cat sat", max_tokens=8, extra_body={"steering": steering}
        )
        return r.choices[0].text

    plain = {"vector": "happy", "multiplier": 6, "policy": "all"}
    always = {"vector": "sad", "layer": 1, "threshold": -1e6}
    never = {"vector": "sad", "layer": 1, "threshold": 1e6}
    assert ask([{**plain, "condition": always}]) == ask([plain]) != ask([])
    assert ask([{**plain, "condition": never}]) == ask([])
    assert ask([{**plain, "condition": {**never, "above": False}}]) == ask([plain])


def test_bad_json_and_openai_client_error(server, client):
    r = httpx.post(
        server + "/v1/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"steering": [{"vector": "ghost"}]},
        )
    # the server still answers after errors: no slot was lost
    ok = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3
    )
    assert ok.choices[0].message.content is not None


def test_binds_loopback_by_default_and_rejects_bad_vector_dirs(tmp_path):
    import inspect

    from steerlab.serving import server as module

    assert inspect.signature(module.serve).parameters["host"].default == "127.0.0.1"
    lm = tiny.model("llama")
    with pytest.raises(SteerlabError, match="does not exist"):
        load_vectors(tmp_path / "absent", lm)
    other = tiny.model("llama", seed=9)
    save_vector(random_vector(other, [1]), tmp_path / "foreign.safetensors")
    with pytest.raises(SteerlabError, match="foreign.safetensors: .*--allow-model-mismatch"):
        load_vectors(tmp_path, lm)
    assert list(load_vectors(tmp_path, lm, allow_mismatch=True)) == ["foreign"]


def test_playground_page_is_served(server):
    page = httpx.get(server + "/").text
    for element in (
        'id="prompt"',
        'id="vector"',
        'id="multiplier"',
        'id="policy"',
        'id="factors"',
        'id="rows"',
        'id="explain"',
        'id="error"',
    ):
        assert element in page
    assert json.loads(httpx.get(server + "/v1/vectors").text)["object"] == "list"
