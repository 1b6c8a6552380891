from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

from steerlab.model import LoadedModel  # noqa: E402
from steerlab.vector import ModelIdentity, SteeringVector  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def identity(lm: LoadedModel) -> ModelIdentity:
    return ModelIdentity(
        name=lm.info.name,
        architecture=lm.info.architecture,
        hidden_size=lm.info.hidden_size,
        num_layers=lm.info.num_layers,
        fingerprint=lm.info.fingerprint,
    )


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
        model=identity(lm),
        method="random",
        read_position="all" if rows else "answer",
        residual_norms=norms,
    )


@pytest.fixture(scope="session")
def llama() -> LoadedModel:
    return tiny.model("llama")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give slow tests their marker from the file name too."""
    for item in items:
        if "real_model" in item.nodeid:
            item.add_marker(pytest.mark.slow)


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
