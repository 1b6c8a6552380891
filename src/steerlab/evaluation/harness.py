"""steerlab as an lm-evaluation-harness model: measure what steering costs on any harness task.

``import steerlab.evaluation.harness`` registers the model ``steerlab`` with lm-eval, and
the ``steerlab-lm-eval`` command is lm-eval's own CLI with it registered (lm-eval 0.4 finds
models only in its registry):

    steerlab-lm-eval --model steerlab --tasks TASK --include_path DIR \\
        --model_args pretrained=smollm2-135m,vector=v.safetensors,multiplier=4,layers=9,policy=after-prompt

``pretrained`` is anything :func:`steerlab.load_model` takes; ``engine=vllm`` runs the task
on vLLM (``engine=hf``, the default, on Hugging Face transformers); without ``vector`` (or
with ``multiplier=0``) the model is unsteered. Log-likelihoods treat the request's context
as the prompt, so a policy steers the same positions it would when generating after that
prompt (the engine seam's ``score``); generation runs the engine's ``decode_batch``
(``transient`` included on the Hugging Face engine).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.core.errors import SteerlabError
from steerlab.core.layers import resolve_layers
from steerlab.core.policy import Policy
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise SteerlabError(
        "the lm-evaluation-harness model needs lm_eval: pip install 'steerlab[harness]'"
    ) from exc


log = logging.getLogger(__name__)


def _steering(lm: Any, args: dict[str, str]) -> list[Steering]:
    from steerlab.formats import load_vector

    path = args.get("vector")
    if not path:
        return []
    vector = load_vector(str(path))
    for warning in vector.check_model(lm.identity, args.get("allow_model_mismatch") == "true"):
        log.warning("steerlab: %s", warning)
    layers = args.get("layers")  # lm-eval reads "9" as an int; "8+9" is layers 8 and 9
    chosen = (
        None
        if layers in (None, "")
        else tuple(resolve_layers(str(layers).replace("+", ","), lm.identity.num_layers))
    )
    try:
        multiplier = float(args.get("multiplier", "1"))
    except ValueError:
        raise SteerlabError(f"multiplier={args['multiplier']!r} is not a number") from None
    steering = Steering(
        vector,
        multiplier,
        chosen,
        Policy.parse(str(args.get("policy", "after-prompt"))),
        args.get("scale", "absolute"),  # type: ignore[arg-type]
        args.get("operator", "add"),  # type: ignore[arg-type]
        site=args.get("site"),  # type: ignore[arg-type]
    )
    return [] if steering.multiplier == 0 else [steering]


@register_model("steerlab")
class SteerlabLM(LM):  # type: ignore[misc]
    """A steered steerlab model behind lm-eval's ``LM`` interface."""

    def __init__(
        self, pretrained: str = "smollm2-135m", batch_size: int = 8, **kwargs: str
    ) -> None:
        super().__init__()
        from pathlib import Path

        from steerlab.engines import EngineOptions, engine_entry, require

        device = kwargs.pop("device", None)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's CLI asks for cuda by default, GPU or not
        engine = str(kwargs.pop("engine", "hf"))
        entry = engine_entry(engine)
        folder = None
        if engine != "hf" and kwargs.get("vector"):
            import tempfile

            vector = Path(str(kwargs["vector"]))
            folder = Path(tempfile.mkdtemp(prefix="steerlab-vectors-"))
            (folder / f"v{vector.suffix.lower()}").symlink_to(vector.resolve())
            if kwargs.get("allow_model_mismatch") == "true":
                os.environ["STEERLAB_ALLOW_MODEL_MISMATCH"] = "1"
        options = EngineOptions(pretrained, device, kwargs.pop("dtype", None), folder)
        self.lm = entry.load(options)
        for key in ("max_length", "trust_remote_code", "parallelize"):  # lm-eval's own options
            kwargs.pop(key, None)
        if str(kwargs.get("policy", "")) == "transient":
            require(engine, "transient", "policy=transient")
        self.steering = _steering(self.lm, kwargs)
        self.batch_size = int(batch_size)
        self._transient = any(not s.policy.persisting for s in self.steering)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> SteerlabLM:
        args: dict[str, Any] = {}
        for part in arg_string.split(","):
            if part.strip():
                key, _, value = part.partition("=")
                args[key.strip()] = value.strip()
        for key, value in (additional_config or {}).items():
            if key == "batch_size" and value not in (None, "auto"):
                args.setdefault("batch_size", value)
            elif key == "device" and value:
                args.setdefault("device", value)
        return cls(**args)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lm.tokenizer, "name_or_path", "steerlab"))

    # ----- scoring -------------------------------------------------------------------------
    def _scores(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether it is the greedy continuation."""
        if self._transient and any(len(cont) > 1 for _, cont in pairs):
            raise SteerlabError(
                "policy transient steers one newest token per pass: score log-likelihoods with "
                "a persisting policy (after-prompt, all, ...); generation tasks take transient"
            )
        return self.lm.score(pairs, [self.steering] * len(pairs), batch_size=self.batch_size)

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        tok = self.lm.tokenizer
        pairs = []
        for request in requests:
            context, continuation = request.args
            ctx = tok(context, add_special_tokens=True)["input_ids"] if context else []
            whole = tok(context + continuation, add_special_tokens=True)["input_ids"]
            if not ctx or whole[: len(ctx)] != ctx:  # tokenisation merged across the boundary
                ctx = ctx or [tok.bos_token_id or tok.eos_token_id or 0]
                whole = ctx + tok(continuation, add_special_tokens=False)["input_ids"]
            pairs.append((ctx, whole[len(ctx) :]))
        return self._scores(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        tok = self.lm.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id or 0
        pairs = [([start], tok(r.args[0], add_special_tokens=False)["input_ids"]) for r in requests]
        return [score for score, _ in self._scores(pairs)]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        tok = self.lm.tokenizer
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = tok(context, add_special_tokens=True)["input_ids"]
            sampling = Sampling(
                max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                temperature=float(kwargs.get("temperature", 0.0) or 0.0)
                if kwargs.get("do_sample")
                else 0.0,
            )
            result = self.lm.decode_batch([ids], [self.steering], sampling)
            text = tok.decode(
                result.tokens[0, : result.lengths[0]].tolist(), skip_special_tokens=True
            )
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def main() -> None:
    """``steerlab-lm-eval``: lm-eval's CLI with the ``steerlab`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
