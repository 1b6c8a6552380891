"""The steering math, engine-independent (docs/design.md, "The steering core").

A :class:`SteeringPlan` holds the steerings of one call: which batch row each applies
to, and per layer the stacked, pre-scaled vectors ``W`` ``[A_l, d]``. An engine gives it,
for every token of a forward pass, the token's row, its position relative to that row's
first real token, whether it is real (not padding) and whether it is the newest token of
its row; the plan answers with the 0/1 matrix ``C`` ``[..., A]`` (which steering applies
to which token) and the per-layer delta ``C @ W`` ``[..., d]`` to add.

The leading dimensions are the engine's: Hugging Face passes ``[batch, seq]``, an engine
with flattened tokens passes ``[tokens]``. Which positions a steering covers comes from
:meth:`steerlab.core.policy.Policy.span` and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from steerlab.core.errors import SteerlabError
from steerlab.core.policy import FAR
from steerlab.core.steering import Steering

MarkerAt = Callable[[int, Steering], int]  # (row, steering) -> index of the marker's last token
Point = tuple[int, str]  # (layer, site): where a steering acts; site "block", "attn" or "mlp"


def _point(where: int | Point) -> Point:
    return (where, "block") if isinstance(where, int) else where


@dataclass(frozen=True)
class Bounds:
    """Per-row spans of every steering: ``lo <= t < hi`` (both ``[rows, A]``, long).

    ``newest`` ``[A]`` marks the steerings that steer only the newest token (transient).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    newest: torch.Tensor
    any_newest: bool

    @property
    def rows(self) -> int:
        return int(self.lo.shape[0])

    def untouched_before(self, first: Sequence[int]) -> bool:
        """Whether no steering touches any row's positions before ``first[row]``."""
        if self.lo.numel() == 0:
            return True
        return bool((self.lo >= torch.tensor(list(first), dtype=torch.long)[:, None]).all())


