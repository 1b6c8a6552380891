"""The second serving audit, each numbered case reproduced: reproducible seeded sampling,
fields checked where they enter, OpenAI fields honoured or refused, connection limits, the
batcher's queue, and Origin checks. All traffic stays on loopback; loops are bounded."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time

import httpx
import pytest
import tiny
from helpers import random_vector, run_threads

from steerlab.core.jobs import Job, QueueFull
from steerlab.formats import save_vector
from steerlab.serving.app import Limits, Security, create_app, load_vectors
from steerlab.serving.batcher import Batcher

CHAT = "/v1/chat/completions"


def _chat(content="hello there", max_tokens=12, **extra):
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


def _server(limits: Limits, security: Security | None = None):
    """The app behind the real connection limits (serving/connections.py), on a free port."""
    import uvicorn

    from steerlab.serving.connections import protocol

    lm = tiny.model("llama")
    import tempfile
    from pathlib import Path

    vdir = Path(tempfile.mkdtemp())
    save_vector(random_vector(lm, [1, 2], seed=1, scale=2.0), vdir / "happy.safetensors")
    app = create_app(lm, load_vectors(vdir, lm), limits, model_name="tiny", security=security)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning",
        http=protocol(limits.max_connections, limits.header_timeout), timeout_keep_alive=5,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(base + "/v1/models", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return base, stop


@pytest.fixture(scope="module")
def served():
    base, stop = _server(
        Limits(max_tokens=64, header_timeout=1.0, body_timeout=2.0, max_connections=12)
    )
    yield base
    stop()


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# ----- 1. sampling you can reproduce ------------------------------------------------------------
def test_1_a_seeded_row_samples_the_same_alone_and_in_any_batch(llama):
    """The batcher's rows each draw from their own generator: a seeded row gives the same
    tokens alone and batched with rows of other seeds (or none), in any order."""
    ids = llama.tokenizer("hello there")["input_ids"]
    batcher = Batcher(llama, max_batch=8, max_queue=8)
    try:

        def run(seeds: list[int | None]) -> list[list[int]]:
            got: list[list[int]] = [[] for _ in seeds]
            done = threading.Event()
            left = [len(seeds)]
            lock = threading.Lock()

            def emitter(r: int):
                def emit(kind, value):
                    if kind == "token":
                        got[r].append(int(value))
                    elif kind in ("done", "error"):
                        with lock:
                            left[0] -= 1
                            if left[0] == 0:
                                done.set()

                return emit

            jobs = [
                Job(ids=ids, steering=[], max_tokens=16, temperature=1.0, top_p=0.9, seed=s,
                    emit=emitter(r))
                for r, s in enumerate(seeds)
            ]  # fmt: skip
            batcher.submit(jobs)
            assert done.wait(60)
            return got

        alone = run([7])[0]
        assert run([7, 8])[0] == alone
        assert run([3, None, 7])[2] == alone
        assert run([None, 7, 7])[1:] == [alone, alone]
        unseeded = [run([None])[0] for _ in range(3)]
        assert len({tuple(t) for t in unseeded}) > 1  # fresh randomness, not seed 0
    finally:
        batcher.close()


def test_1_seeded_requests_agree_over_http_alone_and_concurrently(served):
    def post(body: dict) -> httpx.Response:
        return httpx.post(served + CHAT, json=body, timeout=60)

    seeded = _chat(temperature=1.0, seed=7)
    alone = _text(post(seeded))
    for _ in range(3):  # together with a request of another seed, often in one batch
        results = run_threads([(post, seeded), (post, _chat(temperature=1.0, seed=8))])
        assert _text(results[0]) == alone


# ----- 2. values inside the accepted ranges ---------------------------------------------------
@pytest.mark.parametrize("extra", [{"temperature": 1e-300}, {"temperature": 5e-324},
                                   {"temperature": 1.0, "top_p": 1e-300}])  # fmt: skip
def test_2_tiny_temperatures_and_top_p_decode_at_their_limit(served, extra):
    greedy = _text(httpx.post(served + CHAT, json=_chat(), timeout=60))
    assert _text(httpx.post(served + CHAT, json=_chat(**extra), timeout=60)) == greedy


@pytest.mark.parametrize("where", ["content", "role", "prompt"])
def test_2_lone_surrogates_are_400_not_500(served, where):
    if where == "prompt":
        raw, path = '{"prompt": "hi \\ud800", "max_tokens": 2}', "/v1/completions"
    elif where == "content":
        raw, path = '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', CHAT
    else:
        raw, path = '{"messages": [{"role": "\\ud800", "content": "hi"}], "max_tokens": 2}', CHAT
    r = httpx.post(served + path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]


def test_2_a_window_beyond_any_context_is_400(served):
    r = httpx.post(
        served + CHAT,
        json=_chat(steering=[{"vector": "happy", "policy": "window:99999999999999999999-"}]),
    )
    assert r.status_code == 400 and "window bounds" in r.json()["error"]["message"]
    r = httpx.post(
        served + CHAT, json=_chat(steering=[{"vector": "happy", "policy": "window:300-"}])
    )
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_2_an_unexpected_error_is_a_json_500_with_a_request_id(llama, caplog):
    from steerlab.serving.service import Service

    app = create_app(llama, {}, Limits(), model_name="tiny")
    from helpers import start_server

    base, stop = start_server(app)
    try:
        service: Service = app.app.state.service

        def broken(body, chat):
            raise RuntimeError("boom")

        original, service.job = service.job, broken
        with caplog.at_level("ERROR", logger="steerlab.serving"):
            r = httpx.post(base + CHAT, json=_chat(), timeout=30)
        service.job = original
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        rid = r.headers["x-request-id"]
        assert rid in r.json()["error"]["message"]
        lines = [rec for rec in caplog.records if rid in rec.getMessage()]
        assert len(lines) == 1 and "RuntimeError: boom" in lines[0].getMessage()
        assert not any("Traceback" in rec.getMessage() for rec in caplog.records)
        assert httpx.post(base + CHAT, json=_chat(max_tokens=2), timeout=30).status_code == 200
    finally:
        stop()


# ----- 3. duplicate layers and the multiplier cap ----------------------------------------------
def test_3_repeated_layers_and_a_summed_multiplier_over_the_cap_are_400(served):
    for steering, fragment in [
        ([{"vector": "happy", "layers": [1, 1], "multiplier": 4}], "twice"),
        ([{"vector": "happy", "layers": [1] * 4096, "multiplier": 1}], "twice"),
        ([{"vector": "happy", "layers": [1], "multiplier": 600}] * 2, "cap"),
    ]:
        r = httpx.post(served + CHAT, json=_chat(steering=steering), timeout=30)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    ok = [
        {"vector": "happy", "layers": [1], "multiplier": 500},
        {"vector": "happy", "layers": [2], "multiplier": 900},
    ]
    assert httpx.post(served + CHAT, json=_chat(steering=ok), timeout=60).status_code == 200


# ----- 4. OpenAI fields ---------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_4_stop_strings_are_honoured(served, stream):
    full = _text(httpx.post(served + CHAT, json=_chat(max_tokens=24), timeout=60))
    stop = next(ch for ch in full[3:] if ch.strip())  # a character the text really contains
    body = _chat(max_tokens=24, stop=[stop, "@@@@"], stream=stream)
    if not stream:
        r = httpx.post(served + CHAT, json=body, timeout=60)
        choice = r.json()["choices"][0]
        text, reason = choice["message"]["content"], choice["finish_reason"]
    else:
        parts, reason = [], None
        with httpx.stream("POST", served + CHAT, json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    parts.append(choice["delta"].get("content", ""))
                    reason = choice["finish_reason"] or reason
        text = "".join(parts)
    assert text == full[: full.index(stop)] and reason == "stop"


@pytest.mark.parametrize(
    ("field", "value"),
    [("logprobs", True), ("top_logprobs", 5), ("n", 2), ("presence_penalty", 0.5),
     ("logit_bias", {"5": 1}), ("response_format", {"type": "json_object"}), ("tools", [{}])],
)  # fmt: skip
def test_4_fields_this_server_does_not_do_are_refused_by_name(served, field, value):
    r = httpx.post(served + CHAT, json=_chat(**{field: value}), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert field in r.json()["error"]["message"]


def test_4_completions_logprobs_and_duplicate_keys(served):
    r = httpx.post(
        served + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logprobs": 5}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    raw = '{"messages": [{"role": "user", "content": "hi"}], "steering": [{"vector": "nope"}], "steering": null}'
    r = httpx.post(served + CHAT, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "repeats the key 'steering'" in r.json()["error"]["message"]


# ----- 5. connection limits -----------------------------------------------------------------------
def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_5_silent_and_trickling_connections_are_closed(served):
    silent = _connect(served)
    start = time.monotonic()
    assert b"408" in silent.recv(4096)  # the header deadline (1 s here) answers and closes
    assert time.monotonic() - start < 5
    trickle = _connect(served)
    start = time.monotonic()
    closed = False
    for ch in b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n":
        try:
            trickle.sendall(bytes([ch]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
    assert closed or time.monotonic() - start < 10
    silent.close()
    trickle.close()


def test_5_a_trickled_body_hits_the_deadline_counted_from_its_start(served):
    sock = _connect(served)
    payload = json.dumps(_chat(max_tokens=2)).encode()
    sock.sendall(
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
    )
    start, answer = time.monotonic(), b""
    for byte in payload:  # 2 s body timeout here; the body would take ~10 s
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            answer += sock.recv(4096)
        sock.setblocking(True)
        if answer:
            break
    assert b" 408 " in answer and time.monotonic() - start < 6, answer[:200]
    sock.close()


def test_5_connections_over_the_cap_get_a_clear_503_and_the_server_recovers(served):
    idle = [_connect(served) for _ in range(12)]  # the cap in this fixture
    try:
        extra = _connect(served)
        assert b"503" in extra.recv(4096)
        extra.close()
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert httpx.post(served + CHAT, json=_chat(max_tokens=2), timeout=30).status_code == 200


# ----- 6. the batcher never blocks on its own queue -------------------------------------------------
def test_6_the_batcher_never_blocks_on_its_own_queue(llama):
    """The forced timing of the audit: while the worker holds jobs it set aside (other
    sampling settings), clients fill the queue. The worker must go on; every job ends."""

    class Forced(Batcher):
        def __init__(self, *args, **kwargs):
            self.filled = threading.Event()
            self.extra: list[Job] = []
            super().__init__(*args, **kwargs)

        def _next(self, block):
            try:
                return super()._next(block)
            except queue.Empty:
                if not self.filled.is_set():
                    # the worker has drained the queue into its batch and the jobs it sets
                    # aside: clients fill every free place of the queue before it puts them back
                    self.filled.set()
                    while True:
                        job = _job(temperature=0.5)
                        try:
                            self.submit(job)
                        except QueueFull:
                            break
                        self.extra.append(job)
                raise

    ends: list[str] = []
    lock = threading.Lock()

    def _job(temperature: float) -> Job:
        def emit(kind, value):
            if kind in ("done", "error"):
                with lock:
                    ends.append(kind)

        ids = llama.tokenizer("hi")["input_ids"]
        return Job(ids=ids, steering=[], max_tokens=2, temperature=temperature, top_p=1.0,
                   seed=1, emit=emit)  # fmt: skip

    batcher = Forced(llama, max_batch=4, max_queue=4)
    try:
        first = [_job(0.0), _job(0.7), _job(0.0), _job(0.9)]
        for job in first:
            batcher.submit(job)
        deadline = time.monotonic() + 60
        while len(ends) < len(first) + len(batcher.extra) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.filled.is_set() and batcher.extra
        assert len(ends) == len(first) + len(batcher.extra), (len(ends), len(batcher.extra))
        later = _job(0.0)
        batcher.submit(later)  # and it still takes work
        deadline = time.monotonic() + 30
        while len(ends) < len(first) + len(batcher.extra) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ends) == len(first) + len(batcher.extra) + 1
    finally:
        batcher.close()
    assert not batcher.thread.is_alive()
    with pytest.raises(queue.Empty):
        batcher.jobs.get_nowait()


# ----- 7. Origin ------------------------------------------------------------------------------------
def test_7_origin_is_compared_with_scheme_host_and_port():
    base, stop = _server(
        Limits(max_tokens=8), Security(allowed_origins=("http://example.org:8080",))
    )
    port = base.rsplit(":", 1)[1]
    try:

        def status(origin: str) -> int:
            return httpx.post(
                base + CHAT, json=_chat(max_tokens=1), headers={"Origin": origin}, timeout=30
            ).status_code

        assert status(f"http://127.0.0.1:{port}") == 200  # its own origin
        assert status("http://localhost:9999") == 403  # same host name, another port
        assert status(f"https://127.0.0.1:{port}") == 403  # another scheme
        assert status("null") == 403
        assert status("http://example.org:8080") == 200  # allowed by name
        assert status("http://example.org") == 403
    finally:
        stop()
    base, stop = _server(Limits(max_tokens=8), Security(allowed_origins=("null",)))
    try:
        r = httpx.post(
            base + CHAT, json=_chat(max_tokens=1), headers={"Origin": "null"}, timeout=30
        )
        assert r.status_code == 200
    finally:
        stop()
