"""The vLLM engine behind steerlab's own server and CLI (``--engine vllm``).

:class:`VllmEngine` implements :class:`steerlab.core.engine.Engine` over an in-process
``vllm.LLM`` with the plugin active: each row becomes one vLLM request whose
``extra_args`` name its vectors, so vLLM schedules the rows with continuous batching and
the plugin steers each with the same policy code as the Hugging Face engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerlab.core.decoded import Decoded
from steerlab.core.engine import OnStep
from steerlab.core.errors import SteerlabError
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.core.vector import ModelIdentity, SteeringVector
from steerlab.vllm.requests import extra_args


class VllmEngine:
    """vLLM with steerlab's plugin, for a model spec and a vector folder.

    ``transient`` is refused: it needs two passes per token, which vLLM's scheduler does not
    run (the Hugging Face engine has it).

    Args:
        spec: an alias, ``.gguf`` file or checkpoint folder (see :func:`steerlab.vllm.model_dir`).
        vector_dir: the registry folder (every process of the engine loads it).
        max_model_len: context length vLLM reserves per request.
        dtype: ``float32`` (default here, for exactness against the HF engine) or ``auto``.
    """

    def __init__(
        self,
        spec: str,
        vector_dir: Path | None,
        *,
        max_model_len: int = 2048,
        dtype: str = "float32",
        max_num_seqs: int = 16,
    ) -> None:
        # vLLM logs to stdout unless told not to configure logging: keep stdout for results.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        try:
            import vllm
        except ImportError:
            raise SteerlabError(
                "--engine vllm needs vLLM: pip install 'steerlab[vllm]' (on this CPU "
                "machine: `make .venv-vllm/.installed`, then use .venv-vllm/bin/steerlab)"
            ) from None
        from steerlab.vllm import model_dir, plugin

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if vector_dir is not None:
            os.environ[plugin.ENV_VECTORS] = str(vector_dir)
        plugin._registry = None
        plugin.register()
        folder = model_dir(spec)
        self.llm = vllm.LLM(
            model=str(folder),
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=True,
            seed=0,
        )
        self._tokenizer = self.llm.get_tokenizer()
        config = self.llm.llm_engine.model_config.hf_config
        self._identity = ModelIdentity(
            name=spec,
            architecture=str(getattr(config, "model_type", "unknown")),
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
        )
        self._context = max_model_len
        self._names: dict[int, str] = {id(v): k for k, v in plugin.vectors().items()}
        self.vectors: dict[str, SteeringVector] = dict(plugin.vectors())

    supports_transient = False
    supports_explain = False  # per-token KL needs a second, unsteered model pass
    supports_conditions = False  # conditions are decided by the HF engine's decode

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def context_length(self) -> int:
        return self._context

    def entries(self, steerings: Sequence[Steering]) -> list[dict[str, Any]]:
        """The request entries naming each steering's vector in the registry."""
        out = []
        for s in steerings:
            if s.multiplier == 0.0:
                continue
            name = self._names.get(id(s.vector))
            if name is None:
                raise SteerlabError(
                    "the vLLM engine steers with registered vectors only: put the vector in "
                    "the --vectors folder and name it"
                )
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

    def decode_batch(
        self,
        prompts: Sequence[Sequence[int]],
        steering: Sequence[Sequence[Steering]],
        sampling: Sampling,
        *,
        on_step: OnStep | None = None,
        explain: int = 0,
    ) -> Decoded:
        """Generate every row as its own vLLM request; ``on_step`` sees the tokens after."""
        from vllm import SamplingParams, TokensPrompt

        if explain:
            raise SteerlabError(
                "per-token KL needs the Hugging Face engine (steerlab serve without --engine vllm)"
            )

        params = []
        for r, row in enumerate(steering):
            entries = self.entries(row)
            params.append(
                SamplingParams(
                    max_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=None if sampling.seed is None else sampling.seed + r,
                    ignore_eos=not sampling.stop_at_eos,
                    extra_args=extra_args(entries) if entries else None,
                )
            )
        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        rows = [list(o.outputs[0].token_ids) for o in outputs]
        eos = self._tokenizer.eos_token_id
        fill = int(eos) if eos is not None else 0
        width = max((len(r) for r in rows), default=0)
        tokens = torch.full((len(rows), max(width, 1)), fill, dtype=torch.long)
        for r, row in enumerate(rows):
            tokens[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        if on_step is not None:
            done = torch.zeros(len(rows), dtype=torch.bool)
            for step in range(width):
                done |= torch.tensor([step >= len(row) for row in rows])
                if on_step(tokens[:, step], done) is True:
                    break
        return Decoded(tokens=tokens, lengths=[len(r) for r in rows])
