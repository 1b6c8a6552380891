"""Helpers shared by the tests (a plain module: tests import it, conftest holds fixtures)."""

from __future__ import annotations

from pathlib import Path

import torch

from steerlab.core.policy import Policy
from steerlab.core.steering import Steering
from steerlab.core.vector import SteeringVector
from steerlab.hf.model import LoadedModel

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def random_vector(
    lm: LoadedModel, layers: list[int], seed: int = 1, rows: int | None = None, scale: float = 1.0
) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    d = lm.info.hidden_size
    shape = (d,) if rows is None else (rows, d)
    dirs = {layer: torch.randn(shape, generator=gen) * scale for layer in layers}
    norms = {layer: 2.0 for layer in layers}
    return SteeringVector(
        directions=dirs,
        model=lm.identity,
        method="random",
        read_position="all" if rows else "answer",
        residual_norms=norms,
    )


def start_server(app):
    """Run an ASGI app with uvicorn on a free loopback port; returns (base_url, stop)."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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


def run_threads(calls: list) -> list:
    """Run each ``(fn, *args)`` of ``calls`` in its own thread, all at once.

    Returns:
        Each call's result, in order. A worker's exception is raised again in the calling
        (main) thread, so a failure inside a thread fails the test.
    """
    import threading

    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, fn, *args) -> None:
        try:
            results[i] = fn(*args)
        except BaseException as exc:  # raised again below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, *call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ----- steering contract helpers (tests of hooks and decoding) -------------------------------
EQUIV_ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2", "gemma2", "opt", "phi3", "mistral"]
# Every persisting policy kind, windows both closed and open.
PERSISTING = ["all", "after-prompt", "from-marker:h", "prompt", "actadd", "window:2-5", "window:1-"]
ALL_POLICIES = [*PERSISTING, "transient"]
PROMPTS = ["hello there", "a much longer prompt here, with more", "hi"]
STEPS = 16


def make_steering(lm: LoadedModel, policy: str, multiplier: float = 4.0) -> Steering:
    """A random steering at layers 1 and 2 (a 3-row vector at layer 1 for actadd)."""
    if policy == "actadd":
        return Steering(random_vector(lm, [1], rows=3), multiplier, policy=Policy.parse(policy))
    return Steering(random_vector(lm, [1, 2]), multiplier, policy=Policy.parse(policy))


def prompt_ids(lm: LoadedModel, prompts: list[str] = PROMPTS) -> list[list[int]]:
    return [lm.tokenizer(p)["input_ids"] for p in prompts]
