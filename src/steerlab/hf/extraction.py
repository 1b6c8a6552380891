"""Vector extraction on Hugging Face models (docs/design.md, "Extraction").

A dataset becomes items (token ids and the span to read), :mod:`steerlab.hf.reading`
reads them in batches, and an aggregator turns the reads into one direction per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from steerlab.core.aggregators import get_aggregator
from steerlab.core.dataset import Dataset
from steerlab.core.errors import SteerlabError
from steerlab.core.prompts import longest_piece, prompt_ids
from steerlab.core.vector import SITE_CONVENTIONS, SteeringVector
from steerlab.hf.layers import block_output, resolve_layers
from steerlab.hf.model import LoadedModel
from steerlab.hf.reading import Item, read_activations, read_pair_activations


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
    limit = lm.context_length

    def span(prompt: str | None, completion: str, line: int) -> tuple[list[int], int]:
        chars = len(system or "") + len(prompt or "") + len(completion)
        if chars > limit * longest_piece(tok):  # refused before tokenizing a huge text
            raise SteerlabError(
                f"{dataset.info.path or 'dataset'}:{line}: the example is {chars} characters, "
                f"more than the model's context of {limit} tokens can hold: shorten or drop it"
            )
        full = prompt_ids(tok, prompt or "", system=system, assistant_prefix=completion, chat=chat)
        if len(full) > limit:
            raise SteerlabError(
                f"{dataset.info.path or 'dataset'}:{line}: the example is {len(full)} tokens, "
                f"over the model's context of {limit}: shorten or drop it"
            )
        bare = prompt_ids(tok, prompt or "", system=system, chat=chat)
        start = min(_common_prefix(full, bare), len(full) - 1)
        return full, start

    if dataset.format == "unpaired":
        if read == "answer":
            raise SteerlabError(
                "read position 'answer' needs pairs: use mean or last for unpaired sets"
            )
        for t in dataset.texts:
            ids, start = span(t.prompt, t.text, t.line)
            lo = start if read == "mean" else len(ids) - 1
            items.append(Item(ids, lo, len(ids), t.positive))
        return items, read
    for p in dataset.pairs:
        pos, pos_start = span(p.prompt, p.positive, p.line)
        neg, neg_start = span(p.prompt, p.negative, p.line)
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
    share_prefix: bool | None = None,
    site: str = "block",
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
        share_prefix: run each pair's shared prompt prefix once through the KV cache
            (fewer FLOPs; pays on a CPU). Default: on for CPU models, off on accelerators,
            where one plain padded forward per batch launches fewer kernels. Both read the
            same activations.
        site: read the block's output (``block``, the residual stream), or what its
            attention (``attn``) or MLP (``mlp``) adds to it; recorded as the vector's
            ``layer_convention``, so steering with it acts at the same site.

    Returns:
        The vector, with per-layer mean residual norms and full metadata.
    """
    layer_list = resolve_layers(layers, lm.info.num_layers)
    if site not in SITE_CONVENTIONS:
        raise SteerlabError(f"site must be one of {', '.join(SITE_CONVENTIONS)}, got {site!r}")
    lm.layers.site(layer_list[0], site)  # an unknown site fails before any model work
    if dataset.format == "actadd":
        if site != "block":
            raise SteerlabError("ActAdd vectors are read at the block output: drop --site")
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
        if share_prefix is None:
            share_prefix = lm.device.type == "cpu"
        paired = dataset.format != "unpaired" and share_prefix
        reader = read_pair_activations if paired else read_activations
        for chunk, reads in reader(
            lm.model,
            lm.layers,
            items,
            layer_list,
            batch_size=batch_size,
            pad_id=int(lm.tokenizer.pad_token_id),
            padding_side=padding_side,
            site=site,
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
        model=lm.identity,
        method=method,
        read_position=read,
        residual_norms=norms,
        dataset=dataset.info,
        layer_convention=SITE_CONVENTIONS[site],
        notes={"pairs": len(dataset), "chat": chat, "system": system, "batch_size": batch_size},
    )


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
        longer = max(len(text_pos), len(text_neg))
        if longer > lm.context_length * longest_piece(tok):
            raise SteerlabError(
                f"{dataset.info.path or 'dataset'}:{p.line}: the ActAdd pair is {longer} "
                f"characters, more than the model's context of {lm.context_length} tokens can "
                "hold: shorten it"
            )
        a = list(tok(text_pos)["input_ids"])
        b = list(tok(text_neg)["input_ids"])
        if max(len(a), len(b)) > lm.context_length:
            raise SteerlabError(
                f"{dataset.info.path or 'dataset'}:{p.line}: the ActAdd pair is "
                f"{max(len(a), len(b))} tokens, over the model's context of "
                f"{lm.context_length}: shorten it"
            )
        seqs.append((a, b))
    k = max(max(len(a), len(b)) for a, b in seqs)
    items: list[Item] = []
    for a, b in seqs:
        a = a + [neutral] * (k - len(a))
        b = b + [neutral] * (k - len(b))
        items += [Item(a, 0, 1, True), Item(b, 0, 1, False)]
    # Read every position: one forward per sequence is enough for a handful of pairs.
    device = lm.device
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
        model=lm.identity,
        method="actadd",
        read_position="all",
        residual_norms={layer: norms[layer] / n for layer in layers},
        dataset=dataset.info,
        notes={"pairs": n, "rows": k},
    )
