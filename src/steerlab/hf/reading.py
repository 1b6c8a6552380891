"""Reading residual activations on Hugging Face models, one padded forward per batch.

Every batch reads all requested layers at once and stops after the highest one (the
blocks above it and the LM head never run). Contrastive pairs run their shared prompt
prefix once through the KV cache (docs/design.md, "Extraction").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerlab.core.errors import SteerlabError
from steerlab.core.prompts import pad_batch, position_ids
from steerlab.hf.layers import LayerMap, as_tokens, block_output, cache_kwarg, input_device


@dataclass(frozen=True)
class Item:
    """One sequence to read: the mean over positions ``start..end-1`` (one token if end = start + 1)."""

    ids: list[int]
    start: int
    end: int
    positive: bool


class _Stop(Exception):  # noqa: N818
    """Raised by the hook of the highest requested layer to end the forward early."""


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _Reader:
    """Hooks that read weighted sums of block outputs, one forward at a time.

    ``run`` takes the forward's keyword arguments and ``[n, seq]`` read weights and returns
    ``[n, len(layers), d]``; the forward stops after the highest requested block.
    """

    def __init__(self, layer_map: LayerMap, layers: Sequence[int], site: str = "block") -> None:
        self.layer_map = layer_map
        self.site = site
        self.layers = list(layers)
        self.top = max(layers)
        self.captured: dict[int, torch.Tensor] = {}
        self.weights = torch.zeros(0, 0)
        self.repeat = 1
        self.handles: list[Any] = []

    def __enter__(self) -> _Reader:
        try:
            for layer in sorted(set(self.layers)):
                module = self.layer_map.site(layer, self.site)
                self.handles.append(module.register_forward_hook(self._hook(layer)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            w = self.weights
            hidden = as_tokens(block_output(output), -1, w.shape[1]).float()  # [n, seq, d]
            if self.repeat > 1:
                hidden = hidden.repeat_interleave(self.repeat, dim=0)  # [n * repeat, seq, d]
            if w.device != hidden.device:  # once per batch, not once per layer
                w = self.weights = self.weights.to(hidden.device)
            self.captured[layer] = torch.einsum("ns,nsd->nd", w, hidden)  # [n, d], on device
            if layer == self.top:
                raise _Stop

        return hook

    def run(self, kwargs: dict[str, Any], weights: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        self.weights = weights
        self.repeat = repeat
        self.captured.clear()
        with contextlib.suppress(_Stop):
            self.layer_map.base(**kwargs)
        # One copy to the host per batch, not one per layer.
        return torch.stack([self.captured[layer] for layer in self.layers], dim=1).cpu()


@torch.no_grad()
def read_activations(
    model: nn.Module,
    layer_map: LayerMap,
    items: Sequence[Item],
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    pad_id: int = 0,
    padding_side: str = "left",
    site: str = "block",
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Read the items' activations, one padded forward per batch.

    Items are sorted by length (longest first) to reduce padding.

    Yields:
        The items' indices and their reads ``[n, len(layers), d]`` (float32, CPU).
    """
    if batch_size < 1:
        raise SteerlabError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
    device = input_device(model)
    use_positions = _accepts(layer_map.base, "position_ids")
    with _Reader(layer_map, layers, site) as reader:
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            ids, mask = pad_batch([items[i].ids for i in chunk], pad_id, side=padding_side)
            width = ids.shape[1]
            w = torch.zeros(len(chunk), width)  # [n, seq]
            for row, i in enumerate(chunk):
                it = items[i]
                offset = width - len(it.ids) if padding_side == "left" else 0
                w[row, offset + it.start : offset + it.end] = 1.0 / (it.end - it.start)
            kwargs: dict[str, Any] = {
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
                "use_cache": False,
            }
            if use_positions:
                kwargs["position_ids"] = position_ids(mask).to(device)
            yield chunk, reader.run(kwargs, w)


