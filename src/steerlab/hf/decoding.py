"""Steered decoding on Hugging Face models: one loop for every policy, batched with left padding.

Persisting policies run one forward per token with the steering hooks on. ``transient``
runs two: a steered pass whose logits pick the token, then the cache is cropped back and
an unsteered pass appends the unsteered keys and values (docs/design.md, "Transient").
"""

from __future__ import annotations

import copy
import functools
import secrets
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from steerlab.core.decoded import Decoded
from steerlab.core.engine import OnStep
from steerlab.core.errors import SteerlabError
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.hf.conditions import resolve_conditions
from steerlab.hf.hooks import Steerer
from steerlab.hf.layers import LayerMap, cache_kwarg, find_layers, input_device
from steerlab.hf.tracking import Record, Shadow, select_rows
from steerlab.hf.transient import cache_of, can_share, shared_step

__all__ = ["Decoded", "Sampling", "cache_kwarg", "decode"]


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> Any:
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
    kwargs = {cache_kwarg(model): cache}
    return model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
    )


def _step_forward(module: nn.Module, cache: Any, *, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    return _forward(module, ids, mask, cache)


def _truncate(cache: Any, drop: int, backup: Any) -> Any:
    """The cache without its newest ``drop`` positions (or the backup if it cannot crop)."""
    if backup is not None:
        return backup
    cache.crop(-drop)  # a negative length removes tokens in transformers 4.4x and 5.x
    return cache


def _can_crop(cache: Any) -> bool:
    if not hasattr(cache, "crop"):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return True
    # Sliding-window layers of transformers 5 cannot crop once they have slid.
    return all(type(layer).__name__ in ("DynamicLayer",) for layer in layers)


def _pick(
    logits: torch.Tensor,
    sampling: Sampling,
    generators: list[torch.Generator] | None,
    active: torch.Tensor,
) -> torch.Tensor:
    """The next token of every active row: greedy, or drawn from the row's own generator
    (so a row's draws never depend on the rows beside it)."""
    if sampling.temperature == 0 or generators is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # [rows, vocab]
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p
        keep[..., 0] = True  # the most likely token always stays (top_p's limit)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    probs = probs.cpu()
    rows = [
        torch.multinomial(probs[i], 1, generator=generators[int(r)])
        for i, r in enumerate(active.tolist())
    ]
    return torch.cat(rows).to(logits.device)


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steering: Sequence[Steering] | Sequence[Sequence[Steering]] = (),
    sampling: Sampling | None = None,
    *,
    layer_map: LayerMap | None = None,
    tokenizer: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    return_logits: bool = False,
    track_unsteered: bool = False,
    top_changes: int = 0,
    on_step: OnStep | None = None,
    share: bool = True,
    share_prompts: bool = False,
    seeds: Sequence[int | None] | None = None,
) -> Decoded:
    """Generate from a left-padded batch with steering.

    Args:
        model: the causal LM.
        input_ids: ``[batch, seq]`` left-padded prompt ids.
        attention_mask: ``[batch, seq]`` 1 for real tokens.
        steering: steerings for every row, or one list per row.
        sampling: decoding settings (greedy, 64 tokens by default).
        layer_map: decoder blocks (found from the model when omitted).
        tokenizer: needed for ``from-marker`` policies.
        eos_token_id: stop token(s); default the model config's.
        return_logits: keep every step's steered logits.
        track_unsteered: also run the unsteered model on the same tokens, for per-step KL
            and the unsteered log-probability of each generated token.
        top_changes: with ``track_unsteered``, also keep each step's ``top_changes``
            tokens whose probability the steering changed most (``Decoded.changes``).
        on_step: called after every step with the new tokens ``[batch]`` (the fill token
            for rows that are done) and the rows that are done ``[batch]``. Returning True
            stops decoding; returning per-row flags ``[batch]`` finishes those rows (used
            by the server for per-request lengths and cancellation).
        share: run ``transient`` steps at their physical cost (the blocks up to the
            lowest transient layer once; :mod:`steerlab.hf.transient`). False runs the plain
            two full passes per token; both give the same numbers.
        share_prompts: when no steering touches a row's positions before its last prompt
            token (``after-prompt``, ``transient``, ``window``, unsteered rows), prefill
            every distinct prompt's other tokens once, unsteered, and start each row (and
            its unsteered shadow) from that cache: a sweep's cells share their prompts.
        seeds: per row, the seed of its sampling generator (None: fresh randomness);
            default ``sampling.seed + row`` (fresh randomness without a seed).

    Rows leave the batch as soon as they finish (EOS, or flagged by ``on_step``): they cost
    no more compute, and no row runs past its own length.
    """
    sampling = sampling or Sampling()
    if input_ids.shape != attention_mask.shape:
        raise ValueError("input_ids and attention_mask must have the same shape")
    if bool((attention_mask[:, -1] == 0).any()):
        raise SteerlabError("decode() needs left-padded prompts (a row ends with padding)")
    device = input_device(model)
    ids = input_ids.to(device)
    mask = attention_mask.to(device)
    batch = ids.shape[0]
    eos = eos_token_id if eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    eos_set = {int(e) for e in ([eos] if isinstance(eos, int) else list(eos or []))}
    generators = None
    if sampling.temperature > 0:
        if seeds is None:
            seeds = [None if sampling.seed is None else sampling.seed + r for r in range(batch)]
        if len(seeds) != batch:
            raise SteerlabError(f"{len(seeds)} seeds for a batch of {batch} rows")
        generators = [
            torch.Generator().manual_seed(secrets.randbits(63) if s is None else int(s))
            for s in seeds
        ]
    lengths = [int(n) for n in attention_mask.sum(-1).tolist()]
    layer_map = layer_map or find_layers(model)
    steering = resolve_conditions(model, layer_map, input_ids, attention_mask, steering)
    steerer = Steerer(
        model,
        steering,
        layer_map,
        prompt_lengths=lengths,
        tokenizer=tokenizer,
        allow_transient=True,
    )
    transient = steerer.plan.transient
    persisting = steerer.plan.persisting
    body = steerer.layer_map.base  # the blocks without the LM head, for cache-only passes
    rec = Record(batch, min(eos_set) if eos_set else 0, return_logits, track_unsteered, top_changes)
    active = torch.arange(batch, device=device)  # the original row of each row still decoding
    finished_at = [sampling.max_new_tokens] * batch
    with steerer:
        cache: Any = None
        shadow_cache: Any = None
        # Transient-only tracking gets the unsteered logits from its own second pass.
        needs_shadow = track_unsteered and (persisting or not transient)
        if share_prompts:
            cache, shadow_cache = _shared_prefix(steerer, body, ids, mask, lengths, needs_shadow)
        shadow = Shadow(shadow_cache) if needs_shadow else None

        def unsteered_run(inputs: torch.Tensor, at_mask: torch.Tensor, past: Any) -> Any:
            with steerer.unsteered():
                return _forward(model, inputs, at_mask, past)

        if cache is not None:
            step_ids = ids[:, -1:]
        elif transient:
            # Prefill all but the newest prompt token; transient steering is off there.
            if ids.shape[1] > 1:
                cache = cache_of(_forward(body, ids[:, :-1], mask[:, :-1], None))
            step_ids = ids[:, -1:]
        else:
            step_ids = ids
        for step in range(sampling.max_new_tokens):
            plain_logits: torch.Tensor | None = None
            if transient and cache is not None and share and can_share(cache):
                logits, plain_logits, cache = shared_step(
                    steerer,
                    functools.partial(_step_forward, ids=step_ids, mask=mask),
                    model,
                    body,
                    cache,
                    step_ids.shape[1],
                    track_unsteered and not persisting,
                )
            elif transient:
                backup = None
                if cache is not None and not _can_crop(cache):
                    backup = copy.deepcopy(cache)
                # Pass 1: the newest position steered, for this step's logits only.
                with steerer.logits_pass():
                    out = _forward(model, step_ids, mask, cache)
                logits = out.logits[:, -1, :].float()  # [rows, vocab]
                if cache is not None:  # a one-token prompt has nothing cached to keep
                    cache = _truncate(cache_of(out), step_ids.shape[1], backup)
                # Pass 2: the same token without transient steering; its keys/values persist.
                # Only the cache is needed, so the LM head is skipped unless its logits
                # serve as the unsteered reference.
                if track_unsteered and not persisting:
                    kept = _forward(model, step_ids, mask, cache)
                    plain_logits = kept.logits[:, -1, :].float()
                else:
                    kept = _forward(body, step_ids, mask, cache)
                cache = cache_of(kept)
            else:
                out = _forward(model, step_ids, mask, cache)
                cache = cache_of(out)
                logits = out.logits[:, -1, :].float()
            token = _pick(logits, sampling, generators, active)  # [rows]
            full = rec.step(active, token, logits)  # [batch], fill where done
            if plain_logits is not None:
                rec.compare(active, token, logits, plain_logits)
            elif shadow is not None:
                shadow.add(ids if shadow.fresh else step_ids, active, token, logits)
            finish = torch.zeros(len(active), dtype=torch.bool, device=device)
            if sampling.stop_at_eos and eos_set:
                for e in eos_set:
                    finish |= token == e
            stop_all = False
            if on_step is not None:
                wanted = on_step(full.cpu(), rec.done.cpu() | _scatter(active, finish, batch))
                if wanted is True:
                    stop_all = True
                elif wanted is not None and wanted is not False:
                    flags = torch.as_tensor(list(wanted), dtype=torch.bool, device=device)
                    finish |= flags[active]
            for r in active[finish].tolist():
                finished_at[r] = step + 1
            rec.done[active[finish].cpu()] = True
            last = stop_all or bool(finish.all()) or step == sampling.max_new_tokens - 1
            if shadow is not None and (last or shadow.full or bool(finish.any())):
                shadow.flush(unsteered_run, mask, rec)  # before rows leave or the mask grows
            if last:
                break
            if bool(finish.any()):
                # Finished rows leave the batch: they cost nothing more, and no row runs
                # past the length it asked for (learned-position models have a hard limit).
                keep = torch.nonzero(~finish).flatten()
                active, token, mask = active[keep], token[keep], mask[keep]
                cache = select_rows(cache, keep)
                if shadow is not None:
                    shadow.select_rows(keep)
                steerer.select_rows(keep.tolist())
            step_ids = token[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return rec.result(finished_at)


def _shared_prefix(
    steerer: Steerer,
    body: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    lengths: list[int],
    shadow: bool,
) -> tuple[Any, Any]:
    """The caches of every row's prompt but its last token, each distinct prompt prefilled
    once and unsteered (and a copy for the shadow), or ``(None, None)`` when some steering
    touches those positions or a prompt has a single token."""
    if ids.shape[1] < 2 or min(lengths) < 2:
        return None, None
    if not steerer.plan.empty and not steerer.start(ids, mask).untouched_before(
        [n - 1 for n in lengths]
    ):
        return None, None
    both = torch.cat([ids[:, :-1], mask[:, :-1]], dim=1)
    unique, rows = torch.unique(both, dim=0, return_inverse=True)
    width = ids.shape[1] - 1
    with steerer.unsteered():
        base = cache_of(_forward(body, unique[:, :width], unique[:, width:], None))
    copy_for_shadow = copy.deepcopy(base) if shadow else None
    return select_rows(base, rows), select_rows(copy_for_shadow, rows)


def _scatter(active: torch.Tensor, values: torch.Tensor, batch: int) -> torch.Tensor:
    full = torch.zeros(batch, dtype=torch.bool, device=values.device)
    full[active] = values
    return full
