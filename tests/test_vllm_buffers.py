"""The arithmetic of the vLLM plugin's steering hooks (``vllm/buffers.py``), without vLLM:
both forms (one term per slot, and matrix products past ``UNROLL`` slots) equal a per-token
reference written with plain loops, for additions and two projection rounds at once."""

from __future__ import annotations

import pytest
import torch

from steerlab.core.vector import ModelIdentity, SteeringVector
from steerlab.vllm import buffers as module
from steerlab.vllm.buffers import SteeringBuffers

D, LAYERS, TOKENS = 16, 4, 5


class Block(torch.nn.Module):
    """A decoder layer in vLLM's split form: it returns (hidden, residual) unchanged."""

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return hidden, residual


def _registry() -> dict[str, SteeringVector]:
    gen = torch.Generator().manual_seed(0)
    model = ModelIdentity("tiny", "LlamaForCausalLM", D, LAYERS)
    return {
        "a": SteeringVector({1: torch.randn(D, generator=gen), 3: torch.randn(D, generator=gen)}, model),
        "b": SteeringVector({1: torch.randn(D, generator=gen)}, model),
        "c": SteeringVector({3: torch.randn(D, generator=gen)}, model),
    }  # fmt: skip


def _reference(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    dirs: list[torch.Tensor],
    c: torch.Tensor,
    on: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
) -> torch.Tensor:
    """One token at a time, one slot at a time: the rounds move the stream in turn (each
    reads the stream as the rounds before it left it), then the additions."""
    out = residual.clone()
    for t in range(hidden.shape[0]):
        h = hidden[t] + residual[t]
        moved = torch.zeros(D)
        for r in range(on.shape[0]):
            delta = torch.zeros(D)
            for s, direction in enumerate(dirs):
                if float(direction.norm()) == 0 or float(on[r, t, s]) == 0:
                    continue
                unit = direction / direction.norm()
                p = float(torch.dot(h + moved, unit))
                bounded = min(max(p, float(lo[r, t, s])), float(hi[r, t, s]))
                delta += (bounded - p) * unit
            moved += delta
        added = sum((float(c[t, s]) * direction for s, direction in enumerate(dirs)), moved)
        out[t] = residual[t] + added
    return out


@pytest.mark.parametrize("rounds", [2, 0], ids=["two projection rounds", "additions only"])
@pytest.mark.parametrize("unroll", [16, 0], ids=["one term per slot", "matrix products"])
def test_a_hook_adds_what_a_per_token_reference_adds(monkeypatch, unroll, rounds):
    monkeypatch.setattr(module, "UNROLL", unroll)
    vectors = _registry()
    buffers = SteeringBuffers(
        vectors, [1, 3], max_tokens=8, device=torch.device("cpu"), rounds=rounds
    )
    blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
    handles = buffers.install(blocks)
    assert len(handles) == 2 and buffers.width == 3
    gen = torch.Generator().manual_seed(1)
    shape = (rounds, 2, TOKENS, 3)  # [R, L, n, S]
    c = torch.randn(2, TOKENS, 3, generator=gen)
    on = (torch.rand(shape, generator=gen) > 0.4).float()
    lo = -torch.rand(shape, generator=gen)
    hi = torch.rand(shape, generator=gen)
    buffers.write(TOKENS, c, on, lo, hi)
    hidden = torch.randn(TOKENS, D, generator=gen) * 3
    residual = torch.randn(TOKENS, D, generator=gen) * 3
    checked = 0
    for layer, i in buffers.index.items():
        dirs = [torch.zeros(D)] * 3
        for (name, _), s in buffers.slots.items():
            if layer in vectors[name].directions:
                dirs[s] = vectors[name].directions[layer]
        got_hidden, got = blocks[layer](hidden, residual)
        want = _reference(hidden, residual, dirs, c[i], on[:, i], lo[:, i], hi[:, i])
        assert torch.equal(got_hidden, hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert float((got - residual).abs().max()) > 0.1  # the steering moved the stream
        checked += 1
    assert checked == 2
    buffers.clear()  # a step that steers nothing: eager mode leaves the block's output alone
    assert blocks[1](hidden, residual)[1] is residual
    for handle in handles:
        handle.remove()
