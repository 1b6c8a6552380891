"""``steerlab serve``: an OpenAI-compatible API with per-request steering, and a playground.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /v1/vectors`` and the playground page at ``/``. A request adds
``"steering": [{"vector": NAME, "multiplier": 4, "layers": [9], "policy": "after-prompt"}]``;
no field means unsteered. Vector names are keys of a registry loaded at start-up, never paths.

No request can stall or starve another: bodies are size-limited before they are read,
parsing and tokenizing run off the event loop, the queue is bounded (503 with
``Retry-After``), each request has a deadline (504), and a client that goes away, streaming
or not, frees its row at the next token. :class:`Guard` refuses foreign ``Host`` and
``Origin`` headers, non-JSON bodies and, with an API key, requests without it.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoints' annotations
# (Request) at runtime from this module's and create_app's namespaces.
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector
from steerlab.serving.batcher import Job, QueueFull
from steerlab.serving.guard import Guard, Security, is_loopback
from steerlab.serving.service import (
    ApiError,
    Limits,
    Service,
    describe_vector,
    load_vectors,
    parse_body,
)

_POLL = 0.25  # seconds between disconnect checks while a non-streaming request waits

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
) -> Any:
    """The ASGI application serving ``lm`` with ``vectors`` (FastAPI inside :class:`Guard`)."""
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

    @app.get("/v1/vectors")
    async def list_vectors() -> dict[str, Any]:
        data = [
            describe_vector(key, v, security.expose_metadata)
            for key, v in sorted(service.vectors.items())
        ]
        return {"object": "list", "data": data}

    async def _complete(request: Request, chat: bool) -> Any:
        raw = await _read(request)
        loop = asyncio.get_running_loop()
        body, ids, params = await loop.run_in_executor(work, _validate, raw, chat)
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        deadline = time.monotonic() + limits.request_timeout
        job = Job(ids=ids, emit=emit, deadline=deadline, **params)
        try:
            service.batcher.submit(job)
        except QueueFull:
            raise ApiError(
                503,
                f"the server is busy ({limits.max_queue} requests waiting): retry shortly",
                kind="server_error",
                headers={"Retry-After": "1"},
            ) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        tok = lm.tokenizer

        async def next_event() -> tuple[str, Any]:
            """The job's next event; cancels the job when the client leaves or time is up."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), _POLL)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        raise _ClientGone from None
                    if time.monotonic() > deadline + 1.0:
                        job.cancelled.set()
                        raise ApiError(
                            504, "the request ran past its deadline", kind="server_error"
                        ) from None

        async def tokens() -> AsyncIterator[tuple[str, str | None]]:
            """(text delta, finish reason) as tokens arrive."""
            made: list[int] = []
            sent = ""
            while True:
                kind, value = await next_event()
                if kind == "error":
                    status = 504 if "deadline" in str(value) else 500
                    raise ApiError(status, f"generation failed: {value}", kind="server_error")
                if kind == "done":
                    yield tok.decode(made, skip_special_tokens=True)[len(sent) :], value
                    return
                made.append(int(value))
                text = tok.decode(made, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # half a multi-byte character: wait for the rest
                delta, sent = text[len(sent) :], text
                if delta:
                    yield delta, None

        if not body.get("stream"):
            parts, reason = [], "stop"
            try:
                async for delta, finish in tokens():
                    parts.append(delta)
                    reason = finish or reason
            except _ClientGone:
                return JSONResponse({}, status_code=499)  # nobody is left to read it
            finally:
                job.cancelled.set()  # a no-op when it finished; frees the row when not
            text = "".join(parts)
            return _completion(rid, created, name, chat, text, reason, len(ids), tok)

        async def stream() -> AsyncIterator[str]:
            obj = "chat.completion.chunk" if chat else "text_completion"
            head = {"id": rid, "object": obj, "created": created, "model": name}
            try:
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
                    yield _sse({**head, "choices": [{**first, "finish_reason": None}]})
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
                    yield _sse({**head, "choices": [choice]})
                yield "data: [DONE]\n\n"
            except ApiError as exc:
                yield _sse(exc.body())
            except _ClientGone:
                return
            finally:
                job.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, chat=False)

    return Guard(app, security, limits.max_body_bytes)


class _ClientGone(Exception):  # noqa: N818
    """The client closed the connection: its job is cancelled and nothing is sent."""


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _completion(
    rid: str, created: int, model: str, chat: bool, text: str, reason: str, prompt: int, tok: Any
) -> dict[str, Any]:
    completion_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def serve(
    lm: Engine,
    vectors: dict[str, SteeringVector],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    security: Security | None = None,
    allow_hosts: Sequence[str] = (),
) -> None:
    """Run the server until interrupted.

    Args:
        host: bind address; loopback by default.
        allow_hosts: extra ``Host`` names to accept (the bind address is accepted too).
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
    app = create_app(lm, vectors, limits, security=security)
    uvicorn.run(app, host=host, port=port, log_level="info")
