"""steerlab as a stock-vLLM plugin: per-request steering on continuous batches.

Registered under vLLM's ``vllm.general_plugins`` entry point, so every vLLM process (API
server, engine core, workers) runs :func:`register` once installed. It:

* loads the vector registry from ``$STEERLAB_VECTORS`` (a folder of ``.safetensors`` /
  ``.gguf`` files; a file's stem is its name);
* validates each request's ``extra_args["steering"]`` when its ``SamplingParams`` is made
  (in the API process: a bad entry is a 400 there, never an engine crash);
* salts the prefix cache of requests whose steering touches prompt positions, so they never
  share or pollute KV blocks with differently steered or unsteered requests;
* wraps the model runner's forward: for a step with steered requests it maps every
  flattened token to its request (``query_start_loc``) and its position (vLLM's own
  ``positions``, relative to the request's first prompt token), builds the engine-independent
  :class:`steerlab.core.plan.SteeringPlan`, and adds ``C @ W`` to the residual of each
  steered decoder layer through hooks that exist only during that forward.

Eager mode only: CUDA graphs replay kernels without the hooks, so a steered step refuses
to run under a captured graph (start vLLM with ``enforce_eager=True``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from steerlab.core.errors import SteerlabError
from steerlab.core.plan import Bounds, SteeringPlan
from steerlab.core.steering import Steering
from steerlab.core.vector import SteeringVector
from steerlab.vllm import requests

log = logging.getLogger("steerlab.vllm")
ENV_VECTORS = "STEERLAB_VECTORS"
_registry: dict[str, SteeringVector] | None = None
_patched = False


def vectors() -> dict[str, SteeringVector]:
    """The vector registry of this process (loaded once from ``$STEERLAB_VECTORS``)."""
    global _registry
    if _registry is None:
        folder = os.environ.get(ENV_VECTORS)
        _registry = {}
        if folder:
            from steerlab.formats import load_vector

            for path in sorted(Path(folder).iterdir()):
                if path.suffix.lower() in (".safetensors", ".gguf") and not path.name.startswith(
                    "."
                ):
                    try:
                        _registry[path.stem] = load_vector(path)
                    except SteerlabError as exc:
                        log.warning("steerlab: skipping %s: %s", path.name, exc)
    return _registry


def register() -> None:
    """The plugin entry point (idempotent: vLLM may call it several times per process)."""
    global _patched
    if _patched:
        return
    _patched = True
    _patch_validation()
    _patch_cache_salt()
    _patch_runner()


# ----- the API side: validation and the prefix-cache salt ------------------------------------
def _num_layers(registry: dict[str, SteeringVector]) -> int:
    return max((v.model.num_layers for v in registry.values()), default=0)


def _patch_validation() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._verify_extra_args

    def verify(self: Any) -> None:
        original(self)
        if self.extra_args and requests.KEY in self.extra_args:
            registry = vectors()
            try:
                requests.parse(self.extra_args, registry, _num_layers(registry))
            except SteerlabError as exc:
                raise VLLMValidationError(str(exc), parameter="extra_args") from None

    SamplingParams._verify_extra_args = verify  # type: ignore[method-assign]


def _patch_cache_salt() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs

    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        if extra and requests.KEY in extra:
            registry = vectors()
            steerings = requests.parse(extra, registry, _num_layers(registry))
            if requests.touches_prompt(steerings):
                entries = requests.raw_entries(extra)
                request.cache_salt = requests.cache_salt(entries, request.cache_salt)
        return request

    InputProcessor.process_inputs = process_inputs  # type: ignore[method-assign]


# ----- the worker side: the steered forward ----------------------------------------------------
def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward

    def model_forward(
        self: Any, input_ids: Any = None, positions: Any = None, **kwargs: Any
    ) -> Any:
        step = _Step.of(self, positions)
        if step is None:
            return original(self, input_ids=input_ids, positions=positions, **kwargs)
        with step.hooks():
            return original(self, input_ids=input_ids, positions=positions, **kwargs)

    GPUModelRunner._model_forward = model_forward  # type: ignore[method-assign]

    runners: list[Any] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)  # it overrides load_model
    except ImportError:
        pass
    for cls in runners:
        _refuse_compiled(cls)


def _refuse_compiled(cls: Any) -> None:
    load = cls.load_model

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        if vectors() and not self.model_config.enforce_eager:
            # Compiled graphs and CUDA graphs replay without the per-step hooks: steering
            # would be silently lost, so the engine refuses to start instead.
            raise SteerlabError(
                f"steerlab steers vLLM in eager mode only (vectors from ${ENV_VECTORS}): "
                "start vLLM with --enforce-eager (Python: LLM(..., enforce_eager=True))"
            )
        return load(self, *args, **kwargs)

    cls.load_model = load_model


class _Step:
    """The steering of one forward of a continuous batch."""

    def __init__(
        self,
        runner: Any,
        plan: SteeringPlan,
        prompt_lengths: list[int],
        starts: list[int],
        positions: torch.Tensor,
        bounds: Bounds | None = None,
        broadcast: dict[tuple[int, torch.dtype], torch.Tensor] | None = None,
    ) -> None:
        self.runner = runner
        self.plan = plan
        # Per (layer, dtype): the [d] delta of a step whose every token every steering
        # covers, when it depends on nothing else (adds only); kept with the cached plan.
        self.broadcast = {} if broadcast is None else broadcast
        n = starts[-1]
        counts = torch.tensor([b - a for a, b in zip(starts, starts[1:], strict=False)])
        device = positions.device
        self.row = torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)  # [n]
        self.t = positions[:n].long()  # [n]: vLLM's positions start at each request's token 0
        self.n = n
        self.capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if bounds is None:
            bounds = plan.bounds(prompt_lengths, self._marker_at)
        self.bounds = bounds
        real = torch.ones(n, dtype=torch.bool, device=device)
        self.coef = plan.coefficients(bounds, self.row, self.t, real)  # [n, A]
        self.on = self.coef.any(-1, keepdim=True)  # [n, 1]
        # Every token covered by every steering (a decoding step of uniformly steered rows):
        # a plain broadcast add per layer. Eager vLLM, so reading this back costs nothing.
        self.all_on = n == positions.shape[0] and bool(self.coef.all())
        self._cast: dict[torch.dtype, torch.Tensor] = {}

    def _marker_at(self, row: int, steering: Steering) -> int:
        from steerlab.core.policy import marker_end

        req_id = self.runner.input_batch.req_ids[row]
        ids = list(self.runner.requests[req_id].prompt_token_ids or [])
        return marker_end(_tokenizer(self.runner), ids, str(steering.policy.marker))

    @classmethod
    def of(cls, runner: Any, positions: Any) -> _Step | None:
        registry = vectors()
        if not registry or positions is None:
            return None
        batch = runner.input_batch
        count = batch.num_reqs
        rows: list[list[Steering]] = []
        lengths: list[int] = []
        for req_id in batch.req_ids[:count]:
            state = runner.requests[req_id]
            cached = getattr(state, "_steerlab", None)
            if cached is None:
                extra = getattr(state.sampling_params, "extra_args", None)
                try:
                    cached = _parsed(extra, registry, _model_layers(runner))
                except SteerlabError as exc:  # validated at the API: a bug if it happens
                    log.error("steerlab: request %s: %s; not steered", req_id, exc)
                    cached = []
                state._steerlab = cached
            rows.append(cached)
            lengths.append(int(state.num_prompt_tokens))
        if not any(rows):
            return None
        starts = [int(x) for x in runner.query_start_loc.cpu[: count + 1].tolist()]
        # Decoding steps keep the same requests for a while: reuse their plan (the stacked,
        # device-cast vectors) until the batch changes.
        # A request's spans depend only on its prompt, so they are kept with the plan too.
        key = tuple(batch.req_ids[:count])
        cached_plan = getattr(runner, "_steerlab_plan", None)
        if cached_plan is not None and cached_plan[0] == key:
            _, plan, bounds, broadcast = cached_plan
            return cls(runner, plan, lengths, starts, positions, bounds, broadcast)
        plan = SteeringPlan(rows)
        step = cls(runner, plan, lengths, starts, positions)
        runner._steerlab_plan = (key, plan, step.bounds, step.broadcast)
        return step

    @contextmanager
    def hooks(self) -> Iterator[None]:
        layers = _decoder_layers(self.runner)
        handles = []
        try:
            for layer in self.plan.layers:
                handles.append(layers[layer].register_forward_hook(self._hook(layer)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if self.capturing:
                raise SteerlabError(
                    "steerlab cannot steer inside a captured CUDA graph: start vLLM with "
                    "enforce_eager=True"
                )
            hidden, residual = output  # each [tokens, d]; the block's output is their sum
            if self.all_on:
                fixed = self.broadcast.get((layer, residual.dtype))
                if fixed is not None:
                    return hidden, residual + fixed
            n = self.n
            coef = self._cast.get(residual.dtype)
            if coef is None:
                coef = self._cast[residual.dtype] = self.coef.to(residual.device, residual.dtype)
            # ablate and clamp read the block's output, hidden + residual; add needs neither
            like = hidden[:n] + residual[:n] if self.plan.reads_hidden(layer) else residual[:n]
            delta = self.plan.delta(layer, coef, self.t, like, all_on=self.all_on)
            if delta is None:
                return None
            if self.all_on:
                if delta.dim() == 1:  # one add, no ActAdd or projection: fixed per plan
                    self.broadcast[(layer, residual.dtype)] = delta
                return hidden, residual + delta
            on = self.on.to(residual.device)
            head = torch.where(on, residual[:n] + delta, residual[:n])  # a masked add
            if n == residual.shape[0]:
                return hidden, head
            return hidden, torch.cat([head, residual[n:]])  # padded tokens stay as they are

        return hook


_parses: dict[str, list[Steering]] = {}
_MAX_PARSES = 256


def _parsed(extra: Any, registry: dict[str, SteeringVector], num_layers: int) -> list[Steering]:
    """A request's steerings; identical entries give the same objects, so the plan of a
    batch of identically steered requests has one column (a broadcast add)."""
    try:
        key = json.dumps(requests.raw_entries(extra), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):  # offline extra_args that are not plain JSON
        return requests.parse(extra, registry, num_layers)
    hit = _parses.get(key)
    if hit is None:
        hit = requests.parse(extra, registry, num_layers)
        if len(_parses) >= _MAX_PARSES:
            _parses.pop(next(iter(_parses)))
        _parses[key] = hit
    return hit


def _decoder_layers(runner: Any) -> Any:
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise SteerlabError(
            f"steerlab cannot find the decoder layers of {type(model).__name__} in vLLM"
        )
    return layers


def _model_layers(runner: Any) -> int:
    return len(_decoder_layers(runner))


_tokenizers: dict[int, Any] = {}


def _tokenizer(runner: Any) -> Any:
    key = id(runner)
    if key not in _tokenizers:
        from transformers import AutoTokenizer

        config = runner.model_config
        _tokenizers[key] = AutoTokenizer.from_pretrained(config.tokenizer)
    return _tokenizers[key]
