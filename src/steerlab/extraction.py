"""Batched activation reading and vector extraction (../shared/DESIGN.md, "Extraction").

Every batch is one padded forward pass that reads all requested layers at once and stops
after the highest one (the blocks above it and the LM head never run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from steerlab.aggregators import get_aggregator
from steerlab.chat import encode, pad_batch, position_ids, render
from steerlab.dataset import Dataset
from steerlab.errors import SteerlabError
from steerlab.layers import LayerMap, block_output, embedding_weight, resolve_layers
from steerlab.model import LoadedModel
from steerlab.vector import ModelIdentity, SteeringVector

ReadPosition = Literal["auto", "answer", "last", "mean"]
READ_POSITIONS = ("auto", "answer", "last", "mean")


@dataclass(frozen=True)
class Item:
    """One sequence to read: the mean over positions ``start..end-1`` (one token if end = start + 1)."""

    ids: list[int]
    start: int
    end: int
    positive: bool


class _Stop(Exception):
    """Raised by the hook of the highest requested layer to end the forward early."""


def auto_read_position(fmt: str) -> str:
    """The read position a format uses unless told otherwise."""
    # Free-text pairs read the mean over the completion: their answer-position difference is
    # dominated by the last word and breaks fluency before it moves behaviour (measured on
    # SmolLM2 with the shipped sentiment set).
    return "mean" if fmt in ("unpaired", "pairs") else "all" if fmt == "actadd" else "answer"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def build_items(
    lm: LoadedModel,
    dataset: Dataset,
    read_position: str = "auto",
    *,
    chat: bool = True,
    system: str | None = None,
) -> tuple[list[Item], str]:
    """Tokenise a dataset into items, two per pair (positive first).

    Returns:
        The items and the read position actually used.
    """
    read = auto_read_position(dataset.format) if read_position == "auto" else read_position
    if read not in ("answer", "last", "mean"):
        raise SteerlabError(f"unknown read position '{read}': use auto, answer, last or mean")
    tok = lm.tokenizer
    items: list[Item] = []

    def span(prompt: str | None, completion: str) -> tuple[list[int], int]:
        full = encode(
            tok, render(tok, prompt or "", system=system, assistant_prefix=completion, chat=chat)
        )
        bare = encode(tok, render(tok, prompt or "", system=system, chat=chat))
        start = min(_common_prefix(full, bare), len(full) - 1)
        return full, start

    if dataset.format == "unpaired":
        if read == "answer":
            raise SteerlabError(
                "read position 'answer' needs pairs: use mean or last for unpaired sets"
            )
        for t in dataset.texts:
            ids, start = span(t.prompt, t.text)
            lo = start if read == "mean" else len(ids) - 1
            items.append(Item(ids, lo, len(ids), t.positive))
        return items, read
    for p in dataset.pairs:
        pos, pos_start = span(p.prompt, p.positive)
        neg, neg_start = span(p.prompt, p.negative)
        if read == "answer":
            prefix = _common_prefix(pos, neg)
            suffix = _common_prefix(pos[::-1], neg[::-1])
            pi = min(max(len(pos) - 1 - suffix, prefix), len(pos) - 1)
            ni = min(max(len(neg) - 1 - suffix, prefix), len(neg) - 1)
            items += [Item(pos, pi, pi + 1, True), Item(neg, ni, ni + 1, False)]
        elif read == "last":
            items += [
                Item(pos, len(pos) - 1, len(pos), True),
                Item(neg, len(neg) - 1, len(neg), False),
            ]
        else:
            items += [Item(pos, pos_start, len(pos), True), Item(neg, neg_start, len(neg), False)]
    return items, read


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

    def __init__(self, layer_map: LayerMap, layers: Sequence[int]) -> None:
        self.layer_map = layer_map
        self.layers = list(layers)
        self.top = max(layers)
        self.captured: dict[int, torch.Tensor] = {}
        self.weights = torch.zeros(0, 0)
        self.repeat = 1
        self.handles: list[Any] = []

    def __enter__(self) -> _Reader:
        try:
            for layer in sorted(set(self.layers)):
                block = self.layer_map.blocks[layer]
                self.handles.append(block.register_forward_hook(self._hook(layer)))
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
            hidden = block_output(output).float()  # [n, seq, d]
            if self.repeat > 1:
                hidden = hidden.repeat_interleave(self.repeat, dim=0)  # [n * repeat, seq, d]
            w = self.weights.to(hidden.device)
            self.captured[layer] = torch.einsum("ns,nsd->nd", w, hidden).cpu()
            if layer == self.top:
                raise _Stop

        return hook

    def run(self, kwargs: dict[str, Any], weights: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        self.weights = weights
        self.repeat = repeat
        self.captured.clear()
        with contextlib.suppress(_Stop):
            self.layer_map.base(**kwargs)
        return torch.stack([self.captured[layer] for layer in self.layers], dim=1)


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
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Read the items' activations, one padded forward per batch.

    Items are sorted by length (longest first) to reduce padding.

    Yields:
        The items' indices and their reads ``[n, len(layers), d]`` (float32, CPU).
    """
    if batch_size < 1:
        raise SteerlabError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
    device = embedding_weight(model).device
    use_positions = _accepts(layer_map.base, "position_ids")
    with _Reader(layer_map, layers) as reader:
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

    from steerlab.generation import cache_kwarg

    n_pairs = len(items) // 2
    prefix = []
    for i in range(n_pairs):
        pos, neg = items[2 * i], items[2 * i + 1]
        shared = 0
        for a, b in zip(pos.ids, neg.ids, strict=False):
            if a != b:
                break
            shared += 1
        prefix.append(max(min(shared, len(pos.ids) - 1, len(neg.ids) - 1), 1))
    order = sorted(range(n_pairs), key=lambda i: -prefix[i])
    device = embedding_weight(model).device
    base = layer_map.base
    key = cache_kwarg(base)
    use_positions = _accepts(base, "position_ids")
    per_batch = max(1, batch_size // 2)
    with _Reader(layer_map, layers) as reader:
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


def _progress(total: int, enabled: bool, label: str) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    class Rate(TextColumn):
        def render(self, task: Any) -> Any:
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} pairs/s" if speed else "")

    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(""),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    return progress


