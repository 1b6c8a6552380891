"""``steerlab serve``: an OpenAI-compatible API with per-request steering, and a playground.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /v1/vectors`` and the playground page at ``/``. A request adds
``"steering": [{"vector": NAME, "multiplier": 4, "layers": [9], "policy": "after-prompt"}]``;
no field means unsteered. Vector names are keys of a registry loaded at start-up, never paths.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoints' annotations
# (Request) at runtime from this module's and create_app's namespaces.
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.vector import SteeringVector
from steerlab.serving.batcher import Job
from steerlab.serving.service import ApiError, Limits, Service, load_vectors

__all__ = ["ApiError", "Limits", "Service", "create_app", "load_vectors", "serve"]


def create_app(
    lm: Engine,
    vectors: dict[str, SteeringVector],
    limits: Limits | None = None,
    model_name: str | None = None,
) -> Any:
    """The FastAPI application serving ``lm`` with ``vectors``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    service = Service(lm, vectors, limits or Limits())
    name = model_name or lm.identity.name
    app = FastAPI(title="steerlab", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.on_event("shutdown")
    def _stop() -> None:
        service.batcher.close()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, "invalid request body").body(), status_code=400)

    async def _body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

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
        data = []
        for key, v in sorted(service.vectors.items()):
            meta = v.metadata()
            data.append(
                {
                    "id": key,
                    "object": "steering_vector",
                    "layers": v.layers,
                    "method": meta["method"],
                    "read_position": meta["read_position"],
                    "positionwise": v.positionwise,
                    "norms": {str(k): n for k, n in v.norms().items()},
                    "metadata": meta,
                }
            )
        return {"object": "list", "data": data}

    async def _complete(request: Request, chat: bool) -> Any:
        body = await _body(request)
        ids, params = service.job(body, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(ids=ids, emit=emit, **params)
        service.batcher.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        tok = lm.tokenizer

        async def tokens() -> AsyncIterator[tuple[str, str | None]]:
            """(text delta, finish reason) as tokens arrive."""
            made: list[int] = []
            sent = ""
            while True:
                kind, value = await events.get()
                if kind == "error":
                    raise ApiError(500, f"generation failed: {value}", kind="server_error")
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
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            text = "".join(parts)
            completion_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
            usage = {
                "prompt_tokens": len(ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens,
            }
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                    "logprobs": None,
                }
                return {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": name,
                    "choices": [choice],
                    "usage": usage,
                }
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [choice],
                "usage": usage,
            }

        async def stream() -> AsyncIterator[str]:
            obj = "chat.completion.chunk" if chat else "text_completion"
            try:
                if chat:
                    first = {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": name,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None,
                            }
                        ],
                    }
                    yield f"data: {json.dumps(first)}\n\n"
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
                    yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': name, 'choices': [choice]})}\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
            finally:
                job.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, chat=False)

    return app


def serve(
    lm: Engine,
    vectors: dict[str, SteeringVector],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
) -> None:
    """Run the server until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise SteerlabError(
            "the server needs fastapi and uvicorn: pip install 'steerlab[serve]'"
        ) from None
    uvicorn.run(create_app(lm, vectors, limits), host=host, port=port, log_level="info")