class SteeringPlan:
    """The steerings of one call, arranged for the per-token math.

    Args:
        rows: one list of steerings per batch row, or a single list for every row.
            Steerings with multiplier 0 are dropped, so such rows stay unsteered bit for bit.
    """

    def __init__(self, rows: Sequence[Steering] | Sequence[Sequence[Steering]]) -> None:
        per_row = bool(rows) and not isinstance(rows[0], Steering)
        row_lists: list[list[Steering]] = (
            [list(r) for r in rows] if per_row else [list(rows)]  # type: ignore[arg-type]
        )
        #: rows the steerings were given for (None: the same steerings for every row)
        self.num_rows: int | None = len(row_lists) if per_row else None
        self.apps: list[Steering] = []
        # The rows a steering applies to (None: every row). One Steering object given to
        # several rows (a server's identical requests) is one column of C, so a uniformly
        # steered batch is a plain broadcast add rather than a [tokens, rows] matmul.
        self.app_rows: list[tuple[int, ...] | None] = []
        column: dict[int, int] = {}  # id(steering) -> its column, per-row plans only
        for r, items in enumerate(row_lists):
            for s in items:
                if s.condition is not None:
                    raise SteerlabError(
                        "conditional steering is decided from the prompt before decoding: use "
                        "steerlab.generate or steerlab.decode on the Hugging Face engine "
                        "(not steer() around model.generate, nor vLLM)"
                    )
                if s.multiplier == 0.0:
                    continue
                a = column.get(id(s)) if per_row else None
                if a is not None and r not in (self.app_rows[a] or ()):
                    self.app_rows[a] = (*(self.app_rows[a] or ()), r)
                    continue
                column[id(s)] = len(self.apps)
                self.apps.append(s)
                self.app_rows.append((r,) if per_row else None)
        if (
            per_row
            and self.apps
            and all(rows == tuple(range(len(row_lists))) for rows in self.app_rows)
        ):
            self.app_rows = [None] * len(self.apps)  # every row steered alike
        # Per point (layer, site): the columns of C it uses, their stacked vectors, and
        # ActAdd matrices.
        self._cols: dict[Point, list[int]] = {}
        self._w: dict[Point, torch.Tensor] = {}  # [A_l, d] float32, CPU
        self._actadd: dict[Point, list[tuple[int, torch.Tensor]]] = {}  # (column, [k, d])
        # ablate / clamp: (column, unit direction [d], lo, hi), in the order given
        self._proj: dict[Point, list[tuple[int, torch.Tensor, float, float]]] = {}
        for a, s in enumerate(self.apps):
            for layer in s.steered_layers:
                at = (layer, str(s.site))
                if s.projects:
                    lo, hi = s.projection_range
                    self._proj.setdefault(at, []).append((a, s.unit(layer), lo, hi))
                elif s.policy.kind == "actadd":
                    self._actadd.setdefault(at, []).append((a, s.delta(layer)))
                else:
                    self._cols.setdefault(at, []).append(a)
        for at, cols in self._cols.items():
            self._w[at] = torch.stack([self.apps[a].delta(at[0]) for a in cols])
        self._index: dict[Point, torch.Tensor | None] = {
            at: None if cols == list(range(len(self.apps))) else torch.tensor(cols)
            for at, cols in self._cols.items()
        }
        self._cast: dict[tuple[str, int, torch.device, torch.dtype], torch.Tensor] = {}

    # ----- what the plan holds -----------------------------------------------------------
    @property
    def points(self) -> list[Point]:
        """Every (layer, site) some steering acts at, by layer."""
        return sorted(set(self._cols) | set(self._actadd) | set(self._proj))

    @property
    def layers(self) -> list[int]:
        """Every layer some steering acts at (any site), ascending."""
        return sorted({layer for layer, _ in self.points})

    def reads_hidden(self, where: int | Point) -> bool:
        """Whether the change at a point depends on the hidden state (ablate, clamp)."""
        return _point(where) in self._proj

    @property
    def empty(self) -> bool:
        return not self.apps

    @property
    def transient(self) -> bool:
        """Whether some steering steers only the newest token (two passes per token)."""
        return any(not s.policy.persisting for s in self.apps)

    @property
    def unchanged_blocks(self) -> int:
        """How many blocks from the bottom transient steering leaves unchanged: those below
        its lowest layer, and that block too when it steers the block's output."""
        ends = [
            layer + 1 if s.site == "block" else layer
            for s in self.apps
            if not s.policy.persisting
            for layer in s.steered_layers
        ]
        if not ends:
            raise SteerlabError("no transient steering in this plan")
        return min(ends)

    @property
    def persisting(self) -> bool:
        """Whether some steering persists in the KV cache."""
        return any(s.policy.persisting for s in self.apps)

    @property
    def needs_marker(self) -> bool:
        return any(s.policy.needs_marker for s in self.apps)

    def check_layers(self, num_layers: int) -> None:
        """Raises SteerlabError when a steering names a layer the model lacks."""
        for s in self.apps:
            top = max(s.steered_layers or (0,))
            if top >= num_layers:
                raise SteerlabError(
                    f"layer {top} does not exist: the model has layers 0..{num_layers - 1}"
                )

    def check_finite(self, dtype: torch.dtype) -> None:
        """Raises SteerlabError when a delta overflows ``dtype`` (e.g. float16's 65504)."""
        for at in self.points:
            layer = at[0]
            tensors = ([self._w[at]] if at in self._w else []) + [
                m for _, m in self._actadd.get(at, ())
            ]
            for tensor in tensors:
                if not bool(torch.isfinite(tensor.to(dtype)).all()):
                    raise SteerlabError(
                        f"a steering at layer {layer} overflows the model's "
                        f"{str(dtype).removeprefix('torch.')}: use a smaller multiplier"
                    )

    # ----- per call: the spans of every row ----------------------------------------------
    def bounds(self, prompt_lengths: Sequence[int], marker_at: MarkerAt | None = None) -> Bounds:
        """Each steering's span on each row, from the rows' prompt lengths.

        Args:
            prompt_lengths: P per row (real tokens).
            marker_at: for ``from-marker`` steerings, the marker's last token in a row.

        Raises:
            SteerlabError: per-row steerings for another number of rows.
        """
        rows = len(prompt_lengths)
        if self.num_rows is not None and self.num_rows != rows:
            raise SteerlabError(
                f"steering was given for {self.num_rows} rows but the batch has {rows}"
            )
        n_apps = len(self.apps)
        lo = torch.full((rows, n_apps), FAR, dtype=torch.long)
        hi = torch.full((rows, n_apps), FAR, dtype=torch.long)
        newest = torch.zeros(n_apps, dtype=torch.bool)
        for a, s in enumerate(self.apps):
            owners = self.app_rows[a]
            for r in range(rows) if owners is None else owners:
                marker = None
                if s.policy.needs_marker:
                    if marker_at is None:
                        raise SteerlabError("policy from-marker needs the prompt's token ids")
                    marker = marker_at(r, s)
                span = s.span(int(prompt_lengths[r]), marker)
                lo[r, a], hi[r, a] = span.lo, span.hi
                newest[a] = span.newest_only
        return Bounds(lo, hi, newest, bool(newest.any()))

    # ----- per forward: which steering applies to which token ----------------------------
    def coefficients(
        self,
        bounds: Bounds,
        row: torch.Tensor,
        t: torch.Tensor,
        real: torch.Tensor,
        newest: torch.Tensor | None = None,
        steer_newest: bool = False,
    ) -> torch.Tensor:
        """The 0/1 matrix C ``[..., A]`` (bool) of the tokens of one forward pass.

        Args:
            bounds: from :meth:`bounds`.
            row: each token's row ``[...]`` (long).
            t: each token's position relative to its row's first real token ``[...]``.
            real: False for padding ``[...]``.
            newest: True for the newest token of its row in this pass ``[...]``; needed
                when some steering steers only the newest token.
            steer_newest: whether this pass is one whose newest token is steered by those
                steerings (the logits pass of transient decoding).
        """
        device = t.device
        lo = bounds.lo.to(device)[row]  # [..., A]
        hi = bounds.hi.to(device)[row]  # [..., A]
        tt = t.unsqueeze(-1)  # [..., 1]
        coef = (tt >= lo) & (tt < hi) & real.unsqueeze(-1)  # [..., A]
        if bounds.any_newest:
            only_newest = bounds.newest.to(device)  # [A]
            if steer_newest:
                if newest is None:
                    raise SteerlabError("transient steering needs each row's newest token")
                coef = coef & (~only_newest | newest.unsqueeze(-1))
            else:
                coef = coef & ~only_newest
        return coef

    # ----- per layer: the delta to add ---------------------------------------------------
    def _on(self, kind: str, layer: int, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (kind, layer, like.device, like.dtype)
        cached = self._cast.get(key)
        if cached is None:
            cached = self._cast[key] = tensor.to(like.device, like.dtype)
        return cached

    def delta(
        self,
        where: int | Point,
        coef: torch.Tensor,
        t: torch.Tensor,
        like: torch.Tensor,
        all_on: bool,
    ) -> torch.Tensor | None:
        """The tensor to add at a point (a layer means its block output): ``[..., d]``, or
        ``[d]`` to broadcast, or None.

        The projection operators act first, in the order given, each on the result of the
        one before (``ablate`` then ``add`` along the same direction sets the projection to
        the added amount); then every ``add`` is added (docs/design.md, "Operators").

        Args:
            coef: C from :meth:`coefficients`, already in ``like``'s dtype and device.
            t: the tokens' positions (for ActAdd rows).
            like: the block's output ``[..., d]`` the delta will be added to; ablate and
                clamp read it (see :meth:`reads_hidden`), add only takes its device and dtype.
            all_on: every entry of C is 1 (then a single steering is a plain add).
        """
        at = _point(where)
        layer = at[0]
        out: torch.Tensor | None = None
        for a, unit, lo, hi in self._proj.get(at, ()):
            u = self._on(f"unit{a}", layer, unit, like)  # [d]
            h = like if out is None else like + out
            p = (h * u).sum(-1, keepdim=True)  # [..., 1]: the projection onto u
            part = coef[..., a : a + 1] * (p.clamp(lo, hi) - p) * u  # [..., d]
            out = part if out is None else out + part
        if at in self._w:
            w = self._on(f"w{at[1]}", layer, self._w[at], like)  # [A_l, d]
            index = self._index[at]
            if all_on and index is None and w.shape[0] == 1:
                added = w[0]  # every token steered by the one steering: plain add
            else:
                c = coef if index is None else coef[..., index.to(coef.device)]
                added = c @ w  # [..., A_l] @ [A_l, d] -> [..., d]
            out = added if out is None else out + added
        for a, matrix in self._actadd.get(at, ()):
            rows = self._on(f"actadd{a}", layer, matrix, like)  # [k, d]
            index_t = t.to(like.device).clamp(0, rows.shape[0] - 1)
            part = coef[..., a : a + 1] * rows[index_t]  # [..., d]
            out = part if out is None else out + part
        return out

    def release(self) -> None:
        """Drop the device copies of the vectors (at the end of the call)."""
        self._cast.clear()
