"""Before each forward of a continuous batch: which steering applies to which token, written
into the persistent buffers of :mod:`steerlab.vllm.buffers`.

Per forward the runner's batch gives each request's flattened tokens (``query_start_loc``)
and positions (vLLM's ``positions``, which count from the request's first prompt token);
each request's steerings and spans come from :func:`request_steering` (the same function the
engine core's preflight ran, so it cannot fail here for a request that was admitted).
:class:`steerlab.core.plan.SteeringPlan` gives the 0/1 matrix ``C`` ``[tokens, A]``; fixed
per plan, ``map`` matrices ``[A, L*S]`` turn it into each layer's slot factors and
projection rounds with one matrix product each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerlab.core.errors import SteerlabError
from steerlab.core.plan import Bounds, SteeringPlan
from steerlab.core.requests import KEY, Rules, parse_steerings
from steerlab.core.steering import Steering
from steerlab.core.vector import SteeringVector
from steerlab.vllm.buffers import SteeringBuffers

STAMP = "steerlab"  # extra_args key the API process writes: {"registry", "markers"}
# extra_args key of a scoring request: its steering counts positions from this prompt
# length (the context), not from the whole prompt (context + continuation).
PROMPT_LENGTH = "steerlab_prompt_length"


@dataclass(frozen=True)
class RequestSteering:
    """One admitted request's steerings and, per steering, its marker position (or None);
    ``prompt_length`` overrides the request's own for scoring (see :data:`PROMPT_LENGTH`)."""

    steerings: list[Steering]
    markers: list[int | None]
    prompt_length: int | None = None

    def length(self, prompt_tokens: int) -> int:
        """The P this request's spans count from."""
        return prompt_tokens if self.prompt_length is None else self.prompt_length

    def marker_at(self, steering: Steering) -> int:
        index = next(i for i, s in enumerate(self.steerings) if s is steering)
        marker = self.markers[index]
        if marker is None:
            raise SteerlabError("a from-marker steering without its marker position")
        return marker


def request_steering(
    extra_args: Mapping[str, Any] | None,
    vectors: Mapping[str, SteeringVector],
    rules: Rules,
    digest: str,
) -> RequestSteering | None:
    """A request's steering as every engine process reads it (None: unsteered).

    Raises:
        SteerlabError: entries that do not parse, a stamp from another registry, or a
            from-marker steering the API did not locate.
    """
    if not extra_args or KEY not in extra_args:
        return None
    stamp = extra_args.get(STAMP)
    if not isinstance(stamp, dict) or stamp.get("registry") != digest:
        raise SteerlabError(
            "this request's vectors were checked against another vector registry (the "
            "STEERLAB_VECTORS folder changed while the server started): restart the server"
        )
    steerings = parse_steerings(extra_args[KEY], vectors, rules)
    markers = stamp.get("markers")
    if not isinstance(markers, list) or len(markers) != len(steerings):
        raise SteerlabError("the request's marker positions are missing")
    for s, m in zip(steerings, markers, strict=True):
        if s.policy.needs_marker and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise SteerlabError("a from-marker steering without its marker position")
    length = stamp.get("prompt_length")
    if length is not None and (
        isinstance(length, bool) or not isinstance(length, int) or length < 1
    ):
        raise SteerlabError("the request's steering prompt length is not a positive integer")
    return RequestSteering(steerings, markers, length) if steerings else None


def spans(request: RequestSteering, prompt_len: int) -> list[tuple[int, int]]:
    """Each steering's span ``(lo, hi)`` on the request (``(0, 0)`` for a multiplier of 0,
    which steers nothing), as :meth:`SteeringPlan.bounds` computes it for the workers."""
    out = []
    for s, marker in zip(request.steerings, request.markers, strict=True):
        if s.multiplier == 0.0:
            out.append((0, 0))
            continue
        span = s.span(request.length(prompt_len), marker if s.policy.needs_marker else None)
        out.append((int(span.lo), int(span.hi)))
    return out


