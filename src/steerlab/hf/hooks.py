"""Where steering happens on Hugging Face models: the ``steer()`` context manager and its hooks.

This is the Hugging Face adapter over the engine-independent core
(:mod:`steerlab.core.plan`). One forward pre-hook on the module that runs the decoder
blocks works out, for every token of the current call, its row and its position
*relative to its row's prompt* (from the attention mask, so left padding and the KV cache
are handled) and asks the plan which steerings apply there. One forward hook per steered
block then adds the plan's delta ``C @ W``.

All state lives on the ``Steerer`` object of one call. Hooks are registered in
``__enter__`` inside ``try`` and removed in ``finally``. A ``ContextVar`` tells which
call a thread's forwards belong to (docs/design.md, "Threads"). The decoding loop switches
phases with :meth:`Steerer.logits_pass` and :meth:`Steerer.unsteered`.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from steerlab.core.errors import SteerlabError
from steerlab.core.plan import Bounds, SteeringPlan
from steerlab.core.policy import Policy, marker_end
from steerlab.core.steering import Scale, Steering, as_steerings
from steerlab.core.vector import SteeringVector
from steerlab.hf.layers import (
    LayerMap,
    as_tokens,
    block_output,
    embedding_weight,
    find_layers,
    replace_block_output,
)
from steerlab.hf.positions import token_positions

_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "steerlab_active", default=frozenset()
)
_OPTED_OUT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "steerlab_opted_out", default=False
)


def follow_hooks_in_compiled_graphs() -> bool:
    """Make torch.compile guard on module hooks, so compiled graphs follow steer() calls.

    By default TorchDynamo does not notice hooks added or removed after a compile
    (``skip_nnmodule_hook_guards``): a graph compiled unsteered would ignore the steering,
    and one compiled inside steer() would keep steering after it. With the guard, adding or
    removing steerlab's hooks makes the next call recompile or pick the matching graph.

    Returns:
        Whether the guard was off until now (graphs compiled before may ignore hooks).
    """
    import torch._dynamo.config as dynamo

    was_off = bool(dynamo.skip_nnmodule_hook_guards)
    dynamo.skip_nnmodule_hook_guards = False
    return was_off


@contextmanager
def no_steering() -> Iterator[None]:
    """Forwards inside run unsteered even while another thread's ``steer()`` is active.

    A thread that is in no ``steer()`` call is steered by the one ``steer()`` active on
    the model (so ``Thread(target=model.generate)`` inside ``steer()`` is steered, the
    streaming pattern); wrap a concurrent unsteered thread's forwards in this instead.
    """
    token = _OPTED_OUT.set(True)
    try:
        yield
    finally:
        _OPTED_OUT.reset(token)


class Steerer:
    """The steering of one call on a Hugging Face model. Use :func:`steer`.

    Args:
        model: the causal LM.
        rows: one list of steerings per batch row, or a single list for every row.
        layer_map: decoder blocks (found from the model when omitted).
        prompt_lengths: per-row prompt lengths (real tokens). When omitted, each forward
            that starts without a cache is the prefill and defines them.
        tokenizer: needed by ``from-marker`` policies.
        allow_transient: accept ``transient`` steerings (only a decoding loop that runs
            :meth:`logits_pass` and an unsteered pass per token can honour them).
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
        self.plan = SteeringPlan(rows)
        if self.plan.transient and not allow_transient:
            raise SteerlabError(
                "policy transient needs two forward passes per token: use "
                "steerlab.generate (or `steerlab generate`), not steer() around model.generate"
            )
        if self.plan.needs_marker and tokenizer is None:
            raise SteerlabError("policy from-marker needs the tokenizer: pass tokenizer=")
        self.plan.check_layers(self.layer_map.num_layers)
        self.plan.check_finite(embedding_weight(model).dtype)
        if follow_hooks_in_compiled_graphs() and hasattr(model, "_compiled_call"):
            raise SteerlabError(
                "this model's forward was compiled before steerlab could make compiled graphs "
                "follow hooks, so steering would be silently lost: call torch._dynamo.reset() "
                "(or load the model with steerlab.load_model) before steering"
            )
        self.tokenizer = tokenizer
        self.fixed_lengths = None if prompt_lengths is None else [int(p) for p in prompt_lengths]
        self._steer_newest = False  # inside logits_pass()
        self._enabled = True  # False inside unsteered()
        self._bounds: Bounds | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._local = threading.local()  # per-forward state from the pre-hook, per thread

    @property
    def _forward(self) -> dict[str, Any] | None:
        return getattr(self._local, "forward", None)

    @_forward.setter
    def _forward(self, state: dict[str, Any] | None) -> None:
        self._local.forward = state

    # ----- phases of a decoding loop -----------------------------------------------------
    @contextmanager
    def logits_pass(self) -> Iterator[None]:
        """Forwards inside also steer the newest token of ``transient`` steerings."""
        previous, self._steer_newest = self._steer_newest, True
        try:
            yield
        finally:
            self._steer_newest = previous

    @contextmanager
    def unsteered(self) -> Iterator[None]:
        """Forwards inside are not steered at all (the unsteered shadow of a decoding loop)."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Bounds:
        """Every row's spans from the whole prompt batch, before any forward (for a loop
        whose first steered forward already has a cache)."""
        real = attention_mask.bool()
        self._bounds = self._prefill(input_ids, real, int(input_ids.shape[0]))
        return self._bounds

    def select_rows(self, keep: Sequence[int]) -> None:
        """Keep only the rows ``keep`` (a decoding loop dropping finished rows)."""
        if self._bounds is None:
            return
        index = torch.tensor(list(keep), dtype=torch.long)
        b = self._bounds
        self._bounds = Bounds(b.lo[index], b.hi[index], b.newest, b.any_newest)
        if self.fixed_lengths is not None:
            self.fixed_lengths = [self.fixed_lengths[i] for i in keep]

    # ----- registration -----------------------------------------------------------------
    def __enter__(self) -> Steerer:
        self._ctx_token = _ACTIVE.set(_ACTIVE.get() | {id(self)})
        try:
            if not self.plan.empty:
                base = self.layer_map.base
                self._handles.append(
                    base.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                )
                for layer, site in self.plan.points:
                    module = self.layer_map.site(layer, site)
                    self._handles.append(
                        module.register_forward_hook(self._make_hook((layer, site)))
                    )
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
        self._local = threading.local()
        self.plan.release()
        if hasattr(self, "_ctx_token"):
            _ACTIVE.reset(self._ctx_token)
            del self._ctx_token

    # ----- per forward: positions and the steering matrix --------------------------------
    def _mine(self, module: nn.Module) -> bool:
        """Whether this forward belongs to this call (see :func:`no_steering`)."""
        active = _ACTIVE.get()
        if id(self) in active:
            return True
        if active or _OPTED_OUT.get():
            return False  # this thread is in another steer() call, or opted out
        # A thread in no steer() call, e.g. model.generate started in a Thread inside the
        # `with` block: it belongs to the one steer() call on this model.
        live = [
            hook
            for hook in module._forward_pre_hooks.values()
            if isinstance(getattr(hook, "__self__", None), Steerer)
        ]
        if len(live) > 1:
            raise SteerlabError(
                "a forward from a thread outside any steer() call reached a model that several "
                "steer() calls are steering: start the thread with "
                "contextvars.copy_context().run inside the steer() block it belongs to, or "
                "wrap its forwards in steerlab.no_steering()"
            )
        return True

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._forward = None
        if not self._mine(module):
            return  # another call's forward: leave this call's state alone
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            raise SteerlabError("steerlab needs input_ids or inputs_embeds in the forward call")
        batch, cur = int(x.shape[0]), int(x.shape[1])
        device = x.device
        compiling = torch.compiler.is_compiling()
        t, real, prefill = token_positions(kwargs, batch, cur, device, compiling)
        if prefill and (self._bounds is None or self.fixed_lengths is None):
            self._bounds = self._prefill(ids, real, batch)
        if self._bounds is None:
            raise SteerlabError(
                "steer() saw a cached forward before any prefill: start generation inside "
                "the `with` block, or pass prompt_lengths="
            )
        if not self._enabled:
            return
        rows = self._bounds.rows
        if batch % rows:
            raise SteerlabError(f"batch of {batch} rows does not match the {rows} steered rows")
        # Beam search / num_return_sequences repeat each row batch // rows times.
        row = (torch.arange(batch, device=device) // (batch // rows)).unsqueeze(1)  # [batch, 1]
        newest = torch.zeros(batch, cur, dtype=torch.bool, device=device)
        newest[:, -1] = True  # the newest token of every row in this pass
        coef = self.plan.coefficients(
            self._bounds, row.expand(batch, cur), t, real, newest, self._steer_newest
        )  # [batch, cur, A]
        # Host syncs only outside compiled graphs: there every forward takes the masked add.
        any_on = True if compiling else bool(coef.any())
        self._forward = {
            "coef": coef,
            "on": coef.any(-1, keepdim=True),  # [batch, cur, 1]: tokens some steering covers
            "t": t,
            "any": any_on,
            "all": False if compiling else any_on and bool(coef.all()),
            "cast": {},
        }

    def _prefill(self, ids: torch.Tensor | None, real: torch.Tensor, batch: int) -> Bounds:
        rows = self.plan.num_rows if self.plan.num_rows is not None else batch
        if batch % rows:
            raise SteerlabError(f"steering was given for {rows} rows but the batch has {batch}")
        lengths = (
            self.fixed_lengths
            if self.fixed_lengths is not None
            else [int(n) for n in real.sum(-1).tolist()]
        )
        if rows != batch and len(lengths) == batch:  # an expanded batch: every n-th row
            lengths = lengths[:: batch // rows]
        if len(lengths) != rows:
            raise SteerlabError(
                f"prompt_lengths has {len(lengths)} entries for a batch of {rows} rows"
            )

        def marker_at(r: int, s: Steering) -> int:
            if ids is None:
                raise SteerlabError("policy from-marker needs input_ids, not embeddings")
            src = r * (batch // rows)
            row_ids = ids[src][real[src]].tolist()[: lengths[r]]
            return marker_end(self.tokenizer, row_ids, str(s.policy.marker))

        return self.plan.bounds(lengths, marker_at)

    # ----- per steered point (a block, or its attention or MLP): add C @ W --------------
    def _make_hook(self, point: tuple[int, str]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            state = self._forward
            if state is None or not state["any"]:
                return None
            flat = block_output(output)
            batch, seq = state["t"].shape
            hidden = as_tokens(flat, batch, seq)  # [batch, seq, d]
            delta = self.plan.delta(
                point,
                _coef_on(state, hidden.device, hidden.dtype),
                state["t"],
                hidden,
                state["all"],
            )
            if delta is None:
                return None
            if state["all"]:
                steered = hidden + delta
            else:
                # A masked add: a token no steering covers gets exactly nothing added.
                on = state["on"].to(hidden.device)
                steered = torch.where(on, hidden + delta, hidden)
            return replace_block_output(output, steered.view(flat.shape))

        return hook


def _coef_on(state: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = state["cast"]
    key = (device, dtype)
    if key not in cast:
        cast[key] = state["coef"].to(device=device, dtype=dtype)
    return cast[key]


@contextmanager
def steer(
    model: nn.Module,
    vector: SteeringVector | Steering | Sequence[Steering] | None = None,
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
        per_row: instead of ``vector``'s steerings for every row, one list per batch row
            (``steer(model, per_row=[[s1], [], [s2, s3]])``).
        prompt_lengths: per-row prompt lengths; by default the first uncached forward
            (the prefill) defines them.
        tokenizer: needed for ``from-marker`` policies.
        layer_map: decoder blocks, when the architecture needs an override.

    Example:
        >>> with steer(model, vec, multiplier=4.0, policy="after-prompt"):
        ...     out = model.generate(**inputs, max_new_tokens=32)
    """
    rows: Sequence[Steering] | Sequence[Sequence[Steering]]
    if (vector is None) == (per_row is None):
        raise SteerlabError(
            "steer() takes a vector (or steerings) or per_row=, not both or neither"
        )
    rows = (
        per_row if per_row is not None else as_steerings(vector, multiplier, layers, policy, scale)  # type: ignore[arg-type]
    )
    with Steerer(model, rows, layer_map, prompt_lengths, tokenizer) as steerer:
        yield steerer
