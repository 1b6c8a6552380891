"""A client that leaves while its tokens are flowing frees the server at once.

Each case opens a raw socket, sends a long request, waits until the server is producing its
tokens (a counter on the model's forwards), closes the socket, and then times a short
request: it must complete within its usual time + 1 s. Before the fix, a non-streaming
request was only checked for a disconnect when no token had arrived for 0.25 s, so an
abandoned one ran to its end while its tokens flowed.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import tiny
from helpers import random_vector, start_server

from steerlab.formats import save_vector
from steerlab.serving.app import Limits, create_app, load_vectors

CHAT = "/v1/chat/completions"
BRAKE = 0.03  # seconds per forward: 200 tokens take 6 s


class _Forwards:
    """Counts the model's forwards and slows each one down (a test-only brake)."""

    def __init__(self, lm) -> None:
        self.count = 0
        self.handle = lm.layers.base.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.count += 1
        time.sleep(BRAKE)

    def wait_for(self, more: int, timeout: float = 20.0) -> None:
        start, target = time.monotonic(), self.count + more
        while self.count < target:
            assert time.monotonic() - start < timeout, "the server produced no tokens"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lm = tiny.model("llama")
    vdir = tmp_path_factory.mktemp("vectors")
    save_vector(random_vector(lm, [1, 2], seed=1, scale=2.0), vdir / "happy.safetensors")
    forwards = _Forwards(lm)
    app = create_app(lm, load_vectors(vdir, lm), Limits(max_tokens=400), model_name="tiny")
    base, stop = start_server(app)
    yield base, forwards
    stop()
    forwards.handle.remove()


def _chat(max_tokens: int, **extra) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": max_tokens,
        **extra,
    }


def _timed_short(base: str) -> float:
    start = time.monotonic()
    r = httpx.post(base + CHAT, json=_chat(4), timeout=60)
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def _open(base: str, path: str, body: dict) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock.sendall(head + payload)
    return sock


def _read_events(sock: socket.socket, count: int) -> bytes:
    """Read from a streaming response until ``count`` server-sent events have arrived."""
    data = b""
    while data.count(b"data: ") < count:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream early"
        data += chunk
    return data


@pytest.mark.parametrize("kind", ["non-streaming", "streaming", "compare"])
def test_a_client_leaving_while_tokens_flow_frees_the_server(server, kind):
    base, forwards = server
    usual = min(_timed_short(base) for _ in range(2))
    if kind == "compare":
        body = {
            **_chat(200),
            "steering": {"vector": "happy", "layers": [1]},
            "multipliers": [0, 2, 4],
        }
        sock = _open(base, "/v1/steerlab/compare", body)
    else:
        sock = _open(base, CHAT, _chat(200, stream=kind == "streaming"))
    if kind == "non-streaming":
        forwards.wait_for(10)  # its tokens are flowing; nothing is sent until the end
    else:
        _read_events(sock, 4)  # tokens have reached the client
        forwards.wait_for(2)
    sock.close()
    start = forwards.count
    after = _timed_short(base)
    assert after < usual + 1.0, (kind, usual, after)
    # and the abandoned rows really stopped: 200 tokens would have taken 6 s more
    assert forwards.count - start < 40, forwards.count - start