class _Maps:
    """Per plan: the ``[A, L*S]`` matrices from C to the buffers' coefficients."""

    def __init__(
        self,
        plan: SteeringPlan,
        rows: Sequence[Sequence[Steering]],
        buffers: SteeringBuffers,
        names: Mapping[int, str],
    ) -> None:
        apps, width = len(plan.apps), buffers.width
        size = len(buffers.layers) * width
        rounds = buffers.rounds
        self.add = torch.zeros(apps, size)
        self.on = torch.zeros(rounds, apps, size)
        self.lo = torch.zeros(rounds, apps, size)
        self.hi = torch.zeros(rounds, apps, size)
        self.actadd: list[tuple[int, int, int, int, float]] = []  # (a, i, slot0, k, factor)
        column = {id(s): a for a, s in enumerate(plan.apps)}
        placed: dict[tuple[int, int], int] = {}  # (app, layer) -> round
        for row in rows:
            seen: dict[int, int] = {}  # layer -> projections so far in this row
            for s in row:
                if s.multiplier == 0.0 or id(s) not in column:
                    continue
                a = column[id(s)]
                name = names[id(s.vector)]
                for layer in s.steered_layers:
                    i = buffers.index.get(layer)
                    if i is None:
                        continue  # another pipeline stage's layer
                    if s.projects:
                        r = seen.get(layer, 0)
                        seen[layer] = r + 1
                        if placed.setdefault((a, layer), r) != r or r >= rounds:
                            raise SteerlabError("a projection outside the engine's rounds")
                        at = i * width + buffers.slots[(name, 0)]
                        lo, hi = s.projection_range
                        self.on[r, a, at], self.lo[r, a, at], self.hi[r, a, at] = 1.0, lo, hi
                    elif s.vector.positionwise:
                        entry = (a, i, buffers.slots[(name, 0)], s.vector.rows, s.factor(layer))
                        if entry not in self.actadd:
                            self.actadd.append(entry)
                    elif (a, layer) not in placed:
                        placed[(a, layer)] = -1
                        self.add[a, i * width + buffers.slots[(name, 0)]] += s.factor(layer)
        device = buffers.c.device
        self.add, self.on = self.add.to(device), self.on.to(device)
        self.lo, self.hi = self.lo.to(device), self.hi.to(device)


class Step:
    """Writes each forward's steering into the buffers (one per model replica)."""

    def __init__(self, buffers: SteeringBuffers, names: Mapping[int, str]) -> None:
        self.buffers = buffers
        self.names = names
        self._cached: tuple[tuple[str, ...], SteeringPlan, Bounds, _Maps] | None = None

    def before_forward(
        self,
        req_ids: Sequence[str],
        rows: Sequence[RequestSteering | None],
        prompt_lengths: Sequence[int],
        starts: Sequence[int],
        positions: torch.Tensor,
    ) -> None:
        """Write the coefficients of a forward whose requests are ``req_ids`` in batch order
        (``starts``: their first token in the flattened batch, and the end)."""
        buffers = self.buffers
        if not any(rows):
            buffers.clear()
            return
        key = tuple(req_ids)
        if self._cached is not None and self._cached[0] == key:
            _, plan, bounds, maps = self._cached
        else:
            lists = [[] if r is None else r.steerings for r in rows]
            plan = SteeringPlan(lists)

            def marker_at(row: int, s: Steering) -> int:
                request = rows[row]
                assert request is not None
                return request.marker_at(s)

            bounds = plan.bounds(list(prompt_lengths), marker_at)
            maps = _Maps(plan, lists, buffers, self.names)
            self._cached = (key, plan, bounds, maps)
        n = int(starts[-1])
        if n > buffers.max_tokens:
            raise SteerlabError(f"a forward of {n} tokens, more than the engine's batch")
        device = buffers.c.device
        counts = torch.tensor([b - a for a, b in zip(starts, starts[1:], strict=False)])
        row = torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)  # [n]
        t = positions[:n].to(device).long()  # [n]
        real = torch.ones(n, dtype=torch.bool, device=device)
        coef = plan.coefficients(bounds, row, t, real).float()  # [n, A]
        layers, width, rounds = len(buffers.layers), buffers.width, buffers.rounds
        c = (coef @ maps.add).view(n, layers, width).transpose(0, 1)  # [L, n, S]
        for a, i, slot0, k, factor in maps.actadd:  # ActAdd: row t of the vector at t
            tokens = torch.nonzero(coef[:, a] > 0).flatten()
            tokens = tokens[t[tokens] < k]
            c = c.clone() if c.is_contiguous() is False else c
            c[i, tokens, slot0 + t[tokens]] += factor
        on = (coef @ maps.on).view(rounds, n, layers, width).transpose(1, 2)  # [R, L, n, S]
        lo = (coef @ maps.lo).view(rounds, n, layers, width).transpose(1, 2)
        hi = (coef @ maps.hi).view(rounds, n, layers, width).transpose(1, 2)
        buffers.write(n, c, on, lo, hi)
