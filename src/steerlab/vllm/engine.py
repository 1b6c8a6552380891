"""The vLLM engine behind steerlab's own server, CLI and evaluation (``--engine vllm``).

:class:`VllmEngine` implements :class:`steerlab.core.engine.Engine` over vLLM's async engine
(``AsyncLLM``) with the plugin active, running on an event loop of its own in a background
thread. Every row is one vLLM request whose ``extra_args`` name its vectors, so vLLM
schedules rows with continuous batching and the plugin steers each with the same policy
code as the Hugging Face engine. For the server it takes :class:`steerlab.core.jobs.Job`
rows directly (``continuous`` capability): each row's tokens reach its callback as vLLM
makes them, and a row whose client left (or whose deadline passed) is aborted in vLLM at
once. vLLM's default (compiled) mode is used unless ``enforce_eager``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.core.engine import Capabilities
from steerlab.core.errors import SteerlabError
from steerlab.core.jobs import Job, QueueFull
from steerlab.core.steering import Steering
from steerlab.core.vector import ModelIdentity, SteeringVector
from steerlab.vllm.requests import extra_args
from steerlab.vllm.seam import Seam

_POLL = 0.05  # seconds between checks of a running row's cancellation and deadline


CPU_KV_CACHE_GIB = 4


def cpu_kv_cache(environ: Mapping[str, str]) -> dict[str, int]:
    """The KV cache size to give vLLM's CPU build, unless ``VLLM_CPU_KVCACHE_SPACE`` says.

    Its default reserves 92% of the machine's memory and refuses to start when this process
    already holds more than the rest (a sweep extracts on the Hugging Face engine first, in
    the same process): a fixed 4 GiB starts beside it. Other platforms keep vLLM's default.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    return {"kv_cache_memory_bytes": CPU_KV_CACHE_GIB * 2**30}


CPU_BLOCK_SIZE = 32


def block_sizes(asked: int | None) -> dict[str, int]:
    """The KV block size to give vLLM: the one asked for, else ``CPU_BLOCK_SIZE`` on its CPU
    build (whose own 128 shares no prompt shorter than 128 tokens, so a sweep's rows and
    twins would each prefill their whole chat prompt), else vLLM's default."""
    from vllm.platforms import current_platform

    if asked is not None:
        return {"block_size": asked}
    return {"block_size": CPU_BLOCK_SIZE} if current_platform.is_cpu() else {}


SMALL_MACHINE_CPUS = 4
ENV_BIND = "VLLM_CPU_OMP_THREADS_BIND"
ENV_RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def cpu_threads(environ: Mapping[str, str], workers: int, cpus: Sequence[int]) -> dict[str, str]:
    """The CPU binding to give vLLM's CPU build on a small machine, unless the environment
    says (``VLLM_CPU_OMP_THREADS_BIND``).

    Its default keeps one core per worker for the engine's scheduler and binds the worker's
    threads to the rest: on a 2-core machine the one worker computes on one core, beside a
    thread of its own. With one worker and at most ``SMALL_MACHINE_CPUS`` CPUs, the worker
    gets every CPU this process may use (the scheduler mostly waits on it; docs/design.md,
    "The vLLM engine"). Other platforms, parallel engines and larger machines keep vLLM's
    default.
    """
    from vllm.platforms import current_platform

    if (
        not current_platform.is_cpu()
        or ENV_BIND in environ
        or workers != 1
        or not 1 < len(cpus) <= SMALL_MACHINE_CPUS
    ):
        return {}
    return {ENV_BIND: ",".join(str(c) for c in sorted(cpus)), ENV_RESERVED: "0"}


