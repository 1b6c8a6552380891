"""``steerlab serve``: an OpenAI-compatible API with per-request steering, and a playground.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /v1/vectors`` and the playground page at ``/``. A request adds
``"steering": [{"vector": NAME, "multiplier": 4, "layers": [9], "policy": "after-prompt"}]``;
no field means unsteered. Vector names are keys of a registry loaded at start-up, never paths.
For the playground: ``POST /v1/steerlab/compare`` (one prompt at several multipliers in one
batch, streamed, with per-token KL on request) and ``GET /v1/steerlab/sweep`` (the plots and
recommendation of the sweep the server was started with).

No request can stall or starve another: bodies are size-limited before they are read,
parsing and tokenizing run off the event loop, the queue is bounded (503 with
``Retry-After``), each request has a deadline (504), and a client that goes away, streaming
or not, frees its row at the next token. :class:`Guard` refuses foreign ``Host`` and
``Origin`` headers, non-JSON bodies and, with an API key, requests without it.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoints' annotations
# (Request) at runtime from this module's and create_app's namespaces.
import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector
from steerlab.evaluation.sweep_summary import SweepSummary
from steerlab.serving.batcher import Job, QueueFull
from steerlab.serving.events import (
    ClientGone,
    Text,
    completion,
    explained,
    failure,
    sse,
    sweep_json,
)
from steerlab.serving.guard import Guard, Security, is_loopback
from steerlab.serving.service import (
    ApiError,
    Limits,
    Service,
    describe_vector,
    load_vectors,
    parse_body,
)

_POLL = 0.25  # seconds between disconnect checks, for the whole life of a request

__all__ = [
    "ApiError",
    "Limits",
    "Security",
    "Service",
    "create_app",
    "is_loopback",
    "load_vectors",
    "serve",
]


def create_app(
    lm: Engine,
    vectors: dict[str, SteeringVector],
    limits: Limits | None = None,
    model_name: str | None = None,
    security: Security | None = None,
    sweep: SweepSummary | None = None,
    sweep_vector: str | None = None,
) -> Any:
    """The ASGI application serving ``lm`` with ``vectors`` (FastAPI inside :class:`Guard`).

    Args:
        sweep: a finished sweep whose plots and recommendation the playground shows.
        sweep_vector: the registry name of that sweep's vector, when it is served.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    limits = limits or Limits()
    security = security or Security()
    service = Service(lm, vectors, limits)
    name = model_name or lm.identity.name
    app = FastAPI(title="steerlab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    # Parsing and tokenizing run here, one at a time, never on the event loop.
    work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steerlab-parse")

    @app.on_event("shutdown")
    def _stop() -> None:
        service.batcher.close()
        work.shutdown(wait=False, cancel_futures=True)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, "invalid request body").body(), status_code=400)

    async def _read(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(
                    413,
                    f"the request body is over this server's limit of {limits.max_body_bytes} bytes",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _validate(raw: bytes, chat: bool) -> tuple[dict[str, Any], list[int], dict[str, Any]]:
        body = parse_body(raw)
        ids, params = service.job(body, chat)
        return body, ids, params

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return (Path(__file__).parent / "static" / "playground.html").read_text()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "steerlab"}],
        }

    sweep_page = None if sweep is None else sweep_json(sweep, sweep_vector)

    @app.get("/v1/steerlab/sweep")
    async def sweep_summary() -> Any:
        if sweep_page is None:
            raise ApiError(
                404,
                "this server has no sweep: start it with --sweep-dir DIR",
                kind="not_found_error",
            )
        return sweep_page

    @app.get("/v1/vectors")
    async def list_vectors() -> dict[str, Any]:
        data = [
            describe_vector(key, v, security.expose_metadata)
            for key, v in sorted(service.vectors.items())
        ]
        return {"object": "list", "data": data}

    def _submit(item: Job | list[Job]) -> None:
        try:
            service.batcher.submit(item)
        except QueueFull:
            raise ApiError(
                503,
                f"the server is busy ({limits.max_queue} requests waiting): retry shortly",
                kind="server_error",
                headers={"Retry-After": "1"},
            ) from None

    async def _complete(request: Request, chat: bool) -> Any:
        raw = await _read(request)
        loop = asyncio.get_running_loop()
        body, ids, params = await loop.run_in_executor(work, _validate, raw, chat)
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        deadline = time.monotonic() + limits.request_timeout
        job = Job(ids=ids, emit=emit, deadline=deadline, **params)
        _submit(job)
        watch = _Watch(request, [job], events)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        tok = lm.tokenizer

        async def tokens() -> AsyncIterator[tuple[str, str | None]]:
            """(text delta, finish reason) as tokens arrive."""
            text = Text(tok)
            while True:
                kind, value = await _next_event(events, watch, deadline)
                if kind == "error":
                    raise failure(value)
                if kind == "done":
                    yield text.rest(), value
                    return
                delta = text.add(int(value))
                if delta:
                    yield delta, None

        if not body.get("stream"):
            parts, reason = [], "stop"
            try:
                async for delta, finish in tokens():
                    parts.append(delta)
                    reason = finish or reason
            except ClientGone:
                return JSONResponse({}, status_code=499)  # nobody is left to read it
            finally:
                watch.stop()  # a no-op for a finished job; frees the row when not
            text = "".join(parts)
            return completion(rid, created, name, chat, text, reason, len(ids), tok)

        async def stream() -> AsyncIterator[str]:
            obj = "chat.completion.chunk" if chat else "text_completion"
            head = {"id": rid, "object": obj, "created": created, "model": name}
            try:
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
                    yield sse({**head, "choices": [{**first, "finish_reason": None}]})
                async for delta, finish in tokens():
                    if chat:
                        choice: dict[str, Any] = {
                            "index": 0,
                            "delta": {"content": delta} if delta else {},
                            "finish_reason": finish,
                        }
                    else:
                        choice = {
                            "index": 0,
                            "text": delta,
                            "finish_reason": finish,
                            "logprobs": None,
                        }
                    yield sse({**head, "choices": [choice]})
                yield "data: [DONE]\n\n"
            except ApiError as exc:
                yield sse(exc.body())
            except ClientGone:
                return
            finally:
                watch.stop()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/steerlab/compare")
    async def compare(request: Request) -> Any:
        """One prompt at several multipliers, run as one batch, streamed as server-sent
        events: ``{"row", "delta"}`` as text arrives, ``{"row", "explain"}`` (each token's
        text, KL and most changed tokens) when asked, ``{"row", "finish_reason"}``, then
        ``[DONE]``. See :meth:`Service.compare` for the body."""
        raw = await _read(request)
        loop = asyncio.get_running_loop()
        plan = await loop.run_in_executor(work, lambda: service.compare(parse_body(raw)))
        events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()

        def emitter(row: int) -> Any:
            def emit(kind: str, value: Any) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (row, kind, value))

            return emit

        deadline = time.monotonic() + limits.request_timeout
        jobs = [
            Job(
                ids=plan.ids,
                steering=steering,
                emit=emitter(r),
                deadline=deadline,
                explain=plan.explain,
                **plan.params,
            )
            for r, steering in enumerate(plan.rows)
        ]
        _submit(jobs)
        watch = _Watch(request, jobs, events)
        tok = lm.tokenizer
        head = {
            "object": "steerlab.compare",
            "model": name,
            "rows": [{"row": r, "multiplier": m} for r, m in enumerate(plan.multipliers)],
        }

        async def stream() -> AsyncIterator[str]:
            texts = [Text(tok) for _ in jobs]
            open_rows = set(range(len(jobs)))
            try:
                yield sse(head)
                while open_rows:
                    r, kind, value = await _next_event(events, watch, deadline)
                    text = texts[r]
                    if kind == "token":
                        delta = text.add(int(value))
                        if delta:
                            yield sse({"row": r, "delta": delta})
                    elif kind == "explain":
                        yield sse({"row": r, "explain": explained(text, value, tok)})
                    elif kind == "done":
                        rest = text.rest()
                        if rest:
                            yield sse({"row": r, "delta": rest})
                        yield sse({"row": r, "finish_reason": value})
                        open_rows.discard(r)
                    else:  # this row failed; the others go on
                        yield sse({"row": r, **failure(value).body()})
                        open_rows.discard(r)
                yield "data: [DONE]\n\n"
            except ApiError as exc:
                yield sse(exc.body())
            except ClientGone:
                return
            finally:
                watch.stop()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, chat=False)

    return Guard(app, security, limits.max_body_bytes)