def extract(
    lm: LoadedModel,
    dataset: Dataset,
    layers: str | int | list[int] | None = "all",
    *,
    method: str = "mean-diff",
    read_position: str = "auto",
    batch_size: int = 32,
    chat: bool = True,
    system: str | None = None,
    padding_side: str = "left",
    progress: bool = False,
) -> SteeringVector:
    """Make a steering vector from a contrastive dataset.

    Args:
        lm: the loaded model.
        dataset: a validated dataset (:func:`steerlab.dataset.load_dataset`).
        layers: ``all``, ``6-18``, ``3,5,-1`` or a list.
        method: ``mean-diff`` (streams running sums), ``pca-diff`` or ``logistic``.
        read_position: ``auto``, ``answer``, ``last`` or ``mean``.
        batch_size: sequences per forward pass (a pair is two sequences).
        chat: render prompts through the chat template.
        system: optional system prompt.
        padding_side: ``left`` or ``right``; results agree within float tolerance.
        progress: show a progress bar with pairs/s.

    Returns:
        The vector, with per-layer mean residual norms and full metadata.
    """
    layer_list = resolve_layers(layers, lm.info.num_layers)
    if dataset.format == "actadd":
        return extract_actadd(lm, dataset, layer_list)
    aggregate = get_aggregator(method)
    items, read = build_items(lm, dataset, read_position, chat=chat, system=system)
    d = lm.info.hidden_size
    n_layers = len(layer_list)
    sums = {
        True: torch.zeros(n_layers, d, dtype=torch.float64),
        False: torch.zeros(n_layers, d, dtype=torch.float64),
    }
    counts = {True: 0, False: 0}
    norm_sum = torch.zeros(n_layers, dtype=torch.float64)
    stored: torch.Tensor | None = None
    if method != "mean-diff":
        stored = torch.zeros(len(items), n_layers, d)  # [N, L, d], only for pca/logistic
    pairs = len(dataset)
    bar = _progress(pairs, progress, f"extracting {method}")
    with bar:
        task = bar.add_task("extract", total=pairs)
        reader = read_activations if dataset.format == "unpaired" else read_pair_activations
        for chunk, reads in reader(
            lm.model,
            lm.layers,
            items,
            layer_list,
            batch_size=batch_size,
            pad_id=int(lm.tokenizer.pad_token_id),
            padding_side=padding_side,
        ):
            for row, i in enumerate(chunk):
                label = items[i].positive
                sums[label] += reads[row].double()
                counts[label] += 1
            norm_sum += reads.double().norm(dim=-1).sum(0)
            if stored is not None:
                stored[torch.tensor(chunk)] = reads
            done = len(chunk) / 2 if dataset.format != "unpaired" else len(chunk)
            bar.advance(task, done)
    if counts[True] == 0 or counts[False] == 0:
        raise SteerlabError("the dataset needs both positive and negative examples")
    directions: dict[int, torch.Tensor] = {}
    for j, layer in enumerate(layer_list):
        if stored is None:
            direction = sums[True][j] / counts[True] - sums[False][j] / counts[False]
        else:
            pos = stored[[i for i, it in enumerate(items) if it.positive], j]
            neg = stored[[i for i, it in enumerate(items) if not it.positive], j]
            direction = aggregate(pos, neg)
        directions[layer] = direction.float()
    norms = {layer: float(norm_sum[j] / len(items)) for j, layer in enumerate(layer_list)}
    return SteeringVector(
        directions=directions,
        model=identity_of(lm),
        method=method,
        read_position=read,
        residual_norms=norms,
        dataset=dataset.info,
        notes={"pairs": len(dataset), "chat": chat, "system": system, "batch_size": batch_size},
    )


