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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from steerlab.core.engine import Engine
from steerlab.core.jobs import Job, QueueFull
from steerlab.core.vector import SteeringVector
from steerlab.evaluation.sweep_summary import SweepSummary
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
from steerlab.serving.watch import Watch, next_event

__all__ = [
    "ApiError",
    "Limits",
    "Security",
    "Service",
    "create_app",
    "is_loopback",
    "load_vectors",
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
        service.runner.close()
        work.shutdown(wait=False, cancel_futures=True)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # The Guard around the app logs it in one line; the client gets JSON, not a page.
        rid = request.scope.get("steerlab_request_id", "?")
        error = ApiError(
            500, f"internal error (request {rid}): the server logged it", kind="server_error"
        )
        return JSONResponse(error.body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, "invalid request body").body(), status_code=400)

    async def _read(request: Request, deadline: float) -> bytes:
        """The body, within its size limit and by the request's deadline (counted from the
        moment its head arrived) or the body timeout, whichever comes first."""
        chunks, size = [], 0
        until = min(deadline, time.monotonic() + limits.body_timeout)
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), until - time.monotonic())
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    "the request body did not arrive in time (limits: "
                    f"--body-timeout {limits.body_timeout:g} s, --request-timeout "
                    f"{limits.request_timeout:g} s)",
                ) from None
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
            service.runner.submit(item)
        except QueueFull:
            raise ApiError(
                503,
                f"the server is busy ({limits.max_queue} requests waiting): retry shortly",
                kind="server_error",
                headers={"Retry-After": "1"},
            ) from None

    async def _complete(request: Request, chat: bool) -> Any:
        deadline = time.monotonic() + limits.request_timeout  # from the request's head
        raw = await _read(request, deadline)
        loop = asyncio.get_running_loop()
        body, ids, params = await loop.run_in_executor(work, _validate, raw, chat)
        stops = params.pop("stop", [])
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(ids=ids, emit=emit, deadline=deadline, **params)
        _submit(job)
        watch = Watch(request, [job], events)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        tok = lm.tokenizer

        async def tokens() -> AsyncIterator[tuple[str, str | None]]:
            """(text delta, finish reason) as tokens arrive."""
            text = Text(tok, stops)
            while True:
                kind, value = await next_event(events, watch, deadline)
                if kind == "error":
                    raise failure(value)
                if kind == "done":
                    yield text.rest(), value
                    return
                delta = text.add(int(value))
                if text.stopped:  # a stop string: the row ends here, its engine row too
                    job.cancelled.set()
                    yield delta, "stop"
                    return
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
        deadline = time.monotonic() + limits.request_timeout  # from the request's head
        raw = await _read(request, deadline)
        loop = asyncio.get_running_loop()
        plan = await loop.run_in_executor(work, lambda: service.compare(parse_body(raw)))
        params = dict(plan.params)
        stops = params.pop("stop", [])
        events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()

        def emitter(row: int) -> Any:
            def emit(kind: str, value: Any) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (row, kind, value))

            return emit

        jobs = [
            Job(
                ids=plan.ids,
                steering=steering,
                emit=emitter(r),
                deadline=deadline,
                explain=plan.explain,
                **params,
            )
            for r, steering in enumerate(plan.rows)
        ]
        _submit(jobs)
        watch = Watch(request, jobs, events)
        tok = lm.tokenizer
        head = {
            "object": "steerlab.compare",
            "model": name,
            "rows": [{"row": r, "multiplier": m} for r, m in enumerate(plan.multipliers)],
        }

        async def stream() -> AsyncIterator[str]:
            texts = [Text(tok, stops) for _ in jobs]
            open_rows = set(range(len(jobs)))
            try:
                yield sse(head)
                while open_rows:
                    r, kind, value = await next_event(events, watch, deadline)
                    text = texts[r]
                    if r not in open_rows:
                        continue  # a row that met a stop string: the rest is not its text
                    if kind == "token":
                        delta = text.add(int(value))
                        if delta:
                            yield sse({"row": r, "delta": delta})
                        if text.stopped:
                            jobs[r].cancelled.set()
                            yield sse({"row": r, "finish_reason": "stop"})
                            open_rows.discard(r)
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
