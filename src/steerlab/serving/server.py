"""``steerlab serve``'s server: the app behind uvicorn with the connection limits of
:mod:`steerlab.serving.connections`."""

from collections.abc import Sequence

from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector
from steerlab.evaluation.sweep_summary import SweepSummary
from steerlab.serving.app import create_app
from steerlab.serving.guard import Security
from steerlab.serving.service import Limits


def serve(
    lm: Engine,
    vectors: dict[str, SteeringVector],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    security: Security | None = None,
    allow_hosts: Sequence[str] = (),
    sweep: SweepSummary | None = None,
    sweep_vector: str | None = None,
) -> None:
    """Run the server until interrupted.

    Args:
        host: bind address; loopback by default.
        allow_hosts: extra ``Host`` names to accept (the bind address is accepted too).
        sweep, sweep_vector: as in :func:`create_app`.
    """
    try:
        import uvicorn
    except ImportError:
        raise SteerlabError(
            "the server needs fastapi and uvicorn: pip install 'steerlab[serve]'"
        ) from None
    security = security or Security()
    names = set(security.allowed_hosts) | set(allow_hosts)
    if host not in ("0.0.0.0", "::", ""):
        names.add(host)
    security = Security(
        security.api_key,
        tuple(sorted(names)),
        security.expose_metadata,
        security.allowed_origins,
    )
    from steerlab.serving.connections import protocol

    limits = limits or Limits()
    app = create_app(lm, vectors, limits, security=security, sweep=sweep, sweep_vector=sweep_vector)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        http=protocol(limits.max_connections, limits.header_timeout),
        timeout_keep_alive=5,
    )