def identity_of(lm: LoadedModel) -> ModelIdentity:
    """The :class:`ModelIdentity` of a loaded model."""
    i = lm.info
    return ModelIdentity(i.name, i.architecture, i.hidden_size, i.num_layers, i.fingerprint)


@torch.no_grad()
def extract_actadd(lm: LoadedModel, dataset: Dataset, layers: list[int]) -> SteeringVector:
    """ActAdd: a position-wise ``[k, d]`` vector from short prompt pairs such as Love/Hate.

    Each string is tokenised as the front of a prompt (special tokens included); the shorter
    of a pair is padded with a neutral space token; the result is the mean over pairs of
    ``h(pos)[:k] - h(neg)[:k]`` at every requested layer.
    """
    tok = lm.tokenizer
    space = tok(" ", add_special_tokens=False)["input_ids"]
    neutral = int(space[-1]) if space else int(tok.pad_token_id)
    seqs: list[tuple[list[int], list[int]]] = []
    for p in dataset.pairs:
        text_pos = (p.prompt or "") + p.positive
        text_neg = (p.prompt or "") + p.negative
        a = list(tok(text_pos)["input_ids"])
        b = list(tok(text_neg)["input_ids"])
        seqs.append((a, b))
    k = max(max(len(a), len(b)) for a, b in seqs)
    items: list[Item] = []
    for a, b in seqs:
        a = a + [neutral] * (k - len(a))
        b = b + [neutral] * (k - len(b))
        items += [Item(a, 0, 1, True), Item(b, 0, 1, False)]
    # Read every position: one forward per sequence is enough for a handful of pairs.
    device = embedding_weight(lm.model).device
    diffs = {layer: torch.zeros(k, lm.info.hidden_size, dtype=torch.float64) for layer in layers}
    norms = dict.fromkeys(layers, 0.0)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in layers:

            def hook(m: nn.Module, a: Any, out: Any, layer: int = layer) -> None:
                captured[layer] = block_output(out)[0].float().cpu()  # [k, d]

            handles.append(lm.layers.blocks[layer].register_forward_hook(hook))
        for j in range(0, len(items), 2):
            acts = []
            for it in items[j : j + 2]:
                lm.model(input_ids=torch.tensor([it.ids], device=device), use_cache=False)
                acts.append({layer: captured[layer] for layer in layers})
            for layer in layers:
                diffs[layer] += (acts[0][layer] - acts[1][layer]).double()
                norms[layer] += (
                    float(acts[0][layer].norm(dim=-1).mean() + acts[1][layer].norm(dim=-1).mean())
                    / 2
                )
    finally:
        for h in handles:
            h.remove()
    n = len(seqs)
    return SteeringVector(
        directions={layer: (diffs[layer] / n).float() for layer in layers},
        model=identity_of(lm),
        method="actadd",
        read_position="all",
        residual_norms={layer: norms[layer] / n for layer in layers},
        dataset=dataset.info,
        notes={"pairs": n, "rows": k},
    )
