"""Steering inside vLLM's compiled graph: persistent tensors and the hooks that read them
(docs/design.md, "The vLLM engine").

The registry is fixed at start, so every vector a request can name is known before vLLM
compiles (or captures) its graph. Per steerable layer (one some registered vector has) the
engine holds, allocated once on the model's device and never reallocated:

* ``W`` ``[layers, S, d]``: the registered directions, one *slot* per vector (per row of a
  position-wise ActAdd vector), zero where a vector lacks the layer;
* ``U`` ``[layers, S, d]``: their unit directions (for ablate and clamp);
* ``C`` ``[layers, N, S]``: per token of the step (``N`` = vLLM's most batched tokens)
  the factor each slot is added with;
* ``ON``, ``LO``, ``HI`` ``[R, layers, N, S]``: per projection round, which slot a token's
  ablate/clamp acts on and the range it clamps the projection to.

The forward hook of a steerable decoder layer only does tensor arithmetic on the block's
output in vLLM's split form (``hidden + residual``): ``R`` rounds of
``residual += ((clamp(p, LO, HI) - p) * ON) @ U`` with ``p = (hidden + residual) @ U^T``, then
``residual += C @ W`` (written as one term per slot when there are at most :data:`UNROLL`
slots, which the compiler fuses into a pass or two over the residual). It never branches on what the batch holds, never reads back to the
host and allocates nothing of its own, so dynamo traces it into vLLM's graph once (no graph
break) and a CUDA graph can capture it: the buffers keep their addresses, and each captured
size reads the first ``hidden.shape[0]`` rows. Before each forward :mod:`steerlab.vllm.step`
writes the step's coefficients in place and zeroes the rows it wrote last time; a step with
no steered request writes nothing and still runs the hook's arithmetic, with zero
coefficients, at every steerable layer (eager vLLM skips it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from steerlab.core.vector import SteeringVector

# Up to this many slots a hook adds one term per slot (fused by the compiler); past it, it
# uses matrix products, whose cost does not grow with the slots.
UNROLL = 16


class SteeringBuffers:
    """The persistent steering tensors of one model replica, and its hooks.

    Args:
        vectors: the registry (name -> vector), fixed for the engine's life.
        layers: the steerable layers this replica runs (a pipeline stage's share).
        max_tokens: the most tokens one forward may hold.
        device: the model's device.
        rounds: projection rounds (ablate/clamp entries at one layer of one request).
    """

    def __init__(
        self,
        vectors: dict[str, SteeringVector],
        layers: Sequence[int],
        max_tokens: int,
        device: torch.device,
        rounds: int,
    ) -> None:
        self.layers = list(layers)
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        # slot per (vector name, row): a position-wise vector takes one slot per row
        self.slots: dict[tuple[str, int], int] = {}
        for name, vector in sorted(vectors.items()):
            for row in range(vector.rows):
                self.slots[(name, row)] = len(self.slots)
        n_layers, n_slots = len(self.layers), max(len(self.slots), 1)
        d = next(iter(vectors.values())).model.hidden_size
        w = torch.zeros(n_layers, n_slots, d)
        u = torch.zeros(n_layers, n_slots, d)
        for (name, row), s in self.slots.items():
            vector = vectors[name]
            for layer, i in self.index.items():
                if layer not in vector.directions:
                    continue
                direction = vector.directions[layer]
                w[i, s] = direction[row] if vector.positionwise else direction
                if not vector.positionwise and float(direction.norm()) > 0:
                    u[i, s] = vector.unit(layer)
        self.rounds = rounds
        self.max_tokens = max_tokens
        self.w, self.u = w.to(device), u.to(device)  # [L, S, d] float32
        self.c = torch.zeros(n_layers, max_tokens, n_slots, device=device)  # [L, N, S]
        shape = (rounds, n_layers, max_tokens, n_slots)
        self.on = torch.zeros(shape, device=device)  # [R, L, N, S]
        self.lo = torch.zeros(shape, device=device)
        self.hi = torch.zeros(shape, device=device)
        self.written = 0  # rows of the coefficient tensors the last steered step wrote
        self.active = False  # whether the current step steers anything (eager shortcut)

    @property
    def width(self) -> int:
        """Slots per layer (S)."""
        return int(self.w.shape[1])

    def install(self, decoder_layers: Any) -> list[torch.utils.hooks.RemovableHandle]:
        """Register one forward hook per steerable layer this replica runs (before vLLM
        compiles or captures); they stay for the engine's life."""
        handles = []
        try:
            for layer, i in self.index.items():
                handles.append(decoder_layers[layer].register_forward_hook(self._hook(i)))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _hook(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            # Eager vLLM skips a step with nothing to steer; a traced graph always runs the
            # arithmetic below (with zero coefficients), so no Python state is read inside it.
            if not torch.compiler.is_compiling() and not self.active:
                return None
            hidden, residual = output  # each [n, d]; the block's output is their sum
            added = self._delta(i, hidden, residual)
            return hidden, residual + added.to(residual.dtype)

        return hook

    def _delta(self, i: int, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """What layer ``i`` adds to the residual (float32, ``[n, d]``)."""
        n = hidden.shape[0]
        c, w, u = self.c[i, :n], self.w[i], self.u[i]  # [n, S], [S, d], [S, d]
        fused = self.width <= UNROLL
        added = _mix(c, w, fused)  # every addition
        if self.rounds:  # ablate/clamp act first, each on the result of the one before
            base = (hidden + residual).float()  # [n, d]
            moved: torch.Tensor | None = None
            for r in range(self.rounds):
                h = base if moved is None else base + moved
                p = _project(h, u, fused)  # [n, S]: the projections onto every slot's direction
                lo, hi, on = self.lo[r, i, :n], self.hi[r, i, :n], self.on[r, i, :n]
                step = _mix((torch.minimum(torch.maximum(p, lo), hi) - p) * on, u, fused)
                moved = step if moved is None else moved + step
            assert moved is not None  # rounds >= 1
            added = added + moved
        return added

    def clear(self) -> None:
        """Zero what the last steered step wrote (a step that steers nothing)."""
        if self.written:
            self.c[:, : self.written].zero_()
            self.on[:, :, : self.written].zero_()
            self.written = 0
        self.active = False

    def write(
        self,
        n: int,
        c: torch.Tensor,
        on: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
    ) -> None:
        """Write one step's coefficients for its ``n`` tokens in place (``c`` ``[L, n, S]``,
        the others ``[R, L, n, S]``) and zero the rows beyond them that the last step wrote."""
        self.c[:, :n].copy_(c)
        self.on[:, :, :n].copy_(on)
        self.lo[:, :, :n].copy_(lo)
        self.hi[:, :, :n].copy_(hi)
        if self.written > n:
            self.c[:, n : self.written].zero_()
            self.on[:, :, n : self.written].zero_()
        self.written = n
        self.active = True


# With few slots (``fused``, the usual case) the products below are written one term per slot,
# which the compiler fuses into a pass or two over the residual instead of separate small
# matrix products (docs/design.md, "The vLLM engine", for what that changed in the benchmark).
def _mix(coef: torch.Tensor, dirs: torch.Tensor, fused: bool) -> torch.Tensor:
    """``coef @ dirs`` (``[n, S] @ [S, d]``)."""
    if not fused:
        return coef @ dirs
    out = coef[:, 0:1] * dirs[0]
    for s in range(1, dirs.shape[0]):
        out = out + coef[:, s : s + 1] * dirs[s]
    return out


def _project(h: torch.Tensor, dirs: torch.Tensor, fused: bool) -> torch.Tensor:
    """``h @ dirs.T`` (``[n, d] @ [d, S]``)."""
    if not fused:
        return h @ dirs.T
    return torch.cat([(h * dirs[s]).sum(-1, keepdim=True) for s in range(dirs.shape[0])], -1)
