"""The server under hostile or careless clients: nothing one request does stalls, starves or
poisons another. Each numbered case of the hardening issue has a test here; all traffic stays
on loopback and every loop is bounded."""

from __future__ import annotations

import time

import httpx
import pytest
import tiny
import torch
from helpers import random_vector, run_threads, start_server

from steerlab.formats import save_vector
from steerlab.serving.app import Limits, Security, create_app, load_vectors

CHAT = "/v1/chat/completions"


def _slow(lm, seconds: float):
    """Make every forward of ``lm`` take at least ``seconds`` (a test-only brake)."""

    def brake(module, args, output):
        time.sleep(seconds)

    return lm.layers.base.register_forward_hook(brake)


def _body(content="hello there", max_tokens=8, **extra):
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    lm = tiny.model("llama")
    vdir = tmp_path_factory.mktemp("vectors")
    save_vector(random_vector(lm, [1, 2], seed=1, scale=2.0), vdir / "happy.safetensors")
    handle = _slow(lm, 0.02)
    app = create_app(
        lm,
        load_vectors(vdir, lm),
        Limits(max_tokens=200, max_batch=8, max_queue=6, max_body_bytes=256_000),
        model_name="tiny",
    )
    base, stop = start_server(app)
    yield base
    stop()
    handle.remove()


def _timed(base: str, body: dict) -> float:
    start = time.monotonic()
    r = httpx.post(base + CHAT, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def _abandon(base: str, body: dict, after: float) -> str:
    """Send a request and give up after ``after`` seconds; what happened, for the main thread."""
    try:
        r = httpx.post(base + CHAT, json=body, timeout=after)
    except httpx.TimeoutException:
        return "gave up"
    return f"answered {r.status_code} within {after} s"


def test_1_abandoned_requests_stop_and_the_next_one_is_served_promptly(slow_server):
    baseline = _timed(slow_server, _body(max_tokens=4))
    # Six clients give up on 200-token requests (about 4 s if they ran on).
    outcomes = run_threads([(_abandon, slow_server, _body(max_tokens=200), 0.3)] * 6)
    assert outcomes == ["gave up"] * 6, outcomes
    time.sleep(0.5)  # the server notices a closed connection within its poll interval
    after = _timed(slow_server, _body(max_tokens=4))
    assert after < baseline + 2.5, (baseline, after)  # a loaded CI machine needs slack


def test_1_a_full_queue_answers_503_with_retry_after(slow_server):
    def ask() -> httpx.Response:
        return httpx.post(slow_server + CHAT, json=_body(max_tokens=40), timeout=60)

    results = run_threads([(ask,)] * 24)
    assert len(results) == 24
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in results if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]["message"]
    assert _timed(slow_server, _body(max_tokens=2)) < 5  # and it serves again right after


