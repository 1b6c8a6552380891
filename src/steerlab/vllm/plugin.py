"""steerlab as a stock-vLLM plugin: per-request steering on continuous batches, in vLLM's
compiled and CUDA-graph modes as well as eager (docs/design.md, "The vLLM engine").

Registered under vLLM's ``vllm.general_plugins`` entry point, so every vLLM process (API
server, engine core, workers) runs :func:`register` once installed. It loads the vector
registry once (:mod:`steerlab.vllm.registry`) and patches five points, each a wrapper
around vLLM's own method:

* API process, ``SamplingParams.verify``: the request's ``extra_args["steering"]`` is
  parsed by the one schema (:mod:`steerlab.core.requests`) against the served model's
  layers and context; a bad entry is vLLM's validation error, a 400.
* API process, ``InputProcessor.process_inputs``: the request is stamped with the
  registry's digest and each from-marker steering's marker position (found with the
  tokenizer, which only this process has); a missing marker is a 400.
* engine core, ``EngineCore.add_request``: the same parse and spans the workers will
  compute, so a request that would fail there fails alone (an error for it, the engine
  serving on) before any worker sees it.
* engine core, the prefix cache's block hashes: a block's hash also covers which steering
  touches its positions (and from where), so a block is shared only by requests whose
  recomputation writes the same keys and values into it.
* workers, ``load_model`` and ``_model_forward``: persistent steering buffers and one
  forward hook per steerable layer are installed before vLLM compiles or captures
  (:mod:`steerlab.vllm.buffers`); before each forward the step's coefficients are written
  into them (:mod:`steerlab.vllm.step`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from steerlab.core.errors import SteerlabError
from steerlab.core.policy import marker_end, marker_missing
from steerlab.core.requests import KEY, Rules, parse_steerings
from steerlab.core.steering import Steering
from steerlab.core.vector import SteeringVector
from steerlab.vllm import registry as registries
from steerlab.vllm.buffers import SteeringBuffers
from steerlab.vllm.registry import ENV_VECTORS
from steerlab.vllm.step import (
    PROMPT_LENGTH,
    STAMP,
    RequestSteering,
    Step,
    request_steering,
    spans,
)
from steerlab.vllm.twins import Twin, twin_of
from steerlab.vllm.twins import score as score_twins

log = logging.getLogger("steerlab.vllm")
ENV_PROJECTIONS = "STEERLAB_PROJECTIONS"
_patched = False

__all__ = ["ENV_VECTORS", "register", "vectors"]


def vectors() -> dict[str, SteeringVector]:
    """The vector registry of this process (loaded once from ``$STEERLAB_VECTORS``)."""
    return registries.registry().vectors


def projection_rounds() -> int:
    """ablate/clamp steerings one request may put on one layer (``$STEERLAB_PROJECTIONS``,
    default 0: additions only). Each round costs a projection per slot per steerable layer
    on every compiled step, steered or not, which measured a few percent of an unsteered
    deployment's throughput at batch 1 and 8 here (docs/design.md, "The vLLM engine"); with
    none the plugin's cost was within the noise."""
    raw = os.environ.get(ENV_PROJECTIONS, "0")
    if not raw.isdigit() or int(raw) > 8:
        raise SteerlabError(f"{ENV_PROJECTIONS} must be a whole number from 0 to 8, got {raw!r}")
    return int(raw)


def rules(model_config: Any) -> Rules:
    """What the served model and this plugin accept (the same in every process)."""
    identity, _ = registries.served_identity(model_config)
    return Rules(
        num_layers=identity.num_layers,
        context=int(model_config.max_model_len),
        transient=False,
        sites=False,
        conditions=False,
        max_projections=projection_rounds(),
        dtype=getattr(model_config, "dtype", None),
        other_engine="the Hugging Face engine (steerlab serve without --engine vllm)",
    )


def _checked(model_config: Any) -> registries.Registry:
    """This process's registry, checked against the served model (once)."""
    registry = registries.registry()
    identity, folder = registries.served_identity(model_config)
    registry.check_model(identity, folder)
    return registry


def register() -> None:
    """The plugin entry point (idempotent: vLLM may call it several times per process)."""
    global _patched
    if _patched:
        return
    _patched = True
    try:
        registries.registry()  # loaded now, once, in every process
    except SteerlabError as exc:  # a one-line refusal, not a traceback, in every process
        raise SystemExit(f"steerlab: {exc}") from None
    _patch_api()
    _patch_workers()
    _patch_engine_core()
    _patch_block_hashes()
    _patch_runner()