class _Watch:
    """Cancels a request's jobs the moment its client goes away, tokens flowing or not.

    A task polls ``request.is_disconnected()`` every :data:`_POLL` seconds for the whole
    life of the request and, when the client has left, cancels the jobs (the batcher frees
    their rows at the next step) and wakes the reader with :data:`_GONE`.
    """

    def __init__(self, request: Any, jobs: list[Job], events: "asyncio.Queue[Any]") -> None:
        self.jobs, self.events = jobs, events
        self.task = asyncio.get_running_loop().create_task(self._run(request))

    async def _run(self, request: Any) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(_POLL)
        self.cancel()
        self.events.put_nowait(_GONE)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()

    def stop(self) -> None:
        """The request is over: stop watching and free any row still running."""
        self.task.cancel()
        self.cancel()


_GONE = object()  # the watcher's wake-up: the client left


async def _next_event(events: "asyncio.Queue[Any]", watch: _Watch, deadline: float) -> Any:
    """The next event; cancels the request's jobs when the client leaves or time is up."""
    try:
        item = await asyncio.wait_for(events.get(), max(deadline + 1.0 - time.monotonic(), 0.0))
    except asyncio.TimeoutError:
        watch.cancel()
        raise ApiError(504, "the request ran past its deadline", kind="server_error") from None
    if item is _GONE:
        raise ClientGone
    return item


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
    security = Security(security.api_key, tuple(sorted(names)), security.expose_metadata)
    app = create_app(lm, vectors, limits, security=security, sweep=sweep, sweep_vector=sweep_vector)
    uvicorn.run(app, host=host, port=port, log_level="info")
