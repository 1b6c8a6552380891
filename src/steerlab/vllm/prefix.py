"""The prefix cache under steering: a KV block's hash also covers which steering touches the
block's positions and from where, so a block is shared only by requests whose recomputation
writes the same keys and values into it (docs/design.md, "The vLLM engine")."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from steerlab.core.errors import SteerlabError
from steerlab.core.requests import KEY, Rules
from steerlab.vllm import registry as registries
from steerlab.vllm.step import request_steering, spans
from steerlab.vllm.twins import block_key


def steered_keys(extra_keys: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's ``generate_block_hash_extra_keys`` with the steering of the block added."""

    def keys(request: Any, start: int, end: int, start_mm_idx: int) -> Any:
        found, mm_idx = extra_keys(request, start, end, start_mm_idx)
        touching = _touching(request, start, end)
        if touching:
            found = (*(found or ()), ("steerlab", touching))
        twin = block_key(getattr(request, "sampling_params", None), start, end)
        if twin is not None:  # an unsteered twin computes the positions it scores
            found = (*(found or ()), twin)
        return found, mm_idx

    return keys


def _touching(request: Any, start: int, end: int) -> str | None:
    """What steers positions ``start .. end-1`` of a request: each steering whose span meets
    them (its entry and where in the block it starts and stops), or None. The keys and values
    of a block depend on exactly this and on the blocks before it, whose hashes chain in."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    if not extra or KEY not in extra:
        return None
    cached = getattr(request, "_steerlab_spans", None)
    if cached is None:
        try:
            entries = extra[KEY] if isinstance(extra[KEY], list) else json.loads(extra[KEY])
            steering = request_steering(
                extra,
                registries.registry().vectors,
                Rules(num_layers=1 << 30, transient=False),
                registries.registry().digest,
            )
            cached = []
            if steering is not None:
                for entry, (lo, hi) in zip(
                    entries, spans(steering, int(request.num_prompt_tokens)), strict=True
                ):
                    if hi > lo:
                        cached.append((json.dumps(entry, sort_keys=True), lo, hi))
        except (SteerlabError, ValueError, TypeError, IndexError):
            # Not admitted (the preflight fails it); never share its blocks meanwhile.
            cached = [(f"unsteerable:{request.request_id}", 0, 1 << 60)]
        request._steerlab_spans = cached
    touching = [
        (entry, max(lo, start), min(hi, end)) for entry, lo, hi in cached if lo < end and hi > start
    ]
    return json.dumps(touching) if touching else None