class VllmEngine(Seam):
    """vLLM with steerlab's plugin, for a model spec and a vector folder.

    ``transient``, sites and conditions are refused (the Hugging Face engine has them).

    Args:
        spec: an alias, ``.gguf`` file or checkpoint folder (see :func:`steerlab.vllm.model_dir`).
        vector_dir: the registry folder (every process of the engine loads it, once).
        max_model_len: context length vLLM reserves per request.
        dtype: ``float32`` (default here, for exactness against the HF engine) or ``auto``.
        max_num_seqs: requests vLLM runs at once.
        enforce_eager: run vLLM eagerly instead of its compiled (and CUDA-graph) mode.
        max_queue: rows that may wait or run at once; more raise :class:`QueueFull`.
        tensor_parallel_size, pipeline_parallel_size: vLLM's parallelism.
        enable_prefix_caching: vLLM's prefix cache (steered blocks are keyed by their
            steering, :mod:`steerlab.vllm.prefix`).
        block_size: tokens per KV-cache block (None: vLLM's default, but ``CPU_BLOCK_SIZE``
            on its CPU build). A request reads only whole cached blocks of its prompt: with
            the CPU build's 128, a chat prompt shorter than that is never shared.
    """

    def __init__(
        self,
        spec: str,
        vector_dir: Path | None,
        *,
        max_model_len: int = 2048,
        dtype: str = "float32",
        max_num_seqs: int = 32,
        enforce_eager: bool = False,
        max_queue: int = 256,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        block_size: int | None = None,
    ) -> None:
        # vLLM logs to stdout unless told not to configure logging: keep stdout for results.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise SteerlabError(
                "--engine vllm needs vLLM: pip install 'steerlab[vllm]' (on this CPU "
                "machine: `make .venv-vllm/.steerlab-installed`, then use .venv-vllm/bin/steerlab)"
            ) from None
        from steerlab.vllm import model_dir, plugin, registry

        if vector_dir is not None:
            os.environ[registry.ENV_VECTORS] = str(vector_dir)
            registry.reset()  # this process loads the folder it was given, once
        plugin.register()
        self.registry = registry.registry()
        self.max_queue = max_queue
        self._running = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="steerlab-vllm", daemon=True
        )
        self._thread.start()
        folder = model_dir(spec)
        args = dict(
            model=str(folder),
            dtype=dtype,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            **block_sizes(block_size),
            seed=0,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            disable_log_stats=True,
            logits_processors=["steerlab.vllm.twins:Twins"],  # KL against unsteered twins
            **cpu_kv_cache(os.environ),
        )
        binding = cpu_threads(
            os.environ,
            tensor_parallel_size * pipeline_parallel_size,
            sorted(os.sched_getaffinity(0)),
        )
        saved = {k: os.environ.get(k) for k in binding}
        os.environ.update(binding)  # read when the engine core starts its worker
        try:
            self.engine = self._call(self._start(args))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._tokenizer = self.engine.get_tokenizer()
        config = self.engine.vllm_config.model_config
        text = config.hf_config.get_text_config()
        self._identity = ModelIdentity(
            name=spec,
            architecture=str(getattr(text, "model_type", "unknown")),
            hidden_size=int(text.hidden_size),
            num_layers=int(text.num_hidden_layers),
        )
        self._context = max_model_len
        self._dtype = config.dtype
        self._names: dict[int, str] = self.registry.names
        self.vectors: dict[str, SteeringVector] = dict(self.registry.vectors)
        self.capabilities = Capabilities(
            transient=False,
            sites=False,
            conditions=False,
            explain=False,
            kl=True,
            projections=plugin.projection_rounds(),
            continuous=True,
            activations=False,
        )

    async def _start(self, args: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def _call(self, coro: Any) -> Any:
        """Run a coroutine on the engine's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype  # type: ignore[no-any-return]

    @property
    def context_length(self) -> int:
        return self._context

    def close(self) -> None:
        """Shut vLLM down and stop the engine's loop."""
        try:
            self.engine.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    # ----- requests ------------------------------------------------------------------------
    def entries(self, steerings: Sequence[Steering]) -> list[dict[str, Any]]:
        """The request entries naming each steering's vector in the registry."""
        out = []
        for s in steerings:
            if s.multiplier == 0.0:
                continue
            name = self._name_of(s.vector)
            if s.condition is not None:
                raise SteerlabError(
                    "conditional steering needs the Hugging Face engine: drop --engine vllm"
                )
            entry: dict[str, Any] = {
                "vector": name,
                "multiplier": s.multiplier,
                "layers": list(s.steered_layers),
                "policy": str(s.policy),
                "scale": s.scale,
                "site": s.site,
            }
            if s.operator != "add":
                entry["operator"] = s.operator
            if s.clamp is not None:
                entry["clamp"] = list(s.clamp)
            out.append(entry)
        return out

    def _name_of(self, vector: SteeringVector) -> str:
        """The registry name of a vector: the registry's own object, or one equal to it
        (a vector loaded again from the same file)."""
        name = self._names.get(id(vector))
        if name is None:
            for key, known in self.vectors.items():
                if known.directions.keys() == vector.directions.keys() and all(
                    torch.equal(known.directions[k], vector.directions[k])
                    for k in vector.directions
                ):
                    name = self._names[id(vector)] = key
                    break
        if name is None:
            raise SteerlabError(
                "the vLLM engine steers with registered vectors only: put the vector in "
                "the --vectors folder and name it"
            )
        return name

    def _params(self, job: Job, stop_at_eos: bool = True) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        entries = self.entries(job.steering)
        return SamplingParams(
            max_tokens=job.max_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            ignore_eos=not stop_at_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args(entries) if entries else None,
        )

    def submit(self, job: Job | list[Job]) -> None:
        """Start a row (or a group of rows) in vLLM; each reports through its ``emit``.

        Raises:
            QueueFull: ``max_queue`` rows are waiting or running already.
        """
        jobs = job if isinstance(job, list) else [job]
        with self._lock:
            if self._running + len(jobs) > self.max_queue:
                raise QueueFull
            self._running += len(jobs)
        for j in jobs:
            asyncio.run_coroutine_threadsafe(self._serve(j), self._loop)

    async def _serve(self, job: Job, stop_at_eos: bool = True) -> list[int]:
        """Run one row to its end; returns its tokens (EOS excluded)."""
        from vllm import TokensPrompt

        rid = "steerlab-" + uuid.uuid4().hex
        tokens: list[int] = []
        eos = self._tokenizer.eos_token_id
        reason = "length"
        watch = asyncio.ensure_future(self._watch(job, rid))
        try:
            params = self._params(job, stop_at_eos)
            stream = self.engine.generate(TokensPrompt(prompt_token_ids=list(job.ids)), params, rid)
            async for out in stream:
                completion = out.outputs[0]
                for token in completion.token_ids:
                    if stop_at_eos and token == eos:
                        continue
                    tokens.append(int(token))
                    job.emit("token", int(token))
                    job.emitted += 1
                if out.finished:
                    reason = str(completion.finish_reason or "length")
        except Exception as exc:  # this row fails alone; the engine serves on
            job.close("error", _message(exc))
            return tokens
        finally:
            watch.cancel()
            with self._lock:
                self._running -= 1
        if job.cancelled.is_set():
            return tokens
        if job.expired() or reason == "abort":
            job.close("error", "the request ran past its deadline")
            return tokens
        job.close("done", "stop" if reason == "stop" else "length")
        return tokens

    async def _watch(self, job: Job, rid: str) -> None:
        """Abort the row in vLLM as soon as its client leaves or its deadline passes."""
        while not (job.cancelled.is_set() or job.expired()):
            await asyncio.sleep(_POLL)
        await self.engine.abort(rid)


def _message(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"
