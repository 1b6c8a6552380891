"""Where steering happens: the ``steer()`` context manager and its hooks.

One forward pre-hook on the module that runs the decoder blocks works out, for every
token of the current call, its position *relative to its row's prompt* (from the
attention mask, so left padding and the KV cache are handled) and which steerings apply
there. One forward hook per steered block then adds ``C @ W``: ``C`` is that
[batch, seq, n_steerings] 0/1 matrix and ``W`` the stacked, pre-scaled vectors.

All state lives on the ``Steerer`` object of one call. Hooks are registered in
``__enter__`` inside ``try`` and removed in ``finally``; a ``ContextVar`` makes them
no-ops for forwards that belong to another thread's call.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from steerlab.errors import SteerlabError
from steerlab.layers import LayerMap, block_output, find_layers, replace_block_output
from steerlab.policy import Policy, marker_end
from steerlab.vector import SteeringVector

Scale = Literal["absolute", "relative"]
_FAR = 1 << 60  # "no bound" for position intervals
_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "steerlab_active", default=frozenset()
)


@dataclass(frozen=True)
class Steering:
    """One vector applied with one multiplier, set of layers and position policy.

    Args:
        vector: the steering vector.
        multiplier: alpha in ``h <- h + alpha * v``.
        layers: the layers to steer (default: every layer of the vector).
        policy: a :class:`Policy` or its name, e.g. ``after-prompt``.
        scale: ``absolute`` adds ``alpha * v``; ``relative`` adds a vector of norm
            ``alpha * (mean residual norm at that layer)`` in the direction of ``v``.
    """

    vector: SteeringVector
    multiplier: float = 1.0
    layers: tuple[int, ...] | None = None
    policy: Policy = field(default_factory=Policy)
    scale: Scale = "absolute"

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))
        if not math.isfinite(self.multiplier):
            raise SteerlabError(f"multiplier must be a finite number, got {self.multiplier}")
        if self.scale not in ("absolute", "relative"):
            raise SteerlabError(f"scale must be 'absolute' or 'relative', got {self.scale!r}")
        layers = tuple(self.vector.layers if self.layers is None else self.layers)
        missing = [layer for layer in layers if layer not in self.vector.directions]
        if missing:
            raise SteerlabError(
                f"the vector has no layer {missing[0]}: it has layers "
                f"{','.join(map(str, self.vector.layers))}"
            )
        object.__setattr__(self, "layers", layers)
        if (self.policy.kind == "actadd") != self.vector.positionwise:
            raise SteerlabError(
                "policy actadd needs a position-wise (k x d) vector from `steerlab extract "
                "--format actadd`, and a position-wise vector needs policy actadd"
            )
        if self.scale == "relative":
            absent = [layer for layer in layers if layer not in self.vector.residual_norms]
            if absent:
                raise SteerlabError(
                    f"--scale relative needs the residual norm of layer {absent[0]}, which the "
                    "vector does not record: use --scale absolute"
                )

    def delta(self, layer: int) -> torch.Tensor:
        """The float32 tensor added at ``layer`` (``[d]`` or ``[k, d]``)."""
        v = self.vector.directions[layer]
        if self.scale == "absolute":
            return v * self.multiplier
        norm = float(v.norm()) / math.sqrt(v.shape[0]) if v.dim() == 2 else float(v.norm())
        if norm == 0.0:
            return v * 0.0
        return v * (self.multiplier * self.vector.residual_norms[layer] / norm)


def as_steerings(
    vector: SteeringVector | Steering | Sequence[Steering],
    multiplier: float = 1.0,
    layers: Sequence[int] | None = None,
    policy: str | Policy = "after-prompt",
    scale: Scale = "absolute",
) -> list[Steering]:
    """Normalise the ways of naming steering into a list of :class:`Steering`."""
    if isinstance(vector, SteeringVector):
        return [
            Steering(
                vector,
                multiplier,
                None if layers is None else tuple(layers),
                Policy.parse(policy),
                scale,
            )
        ]
    if isinstance(vector, Steering):
        return [vector]
    return list(vector)


class Steerer:
    """The steering of one call. Use :func:`steer`; the decoding loop uses it directly.

    Args:
        model: the causal LM.
        rows: one list of steerings per batch row, or a single list for every row.
        layer_map: decoder blocks (found from the model when omitted).
        prompt_lengths: per-row prompt lengths (real tokens). When omitted, each forward
            that starts without a cache is the prefill and defines them.
        tokenizer: needed by ``from-marker`` policies.
    """

    def __init__(
        self,
        model: nn.Module,
        rows: Sequence[Steering] | Sequence[Sequence[Steering]],
        layer_map: LayerMap | None = None,
        prompt_lengths: Sequence[int] | None = None,
        tokenizer: Any = None,
        allow_transient: bool = False,
    ) -> None:
        self.model = model
        self.layer_map = layer_map or find_layers(model)
        per_row = bool(rows) and not isinstance(rows[0], Steering)
        row_lists: list[list[Steering]] = (
            [list(r) for r in rows] if per_row else [list(rows)]  # type: ignore[arg-type]
        )
        self.per_row = per_row
        # Multiplier 0 is dropped so that it is unsteered bit for bit.
        self.apps: list[Steering] = []
        self.app_rows: list[list[int]] = []
        for r, items in enumerate(row_lists):
            for s in items:
                if s.multiplier == 0.0:
                    continue
                self.apps.append(s)
                self.app_rows.append([r])
        for s in self.apps:
            if s.policy.kind == "transient" and not allow_transient:
                raise SteerlabError(
                    "policy transient needs two forward passes per token: use "
                    "steerlab.generate (or `steerlab generate`), not steer() around model.generate"
                )
            if s.policy.kind == "from-marker" and tokenizer is None:
                raise SteerlabError("policy from-marker needs the tokenizer: pass tokenizer=")
            if max(s.layers or (0,)) >= self.layer_map.num_layers:
                raise SteerlabError(
                    f"layer {max(s.layers or (0,))} does not exist: the model has layers "
                    f"0..{self.layer_map.num_layers - 1}"
                )
        self.num_rows = len(row_lists) if per_row else None
        self.tokenizer = tokenizer
        self.fixed_lengths = None if prompt_lengths is None else [int(p) for p in prompt_lengths]
        self.transient_phase = False  # set by the decoding loop for the logits pass
        self.enabled = True  # False for unsteered shadow passes of the decoding loop
        # Per layer: app indices, stacked vectors [A_l, d] (float32, CPU), and ActAdd apps.
        self._layer_apps: dict[int, list[int]] = {}
        self._layer_w: dict[int, torch.Tensor] = {}
        self._layer_actadd: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for a, s in enumerate(self.apps):
            for layer in s.layers or ():
                if s.policy.kind == "actadd":
                    self._layer_actadd.setdefault(layer, []).append((a, s.delta(layer)))
                else:
                    self._layer_apps.setdefault(layer, []).append(a)
        for layer, idx in self._layer_apps.items():
            self._layer_w[layer] = torch.stack([self.apps[a].delta(layer) for a in idx])
        self._cast: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._lo: torch.Tensor | None = None  # [rows, A] first steered position
        self._hi: torch.Tensor | None = None  # [rows, A] first position past the steered span
        self._transient_cols: torch.Tensor | None = None  # [A] bool
        self._forward: dict[str, Any] | None = None  # per-forward state from the pre-hook

    # ----- registration -----------------------------------------------------------------
    def __enter__(self) -> Steerer:
        self._ctx_token = _ACTIVE.set(_ACTIVE.get() | {id(self)})
        try:
            if self.apps:
                base = self.layer_map.base
                self._handles.append(
                    base.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                )
                for layer in sorted(set(self._layer_apps) | set(self._layer_actadd)):
                    block = self.layer_map.blocks[layer]
                    self._handles.append(block.register_forward_hook(self._make_hook(layer)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._forward = None
        self._cast.clear()
        if hasattr(self, "_ctx_token"):
            _ACTIVE.reset(self._ctx_token)
            del self._ctx_token

    def _mine(self) -> bool:
        return self.enabled and id(self) in _ACTIVE.get()

    # ----- per forward: positions and the steering matrix --------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(self) not in _ACTIVE.get():
            return  # another thread's forward: leave this call's state alone
        self._forward = None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            raise SteerlabError("steerlab needs input_ids or inputs_embeds in the forward call")
        batch, cur = int(x.shape[0]), int(x.shape[1])
        mask = kwargs.get("attention_mask")
        device = x.device
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = int(mask.shape[1]) - cur
            counts = mask.long().cumsum(-1)  # [batch, past + cur]
            t = counts[:, past:] - 1  # position relative to the row's first real token
            real = mask[:, past:].bool()
        else:
            past = _cache_length(kwargs)
            t = torch.arange(past, past + cur, device=device).expand(batch, cur)
            real = torch.ones(batch, cur, dtype=torch.bool, device=device)
        if past == 0 and (self._lo is None or self.fixed_lengths is None):
            self._prefill(ids, real, batch)
        if self._lo is None:
            raise SteerlabError(
                "steer() saw a cached forward before any prefill: start generation inside "
                "the `with` block, or pass prompt_lengths="
            )
        lo, hi = self._lo.to(device), self._hi.to(device)  # type: ignore[union-attr]
        if lo.shape[0] != batch:  # beam search / num_return_sequences expand rows
            if batch % lo.shape[0]:
                raise SteerlabError(
                    f"batch of {batch} rows does not match the {lo.shape[0]} steered rows"
                )
            factor = batch // lo.shape[0]
            lo, hi = lo.repeat_interleave(factor, dim=0), hi.repeat_interleave(factor, dim=0)
        if self._transient_cols is not None:
            # Transient steerings: the newest position of their own rows, in the logits pass.
            newest = t[:, -1:].expand(batch, lo.shape[1])  # [batch, A]
            on = self._transient_cols.to(device) & (hi == _FAR - 1)
            lo = torch.where(on & self.transient_phase, newest, torch.where(on, _FAR, lo))
        if not self.enabled:
            return
        tt = t.unsqueeze(-1)  # [batch, cur, 1]
        coef = (tt >= lo.unsqueeze(1)) & (tt < hi.unsqueeze(1)) & real.unsqueeze(-1)  # [b, cur, A]
        any_on = bool(coef.any())
        self._forward = {
            "coef": coef,
            "t": t,
            "any": any_on,
            "all": any_on and bool(coef.all()),
            "cast": {},
        }

    def _prefill(self, ids: torch.Tensor | None, real: torch.Tensor, batch: int) -> None:
        rows = self.num_rows if self.num_rows is not None else batch
        if self.num_rows is not None and batch % self.num_rows:
            raise SteerlabError(
                f"steering was given for {self.num_rows} rows but the batch has {batch}"
            )
        lengths = (
            self.fixed_lengths
            if self.fixed_lengths is not None
            else [int(n) for n in real.sum(-1).tolist()]
        )
        if rows != batch:  # per-row steering for an expanded batch: take every n-th row
            lengths = lengths[:: batch // rows] if len(lengths) == batch else lengths
        if len(lengths) != rows:
            raise SteerlabError(
                f"prompt_lengths has {len(lengths)} entries for a batch of {rows} rows"
            )
        n_apps = len(self.apps)
        lo = torch.full((rows, n_apps), _FAR, dtype=torch.long)
        hi = torch.full((rows, n_apps), _FAR, dtype=torch.long)
        transient = torch.zeros(n_apps, dtype=torch.bool)
        for a, s in enumerate(self.apps):
            targets = self.app_rows[a] if self.per_row else range(rows)
            for r in targets:
                p = lengths[r]
                kind = s.policy.kind
                if kind == "all":
                    lo[r, a] = 0
                elif kind == "after-prompt":
                    lo[r, a] = max(p - 1, 0)
                elif kind == "prompt":
                    lo[r, a], hi[r, a] = 0, p
                elif kind == "actadd":
                    lo[r, a], hi[r, a] = 0, s.vector.rows
                elif kind == "transient":
                    transient[a] = True
                    hi[r, a] = _FAR - 1  # marks the rows this transient steering belongs to
                elif kind == "from-marker":
                    if ids is None:
                        raise SteerlabError("policy from-marker needs input_ids, not embeddings")
                    src = r * (batch // rows)
                    row_ids = ids[src][real[src]].tolist()[:p]
                    lo[r, a] = marker_end(self.tokenizer, row_ids, str(s.policy.marker))
        self._lo, self._hi = lo, hi
        self._transient_cols = transient if bool(transient.any()) else None

    # ----- per block: add C @ W ----------------------------------------------------------
    def _make_hook(self, layer: int) -> Any:
        apps = self._layer_apps.get(layer, [])
        actadd = self._layer_actadd.get(layer, [])
        n_apps = len(self.apps)
        cols = None if apps == list(range(n_apps)) else torch.tensor(apps, dtype=torch.long)

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            state = self._forward
            if state is None or not state["any"] or not self._mine():
                return None
            hidden = block_output(output)  # [batch, seq, d]
            key = (layer, hidden.device, hidden.dtype)
            delta: torch.Tensor | None = None
            if apps:
                w = self._cast.get(key)
                if w is None:
                    w = self._cast[key] = self._layer_w[layer].to(hidden.device, hidden.dtype)
                if state["all"] and len(apps) == 1 and cols is None:
                    delta = w[0]  # every position steered by the one steering: plain add
                else:
                    coef = _coef_on(state, hidden.device, hidden.dtype)
                    if cols is not None:
                        coef = coef[..., cols.to(coef.device)]
                    delta = coef @ w  # [batch, seq, A_l] @ [A_l, d] -> [batch, seq, d]
            for a, matrix in actadd:
                coef = _coef_on(state, hidden.device, hidden.dtype)[..., a : a + 1]
                rows = matrix.to(hidden.device, hidden.dtype)  # [k, d]
                t = state["t"].to(hidden.device).clamp(0, rows.shape[0] - 1)
                part = coef * rows[t]  # [batch, seq, d]
                delta = part if delta is None else delta + part
            if delta is None:
                return None
            return replace_block_output(output, hidden + delta)

        return hook


def _coef_on(state: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = state["cast"]
    key = (device, dtype)
    if key not in cast:
        cast[key] = state["coef"].to(device=device, dtype=dtype)
    return cast[key]


def _cache_length(kwargs: dict[str, Any]) -> int:
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


@contextmanager
def steer(
    model: nn.Module,
    vector: SteeringVector | Steering | Sequence[Steering],
    *,
    multiplier: float = 1.0,
    layers: Sequence[int] | None = None,
    policy: str | Policy = "after-prompt",
    scale: Scale = "absolute",
    per_row: Sequence[Sequence[Steering]] | None = None,
    prompt_lengths: Sequence[int] | None = None,
    tokenizer: Any = None,
    layer_map: LayerMap | None = None,
) -> Iterator[Steerer]:
    """Steer every forward pass of ``model`` inside the ``with`` block.

    Works with ``model.generate()`` (greedy, sampling, beam search) and plain forward
    calls, with or without a KV cache and with left- or right-padded batches. Nothing
    outlives the block, also after an exception.

    Args:
        model: a Hugging Face causal LM.
        vector: a vector (with ``multiplier``, ``layers``, ``policy``, ``scale``), one
            :class:`Steering`, or a list of them applied together.
        per_row: instead of ``vector``'s steerings for every row, one list per batch row.
        prompt_lengths: per-row prompt lengths; by default the first uncached forward
            (the prefill) defines them.
        tokenizer: needed for ``from-marker`` policies.
        layer_map: decoder blocks, when the architecture needs an override.

    Example:
        >>> with steer(model, vec, multiplier=4.0, policy="after-prompt"):
        ...     out = model.generate(**inputs, max_new_tokens=32)
    """
    rows: Sequence[Steering] | Sequence[Sequence[Steering]]
    rows = (
        per_row if per_row is not None else as_steerings(vector, multiplier, layers, policy, scale)
    )
    with Steerer(model, rows, layer_map, prompt_lengths, tokenizer) as steerer:
        yield steerer