@torch.no_grad()
def read_pair_activations(
    model: nn.Module,
    layer_map: LayerMap,
    items: Sequence[Item],
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    pad_id: int = 0,
    padding_side: str = "left",
    site: str = "block",
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Read contrastive pairs (``items[2i]`` positive, ``items[2i+1]`` negative), running
    their shared prompt prefix once.

    Per batch: one forward of the pairs' common prefixes (left- or right-padded) fills a KV
    cache; the cache is repeated for the two completions, and one forward of the
    right-padded suffixes (positive and negative rows, ``batch_size`` rows) finishes the
    reads. For CAA-style A/B pairs this halves the compute.

    Yields:
        Item indices and reads ``[n, len(layers), d]``, as :func:`read_activations`.
    """
    if batch_size < 1:
        raise SteerlabError(f"batch size must be at least 1, got {batch_size}")
    from transformers import DynamicCache

    n_pairs = len(items) // 2
    prefix = []
    for i in range(n_pairs):
        pos, neg = items[2 * i], items[2 * i + 1]
        shared = 0
        for a, b in zip(pos.ids, neg.ids, strict=False):
            if a != b:
                break
            shared += 1
        prefix.append(min(shared, len(pos.ids) - 1, len(neg.ids) - 1))
    if not prefix or min(prefix) < 1:
        # some pair shares no first token (no BOS, no template): nothing to run once
        yield from read_activations(
            model, layer_map, items, layers, batch_size=batch_size, pad_id=pad_id,
            padding_side=padding_side, site=site,
        )  # fmt: skip
        return
    order = sorted(range(n_pairs), key=lambda i: -prefix[i])
    device = input_device(model)
    base = layer_map.base
    key = cache_kwarg(base)
    use_positions = _accepts(base, "position_ids")
    per_batch = max(1, batch_size // 2)
    with _Reader(layer_map, layers, site) as reader:
        for begin in range(0, n_pairs, per_batch):
            chunk = order[begin : begin + per_batch]
            heads = [items[2 * i].ids[: prefix[i]] for i in chunk]
            ids, mask = pad_batch(heads, pad_id, side=padding_side)
            width = ids.shape[1]
            w_head = torch.zeros(2 * len(chunk), width)  # [2n, prefix] read weights per item
            for row, i in enumerate(chunk):
                offset = width - prefix[i] if padding_side == "left" else 0
                for k, it in enumerate((items[2 * i], items[2 * i + 1])):
                    lo, hi = it.start, min(it.end, prefix[i])
                    if lo < hi:
                        w_head[2 * row + k, offset + lo : offset + hi] = 1.0 / (it.end - it.start)
            cache = DynamicCache()
            kwargs: dict[str, Any] = {
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
                "use_cache": True,
                key: cache,
            }
            if use_positions:
                kwargs["position_ids"] = position_ids(mask).to(device)
            # One prefix row serves two items: its positive and its negative.
            head_reads = reader.run(kwargs, w_head, repeat=2)  # [2n, L, d]
            tails = [items[2 * i + k].ids[prefix[i] :] for i in chunk for k in (0, 1)]
            tail_ids, tail_mask = pad_batch(tails, pad_id, side="right")
            full_mask = torch.cat(
                [mask.repeat_interleave(2, dim=0), tail_mask], dim=1
            )  # [2n, prefix + tail]
            w_tail = torch.zeros(2 * len(chunk), tail_ids.shape[1])
            for row, i in enumerate(chunk):
                for k, it in enumerate((items[2 * i], items[2 * i + 1])):
                    lo, hi = max(it.start, prefix[i]) - prefix[i], it.end - prefix[i]
                    if lo < hi:
                        w_tail[2 * row + k, lo:hi] = 1.0 / (it.end - it.start)
            cache.batch_repeat_interleave(2)
            kwargs = {
                "input_ids": tail_ids.to(device),
                "attention_mask": full_mask.to(device),
                "use_cache": True,
                key: cache,
            }
            if use_positions:
                kwargs["position_ids"] = position_ids(full_mask, past=width).to(device)
            reads = reader.run(kwargs, w_tail)  # [2n, L, d]
            yield [2 * i + k for i in chunk for k in (0, 1)], reads + head_reads