# ----- the API process: validation and the stamp ---------------------------------------------
def _patch_api() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    verify = SamplingParams.verify

    def checked_verify(self: Any, model_config: Any, *args: Any, **kwargs: Any) -> None:
        verify(self, model_config, *args, **kwargs)
        if self.extra_args and KEY in self.extra_args:
            try:
                parse_steerings(
                    self.extra_args[KEY], _checked(model_config).vectors, rules(model_config)
                )
            except SteerlabError as exc:
                raise VLLMValidationError(str(exc), parameter="steering") from None

    SamplingParams.verify = checked_verify  # type: ignore[method-assign]

    init = InputProcessor.__init__

    def checked_init(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        init(self, vllm_config, *args, **kwargs)
        _checked(vllm_config.model_config)  # a vector for another model stops the server

    InputProcessor.__init__ = checked_init  # type: ignore[method-assign]

    process = InputProcessor.process_inputs

    def stamped(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = process(self, *args, **kwargs)
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        if params is None or not extra or KEY not in extra:
            return request
        registry = _checked(self.model_config)
        ids = list(request.prompt_token_ids or [])
        try:
            steerings = parse_steerings(extra[KEY], registry.vectors, rules(self.model_config))
            length = _prompt_length(extra.get(PROMPT_LENGTH), len(ids))
            markers = _markers(self.tokenizer, ids[: length or len(ids)], steerings)
        except SteerlabError as exc:
            raise VLLMValidationError(str(exc), parameter="steering") from None
        # params is the request's own copy (process_inputs clones the caller's)
        stamp = {"registry": registry.digest, "markers": markers, "prompt_length": length}
        params.extra_args = {**extra, STAMP: stamp}
        return request

    InputProcessor.process_inputs = stamped  # type: ignore[method-assign]


def _prompt_length(raw: Any, tokens: int) -> int | None:
    """A scoring request's steering prompt length: 1 .. its prompt's tokens (None: all)."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= tokens:
        raise SteerlabError(
            f"{PROMPT_LENGTH} must be an integer from 1 to the prompt's {tokens} tokens"
        )
    return raw


def _markers(tokenizer: Any, ids: list[int], steerings: list[Steering]) -> list[int | None]:
    out: list[int | None] = []
    for i, s in enumerate(steerings):
        if not s.policy.needs_marker:
            out.append(None)
            continue
        if tokenizer is None:
            raise SteerlabError(f"steering[{i}]: from-marker needs the server's tokenizer")
        marker = str(s.policy.marker)
        if marker not in tokenizer.decode(ids):
            raise SteerlabError(f"steering[{i}]: {marker_missing(marker)}")
        out.append(marker_end(tokenizer, ids, marker))
    return out


# ----- the engine core: preflight and the workers' registry ------------------------------------
def _patch_workers() -> None:
    """Two methods every vLLM worker answers (``collective_rpc`` by name, which needs no
    serialization of code): its registry's digest, and what its unsteered twins computed (KL
    and unsteered log-probabilities)."""
    from vllm.v1.worker.worker_base import WorkerBase

    def steerlab_registry_digest(self: Any) -> str:
        return registries.registry().digest

    def steerlab_fetch_kl(self: Any, keys: list[str]) -> dict[str, tuple[list[float], list[float]]]:
        from steerlab.vllm.twins import fetch

        return fetch(self, keys)

    WorkerBase.steerlab_registry_digest = steerlab_registry_digest  # type: ignore[attr-defined]
    WorkerBase.steerlab_fetch_kl = steerlab_fetch_kl  # type: ignore[attr-defined]


def _admit(request: Any, model_config: Any) -> RequestSteering | None:
    """Parse a request and compute its spans exactly as the workers will (raises when it
    cannot be steered)."""
    registry = _checked(model_config)
    params = getattr(request, "sampling_params", None)
    steering = request_steering(
        getattr(params, "extra_args", None), registry.vectors, rules(model_config), registry.digest
    )
    if steering is not None:
        spans(steering, int(request.num_prompt_tokens))
    return steering


def _patch_engine_core() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.core import EngineCore

    init = EngineCore.__init__

    def checked_init(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        init(self, vllm_config, *args, **kwargs)
        mine = registries.registry().digest
        try:
            theirs = set(self.model_executor.collective_rpc("steerlab_registry_digest"))
        except Exception as exc:  # an executor that cannot run a function: the stamp still guards
            log.warning("steerlab: could not compare the workers' vector registries (%s)", exc)
            return
        if theirs != {mine}:
            raise SteerlabError(
                f"the vLLM workers loaded another ${ENV_VECTORS} registry than the engine "
                "(the folder changed while they started): restart the server"
            )

    EngineCore.__init__ = checked_init  # type: ignore[method-assign]

    add = EngineCore.add_request

    def admitted(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            _admit(request, self.vllm_config.model_config)
        except SteerlabError as exc:
            log.error("steerlab: request %s cannot be steered: %s", request.request_id, exc)
            send = getattr(self, "_send_error_outputs_to_client", None)
            if send is None:  # the in-process engine: the caller gets the error
                raise VLLMValidationError(str(exc), parameter="steering") from None
            send([request.request_id], request.client_index)  # this request alone fails
            return None
        return add(self, request, *args, **kwargs)

    EngineCore.add_request = admitted  # type: ignore[method-assign]


# ----- the prefix cache: a block's hash covers the steering of its positions ----------------------
def _patch_block_hashes() -> None:
    from vllm.v1.core import kv_cache_utils

    from steerlab.vllm.prefix import steered_keys

    kv_cache_utils.generate_block_hash_extra_keys = steered_keys(
        kv_cache_utils.generate_block_hash_extra_keys
    )


# ----- the workers: buffers installed before compiling, written before each forward -------------
def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners: list[Any] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)  # it overrides load_model
    except ImportError:
        pass
    for cls in runners:
        _patch_load(cls)

    forward = GPUModelRunner._model_forward

    def model_forward(
        self: Any, input_ids: Any = None, positions: Any = None, **kwargs: Any
    ) -> Any:
        step: Step | None = getattr(self, "_steerlab_step", None)
        in_step: list[tuple[int, Any, Twin]] = []
        if step is not None and positions is not None:
            in_step = _before_forward(self, step, positions)
        out = forward(self, input_ids=input_ids, positions=positions, **kwargs)
        if in_step and isinstance(out, torch.Tensor):  # the last stage: unsteered twins' KL
            score_twins(self, out, in_step)
        return out

    GPUModelRunner._model_forward = model_forward  # type: ignore[method-assign]


def _patch_load(cls: Any) -> None:
    load = cls.load_model

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load(self, *args, **kwargs)
        registry = _checked(self.model_config)
        if registry.vectors:
            self._steerlab_step = _install(self, registry)
        return result

    cls.load_model = load_model


def _install(runner: Any, registry: registries.Registry) -> Step:
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise SteerlabError(
            f"steerlab cannot find the decoder layers of {type(model).__name__} in vLLM"
        )
    start = int(getattr(inner, "start_layer", 0))
    end = int(getattr(inner, "end_layer", len(layers)))
    wanted = sorted({layer for v in registry.vectors.values() for layer in v.layers})
    local = [layer for layer in wanted if start <= layer < end]  # this pipeline stage's
    device = next(model.parameters()).device
    buffers = SteeringBuffers(
        registry.vectors, local, int(runner.max_num_tokens), device, projection_rounds()
    )
    runner._steerlab_handles = buffers.install(layers)
    # vLLM caches compiled graphs on disk by a hash of its config: make the steering part of
    # it, so a graph compiled with these hooks is never loaded without them (or the reverse).
    extra = getattr(runner.vllm_config, "additional_config", None)
    if isinstance(extra, dict):
        extra["steerlab"] = {
            "registry": registry.digest,
            "layers": local,
            "rounds": buffers.rounds,
            "slots": buffers.width,
        }
    log.info(
        "steerlab: %d vectors, steerable layers %s on this worker (%d projection rounds)",
        len(registry.vectors), local, buffers.rounds,
    )  # fmt: skip
    return Step(buffers, registry.names)


def _before_forward(
    runner: Any, step: Step, positions: torch.Tensor
) -> list[tuple[int, Any, Twin]]:
    """Write the step's coefficients; the step's unsteered twins (batch index, state, twin)."""
    batch = runner.input_batch
    count = batch.num_reqs
    req_ids = list(batch.req_ids[:count])
    registry = registries.registry()
    rows: list[RequestSteering | None] = []
    lengths: list[int] = []
    in_step: list[tuple[int, Any, Twin]] = []
    for index, req_id in enumerate(req_ids):
        state = runner.requests[req_id]
        if not hasattr(state, "_steerlab"):
            # Admitted by the engine core's preflight with the same registry and rules.
            state._steerlab = request_steering(
                getattr(state.sampling_params, "extra_args", None),
                registry.vectors,
                rules(runner.model_config),
                registry.digest,
            )
            state._steerlab_twin = twin_of(state.sampling_params)
        rows.append(state._steerlab)
        prompt = int(state.num_prompt_tokens)
        lengths.append(prompt if state._steerlab is None else state._steerlab.length(prompt))
        if state._steerlab_twin is not None:
            in_step.append((index, state, state._steerlab_twin))
    starts = [int(x) for x in runner.query_start_loc.cpu[: count + 1].tolist()]
    step.before_forward(req_ids, rows, lengths, starts, positions)
    return in_step