def test_2_oversized_bodies_are_refused_before_reading(slow_server):
    start = time.monotonic()
    r = httpx.post(
        slow_server + CHAT,
        content=b'{"messages": "' + b"x" * 5_000_000 + b'"}',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert time.monotonic() - start < 5

    def chunks():
        yield b'{"messages": "'
        for _ in range(100):
            yield b"y" * 10_000
        yield b'"}'

    r = httpx.post(
        slow_server + CHAT, content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413  # no Content-Length: counted while reading
    assert httpx.get(slow_server + "/v1/models", timeout=5).status_code == 200


def test_2_prompt_characters_are_limited_before_tokenizing():
    lm = tiny.model("llama")
    from steerlab.serving.service import ApiError, Service

    service = Service(lm, {}, Limits(max_prompt_chars=100))
    try:
        with pytest.raises(ApiError, match="100 characters"):
            service.job(_body(content="z" * 101), chat=True)
        with pytest.raises(ApiError, match="100 characters"):
            service.job({"prompt": "z" * 101, "max_tokens": 1}, chat=False)
    finally:
        service.runner.close()


def test_3_rows_on_learned_position_models_stop_at_their_own_length():
    """GPT-2 (256 positions): 240 + 4 and 5 + 100 are each valid, and valid together."""
    lm = tiny.model("gpt2")
    app = create_app(lm, {}, Limits(max_tokens=128, max_batch=8), model_name="tiny")
    base, stop = start_server(app)
    try:
        long = {"model": "tiny", "prompt": "a" * 240, "max_tokens": 4}
        short = {"model": "tiny", "prompt": "hello", "max_tokens": 100}
        alone = [httpx.post(base + "/v1/completions", json=b, timeout=60) for b in (long, short)]

        def ask(body: dict) -> httpx.Response:
            return httpx.post(base + "/v1/completions", json=body, timeout=60)

        for _ in range(3):  # the two together, several times, so they share a batch
            results = run_threads([(ask, long), (ask, short)])
            for i in (0, 1):
                assert results[i].status_code == 200, results[i].text
                assert (
                    results[i].json()["choices"][0]["text"] == alone[i].json()["choices"][0]["text"]
                )
    finally:
        stop()


def test_3_a_huge_steering_is_refused_and_cannot_blank_unsteered_rows(slow_server):
    r = httpx.post(
        slow_server + CHAT,
        json=_body(steering=[{"vector": "happy", "multiplier": 1000}]),
        timeout=30,
    )
    assert r.status_code == 200  # large but finite: served
    huge = tiny.model("llama")
    vec = random_vector(huge, [1], scale=1e36)
    from steerlab.serving.service import ApiError, Service

    service = Service(huge, {"huge": vec}, Limits())
    try:
        with pytest.raises(ApiError, match="overflows"):
            service.job(_body(steering=[{"vector": "huge", "multiplier": 1000}]), chat=True)
    finally:
        service.runner.close()


def test_3_a_zero_row_gets_exactly_nothing_added(llama):
    """The masked add: an unsteered row next to a steered one is bit-for-bit unsteered."""
    from steerlab import Sampling, Steering, decode
    from steerlab.core.prompts import pad_batch

    seqs = [llama.tokenizer(p)["input_ids"] for p in ("hello there", "hi")]
    ids, mask = pad_batch(seqs, 0)
    big = Steering(random_vector(llama, [1, 2], scale=1e30), 1.0)
    greedy = Sampling(8, stop_at_eos=False)
    both = decode(llama.model, ids, mask, [[big], []], greedy, return_logits=True)
    plain = decode(llama.model, ids, mask, [[], []], greedy, return_logits=True)
    assert torch.equal(both.logits[1], plain.logits[1])
    assert torch.isfinite(both.logits[1]).all()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "steering": [{"vector": "happy", "multiplier": '
            + b"9" * 400
            + b"}]}",
            "multiplier",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "temperature": '
            + b"9" * 400
            + b"}",
            "temperature",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}",
            "max_tokens",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "seed": '
            + str(2**70).encode()
            + b"}",
            "seed",
        ),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "top_p": 1e999}',
            "top_p",
        ),
    ],
)
def test_4_numbers_and_nesting_get_400_not_500(slow_server, raw, fragment):
    r = httpx.post(
        slow_server + CHAT,
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def keyed_server():
    lm = tiny.model("llama")
    vec = random_vector(lm, [1], seed=3)
    app = create_app(
        lm,
        {"calm": vec},
        Limits(max_tokens=16),
        model_name="tiny",
        security=Security(api_key="s3cret"),
    )
    base, stop = start_server(app)
    yield base
    stop()


def test_5_api_key_host_origin_and_content_type(keyed_server):
    key = {"Authorization": "Bearer s3cret"}
    assert httpx.get(keyed_server + "/v1/models").status_code == 401
    assert (
        httpx.get(keyed_server + "/v1/models", headers={"Authorization": "Bearer no"}).status_code
        == 401
    )
    assert httpx.get(keyed_server + "/v1/models", headers=key).status_code == 200
    assert httpx.get(keyed_server + "/").status_code == 200  # the page itself holds no data
    rebinding = httpx.get(keyed_server + "/v1/models", headers={**key, "Host": "evil.example"})
    assert rebinding.status_code == 421
    cross = httpx.post(
        keyed_server + CHAT,
        content=b'{"messages": [{"role": "user", "content": "x"}]}',
        headers={**key, "Content-Type": "text/plain", "Origin": "http://evil.example"},
    )
    assert cross.status_code == 403
    plain = httpx.post(
        keyed_server + CHAT,
        content=b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}',
        headers={**key, "Content-Type": "text/plain"},
    )
    assert plain.status_code == 415
    ok = httpx.post(keyed_server + CHAT, json=_body(max_tokens=2), headers=key, timeout=30)
    assert ok.status_code == 200
    same_origin = httpx.post(
        keyed_server + CHAT,
        json=_body(max_tokens=2),
        headers={**key, "Origin": keyed_server},
        timeout=30,
    )
    assert same_origin.status_code == 200


def test_5_vectors_list_hides_paths_unless_asked(tmp_path):
    lm = tiny.model("llama")
    vec = random_vector(lm, [1], seed=3)
    hidden = create_app(lm, {"v": vec}, Limits(), model_name="tiny")
    shown = create_app(
        lm, {"v": vec}, Limits(), model_name="tiny", security=Security(expose_metadata=True)
    )
    for app, expect in ((hidden, False), (shown, True)):
        base, stop = start_server(app)
        try:
            entry = httpx.get(base + "/v1/vectors").json()["data"][0]
            assert ("metadata" in entry) is expect
            assert {"id", "layers", "norms", "method"} <= set(entry)
        finally:
            stop()


def test_6_a_bad_file_in_the_vectors_directory_is_skipped_with_a_warning(tmp_path):
    lm = tiny.model("llama")
    save_vector(random_vector(lm, [1]), tmp_path / "good.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a vector")
    warnings: list[str] = []
    vectors = load_vectors(tmp_path, lm, warn=warnings.append)
    assert list(vectors) == ["good"]
    assert len(warnings) == 1 and "broken.safetensors" in warnings[0] and "\n" not in warnings[0]
