"""``steerlab serve``: an OpenAI-compatible API with per-request steering, and a playground.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /v1/vectors`` and the playground page at ``/``. A request adds
``"steering": [{"vector": NAME, "multiplier": 4, "layers": [9], "policy": "after-prompt"}]``;
no field means unsteered. Vector names are keys of a registry loaded at start-up, never paths.
"""

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab.batcher import Batcher, Job
from steerlab.chat import encode, render_messages
from steerlab.errors import SteerlabError
from steerlab.extraction import identity_of
from steerlab.model import LoadedModel
from steerlab.policy import Policy
from steerlab.steering import Steering
from steerlab.vector import SteeringVector

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class Limits:
    """Request limits: the largest ``max_tokens``, |multiplier| and steerings per request."""

    max_tokens: int = 512
    max_multiplier: float = 1000.0
    max_steerings: int = 8
    max_batch: int = 8


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        }


def load_vectors(
    directory: Path, lm: LoadedModel, allow_mismatch: bool = False
) -> dict[str, SteeringVector]:
    """Every ``*.safetensors`` / ``*.gguf`` vector in ``directory``, keyed by file stem.

    Raises:
        SteerlabError: a missing directory, a bad file name, or a vector that does not fit
            the model.
    """
    if not directory.is_dir():
        raise SteerlabError(f"vector directory '{directory}' does not exist: pass --vectors DIR")
    vectors: dict[str, SteeringVector] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in (".safetensors", ".gguf"):
            continue
        if not _NAME.match(path.stem):
            raise SteerlabError(
                f"vector file name '{path.name}' is not a plain name: rename it (letters, digits, _ . -)"
            )
        vector = SteeringVector.load(path)
        try:
            vector.check_model(identity_of(lm), allow_mismatch)
        except SteerlabError as exc:
            raise SteerlabError(f"{path.name}: {exc}") from None
        vectors[path.stem] = vector
    return vectors


class Service:
    """Validates requests and turns them into batcher jobs."""

    def __init__(self, lm: LoadedModel, vectors: dict[str, SteeringVector], limits: Limits) -> None:
        self.lm = lm
        self.vectors = vectors
        self.limits = limits
        self.batcher = Batcher(lm, limits.max_batch)
        config = getattr(lm.model, "config", None)
        self.context = int(
            getattr(config, "max_position_embeddings", 0)
            or getattr(config, "n_positions", 0)
            or 2048
        )

    def steerings(self, raw: Any, prompt_ids: list[int]) -> list[Steering]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ApiError(
                400,
                "'steering' must be a list of {vector, multiplier, layers?, policy?}",
                "steering",
            )
        if len(raw) > self.limits.max_steerings:
            raise ApiError(
                400, f"at most {self.limits.max_steerings} steerings per request", "steering"
            )
        out = []
        for i, item in enumerate(raw):
            where = f"steering[{i}]"
            if not isinstance(item, dict):
                raise ApiError(400, f"{where} must be an object", where)
            name = item.get("vector")
            if not isinstance(name, str) or name not in self.vectors:
                known = ", ".join(sorted(self.vectors)) or "none"
                raise ApiError(
                    404,
                    f"unknown vector {name!r} in {where}: known vectors are {known}",
                    f"{where}.vector",
                    "not_found_error",
                )
            vector = self.vectors[name]
            multiplier = item.get("multiplier", 1.0)
            if (
                isinstance(multiplier, bool)
                or not isinstance(multiplier, (int, float))
                or not math.isfinite(multiplier)
            ):
                raise ApiError(
                    400, f"{where}.multiplier must be a finite number", f"{where}.multiplier"
                )
            if abs(multiplier) > self.limits.max_multiplier:
                raise ApiError(
                    400,
                    f"{where}.multiplier must be within +/-{self.limits.max_multiplier:g}",
                    f"{where}.multiplier",
                )
            layers = item.get("layers")
            if layers is not None:
                if (
                    not isinstance(layers, list)
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
                    or not layers
                ):
                    raise ApiError(
                        400,
                        f"{where}.layers must be a non-empty list of integers",
                        f"{where}.layers",
                    )
                missing = [x for x in layers if x not in vector.directions]
                if missing:
                    raise ApiError(
                        400,
                        f"{where}: vector {name!r} has no layer {missing[0]} (it has {','.join(map(str, vector.layers))})",
                        f"{where}.layers",
                    )
            scale = item.get("scale", "absolute")
            try:
                policy = Policy.parse(str(item.get("policy", "after-prompt")))
                steering = Steering(
                    vector,
                    float(multiplier),
                    None if layers is None else tuple(layers),
                    policy,
                    scale,
                )
            except SteerlabError as exc:
                raise ApiError(400, f"{where}: {exc}", where) from None
            if policy.kind == "from-marker":
                text = self.lm.tokenizer.decode(prompt_ids)
                if str(policy.marker) not in text:
                    raise ApiError(
                        400,
                        f"{where}: the from-marker string {policy.marker!r} does not occur in the prompt",
                        f"{where}.policy",
                    )
            out.append(steering)
        return out

    def job(self, body: dict[str, Any], chat: bool) -> tuple[list[int], dict[str, Any]]:
        """Validate a request body; returns the prompt ids and the decoding parameters."""
        tok = self.lm.tokenizer
        if chat:
            messages = body.get("messages")
            if (
                not isinstance(messages, list)
                or not messages
                or not all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in messages
                )
            ):
                raise ApiError(
                    400,
                    "'messages' must be a non-empty list of {role, content} strings",
                    "messages",
                )
            ids = encode(tok, render_messages(tok, messages))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
            ids = [int(i) for i in tok(prompt)["input_ids"]]
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "'max_tokens' must be a positive integer", "max_tokens")
        if max_tokens > self.limits.max_tokens:
            raise ApiError(
                400,
                f"'max_tokens' is {max_tokens}, above this server's limit of {self.limits.max_tokens}",
                "max_tokens",
            )
        if len(ids) + max_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {self.context} tokens",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        temperature = body.get("temperature", 0.0)
        top_p = body.get("top_p", 1.0)
        seed = body.get("seed")
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ApiError(400, f"'{name}' must be a number", name)
        if not 0 <= float(temperature) <= 2:
            raise ApiError(400, "'temperature' must be between 0 and 2", "temperature")
        if not 0 < float(top_p) <= 1:
            raise ApiError(400, "'top_p' must be in (0, 1]", "top_p")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ApiError(400, "'seed' must be an integer", "seed")
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        params = {
            "steering": self.steerings(body.get("steering"), ids),
            "max_tokens": max_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "seed": seed,
        }
        return ids, params


def create_app(
    lm: LoadedModel,
    vectors: dict[str, SteeringVector],
    limits: Limits | None = None,
    model_name: str | None = None,
) -> Any:
    """The FastAPI application serving ``lm`` with ``vectors``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    service = Service(lm, vectors, limits or Limits())
    name = model_name or lm.info.name
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
    lm: LoadedModel,
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
