"""A storm on a real ``steerlab serve`` process (loopback only, bounded loops).

64 requests from 16 clients with mixed steering, some abandoned and some malformed: every
completed response equals the same request served alone, every bad one gets its 4xx, the
server's memory returns to within 10% of where it started, and a request sent after the
storm completes in its usual time.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import tiny
from helpers import random_vector

from steerlab.formats import save_vector

CHAT = "/v1/chat/completions"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    lm = tiny.model("llama", layers=4, hidden=128)
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "vectors").mkdir()
    for seed, name in ((1, "happy"), (2, "sad"), (3, "formal")):
        save_vector(
            random_vector(lm, [1, 2], seed=seed, scale=2.0),
            root / "vectors" / f"{name}.safetensors",
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "steerlab.cli",
            "serve",
            "--model",
            str(root / "model"),
            "--vectors",
            str(root / "vectors"),
            "--port",
            str(port),
            "--max-tokens",
            "200",
            "--max-queue",
            "32",
            "--max-batch",
            "8",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(base + "/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode()) from None
                time.sleep(0.1)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _request(i: int) -> tuple[str, dict]:
    """The i-th request of the storm: ("good" | "abandon" | "bad", body)."""
    rng = random.Random(i)
    vector = ["happy", "sad", "formal", None][i % 4]
    steering = (
        []
        if vector is None
        else [
            {
                "vector": vector,
                "multiplier": rng.choice([-6, -2, 3, 8]),
                "policy": rng.choice(["after-prompt", "all", "transient", "window:0-5", "prompt"]),
            }
        ]
    )
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"storm {i} " + "ab" * (i % 7)}],
        "max_tokens": 6 + i % 10,
        "steering": steering,
    }
    if i % 8 == 3:
        return "abandon", {**body, "max_tokens": 200}
    if i % 8 == 5:
        bad = [
            {**body, "steering": [{"vector": "nope"}]},
            {**body, "temperature": 10**400},
            {**body, "max_tokens": 0},
            {**body, "steering": [{"vector": "happy", "policy": "window:9-2"}]},
        ]
        return "bad", bad[i % 4]
    return "good", body


def test_storm_of_mixed_abandoned_and_malformed_requests(served):
    base, proc = served
    probe = {"model": "tiny", "messages": [{"role": "user", "content": "probe"}], "max_tokens": 8}
    for _ in range(3):  # warm up (allocator, first batches)
        httpx.post(base + CHAT, json=probe, timeout=60)
    start = time.monotonic()
    httpx.post(base + CHAT, json=probe, timeout=60).raise_for_status()
    usual = time.monotonic() - start
    rss_before = _rss_kib(proc.pid)

    outcomes: dict[int, tuple[str, int, str | None]] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=60) as http:
            for i in range(c, 64, 16):  # 4 requests per client, 16 clients
                kind, body = _request(i)
                if kind == "abandon":
                    with contextlib.suppress(httpx.TimeoutException):
                        http.post(base + CHAT, json=body, timeout=0.2)
                    with lock:
                        outcomes[i] = (kind, 0, None)
                    continue
                r = http.post(base + CHAT, json=body)
                text = (
                    r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
                )
                with lock:
                    outcomes[i] = (kind, r.status_code, text)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(outcomes) == 64
    for i, (kind, status, _) in outcomes.items():
        if kind == "good":
            assert status in (200, 503), (i, status)
        elif kind == "bad":
            assert 400 <= status < 500, (i, status)
    served_ok = [i for i, (k, s, _) in outcomes.items() if k == "good" and s == 200]
    assert len(served_ok) >= 20
    # Each completed response equals the same request served alone.
    for i in served_ok:
        alone = httpx.post(base + CHAT, json=_request(i)[1], timeout=60)
        assert alone.json()["choices"][0]["message"]["content"] == outcomes[i][2], i
    time.sleep(1.0)
    start = time.monotonic()
    httpx.post(base + CHAT, json=probe, timeout=60).raise_for_status()
    after = time.monotonic() - start
    assert after < 3 * usual + 0.5, (usual, after)
    rss_after = _rss_kib(proc.pid)
    assert rss_after <= 1.10 * rss_before, (rss_before, rss_after)
