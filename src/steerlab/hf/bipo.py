"""BiPO: a steering vector trained by bi-directional preference optimisation (Cao et al.
2024, "Personalized Steering of Large Language Models ... via Bi-directional Preference
Optimization"); docs/design.md, "Trained vectors".

The model is frozen; only ``v`` (one layer, zero at the start) is trained. Each step takes
a batch of pairs ``(prompt, positive, negative)`` and, per pair, a direction ``d = ±1``
drawn at random; with ``d·v`` added to the block output where after-prompt steering adds
it (the prompt's last token and the completion), the loss is

    -log σ( d·β·[ (log π_v(pos) − log π(pos)) − (log π_v(neg) − log π(neg)) ] )

where ``log π(·)`` is the completion's log-likelihood given the prompt (the unsteered
model's, computed once). So ``+v`` makes the positive completions likelier than the
negative ones and ``−v`` the reverse. The original adds ``v`` at the prompt too; adding it
where it will be used lets each pair's prompt run once, unsteered and without gradient,
for both completions. Runs are reproducible from the seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerlab.core.dataset import Dataset
from steerlab.core.errors import SteerlabError
from steerlab.core.prompts import pad_batch
from steerlab.core.vector import SteeringVector
from steerlab.hf.layers import block_output, input_device, replace_block_output
from steerlab.hf.model import LoadedModel


@dataclass(frozen=True)
class BipoConfig:
    """Training settings: optimiser steps, AdamW learning rate, pairs per step, the
    preference temperature beta, weight decay and the seed."""

    steps: int = 100
    lr: float = 0.02
    batch_size: int = 8
    beta: float = 0.5
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise SteerlabError(f"BiPO needs at least 1 step, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SteerlabError(f"the learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise SteerlabError(f"the batch size must be at least 1, got {self.batch_size}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise SteerlabError(f"beta must be a positive number, got {self.beta}")


@dataclass(frozen=True)
class BipoResult:
    """The trained vector and the loss after every step."""

    vector: SteeringVector
    losses: tuple[float, ...]


@contextmanager
def _adding(block: nn.Module, v: torch.Tensor, signs: list[torch.Tensor]) -> Iterator[None]:
    """Add ``signs[0][row] * v`` to the block's output at every position of the forwards
    that run while ``signs`` holds a tensor (with gradient); others are left alone."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not signs:
            return None
        hidden = block_output(output)
        delta = signs[0].to(hidden.dtype)[:, None, None] * v.to(hidden.dtype)
        return replace_block_output(output, hidden + delta)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def pair_logprobs(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int], int]],
    device: torch.device,
    signs: list[torch.Tensor] | None = None,
    sign_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(completion | prompt) of each pair's positive and negative ``[pairs, 2]``.

    ``pairs`` holds ``(positive ids, negative ids, start)``, ``start`` the first completion
    token (the ids before it are the shared prompt). Each prompt but its last token runs
    once, unsteered and without gradient, into a KV cache; both completions then run on it
    from the prompt's last token on, with ``sign_rows[row] * v`` added where ``_adding`` is
    active: exactly the positions after-prompt steering covers.
    """
    from transformers import DynamicCache

    from steerlab.core.prompts import position_ids
    from steerlab.hf.layers import cache_kwarg

    signs = signs if signs is not None else []
    heads = [pos[: start - 1] for pos, _, start in pairs]
    tails = [seq[start - 1 :] for pos, neg, start in pairs for seq in (pos, neg)]
    base: Any = model.get_decoder() if hasattr(model, "get_decoder") else model  # type: ignore[operator]
    ids, mask = pad_batch(heads, 0, side="left")
    cache = DynamicCache()
    signs.clear()  # the prompt is not steered
    with torch.no_grad():
        base(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
            position_ids=position_ids(mask).to(device), **{cache_kwarg(base): cache},
        )  # fmt: skip
    cache.batch_repeat_interleave(2)
    tail_ids, tail_mask = pad_batch(tails, 0, side="right")
    full = torch.cat([mask.repeat_interleave(2, dim=0), tail_mask], dim=1)
    if sign_rows is not None:
        signs.append(sign_rows)
    try:
        logits = model(
            input_ids=tail_ids.to(device), attention_mask=full.to(device), use_cache=True,
            position_ids=position_ids(full, past=ids.shape[1]).to(device),
            **{cache_kwarg(model): cache},
        ).logits.float()  # fmt: skip
    finally:
        signs.clear()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # tail position j predicts tail token j+1
    target = tail_ids[:, 1:].to(device)
    token_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (token_lp * tail_mask[:, 1:].to(device)).sum(-1).view(-1, 2)


def train_bipo(
    lm: LoadedModel,
    dataset: Dataset,
    layer: int,
    config: BipoConfig | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
    progress: bool = False,
) -> BipoResult:
    """Train a one-layer steering vector on a dataset of pairs with BiPO.

    Raises:
        SteerlabError: fewer than 2 pairs, an unpaired or ActAdd set, a layer the model
            lacks, or bad settings (before any model work).
    """
    config = config or BipoConfig()
    if dataset.format in ("unpaired", "actadd"):
        raise SteerlabError(
            f"BiPO trains on pairs (positive and negative completions); this is a {dataset.format} set"
        )
    if len(dataset.pairs) < 2:
        raise SteerlabError(f"BiPO needs at least 2 pairs, got {len(dataset.pairs)}")
    if not 0 <= layer < lm.info.num_layers:
        raise SteerlabError(
            f"layer {layer} does not exist: the model has layers 0..{lm.info.num_layers - 1}"
        )
    from steerlab.hf.extraction import _progress, build_items

    items, _ = build_items(lm, dataset, "mean", chat=chat, system=system)
    pairs = []
    for pos, neg in zip(items[::2], items[1::2], strict=True):
        shared = next(
            (i for i, (a, b) in enumerate(zip(pos.ids, neg.ids, strict=False)) if a != b),
            min(len(pos.ids), len(neg.ids)),
        )
        start = min(pos.start, neg.start, shared + 1, len(pos.ids) - 1, len(neg.ids) - 1)
        if start < 2:
            raise SteerlabError(
                "BiPO needs a prompt before each completion (the completions are scored given "
                "it): give the pairs prompts, or render them with the chat template"
            )
        pairs.append((pos.ids, neg.ids, start))
    device = input_device(lm.model)
    model = lm.model
    block = lm.layers.blocks[layer]
    n_pairs = len(pairs)
    chunk = max(1, config.batch_size)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        signs: list[torch.Tensor] = []
        v = torch.zeros(lm.info.hidden_size, device=device, requires_grad=True)
        with torch.no_grad():
            reference = torch.cat(
                [
                    pair_logprobs(model, pairs[i : i + chunk], device)
                    for i in range(0, n_pairs, chunk)
                ]
            )  # [pairs, 2]: the unsteered log-likelihoods
            norms = _mean_norm(model, block, [p[0] for p in pairs[:32]], device)  # for --scale
        gen = torch.Generator().manual_seed(config.seed)
        optim = torch.optim.AdamW([v], lr=config.lr, weight_decay=config.weight_decay)
        losses: list[float] = []
        order: list[int] = []
        bar = _progress(config.steps, progress, "training BiPO")
        with bar, _adding(block, v, signs):
            task = bar.add_task("bipo", total=config.steps)
            for _ in range(config.steps):
                if len(order) < chunk:
                    order += torch.randperm(n_pairs, generator=gen).tolist()
                batch, order = order[:chunk], order[chunk:]
                d = torch.randint(0, 2, (len(batch),), generator=gen).float() * 2 - 1  # ±1
                with torch.enable_grad():
                    lp = pair_logprobs(
                        model, [pairs[i] for i in batch], device, signs,
                        d.repeat_interleave(2).to(device),
                    )  # fmt: skip
                    ref = reference[torch.tensor(batch, device=device)]
                    margin = (lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])
                    loss = -torch.nn.functional.logsigmoid(
                        d.to(device) * config.beta * margin
                    ).mean()
                    optim.zero_grad()
                    loss.backward()
                optim.step()
                losses.append(float(loss.detach()))
                bar.advance(task, 1)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    vector = SteeringVector(
        directions={layer: v.detach().float().cpu()},
        model=lm.identity,
        method="bipo",
        read_position="trained",
        residual_norms={layer: norms},
        dataset=dataset.info,
        notes={
            "pairs": n_pairs,
            "chat": chat,
            "system": system,
            "steps": config.steps,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "beta": config.beta,
            "weight_decay": config.weight_decay,
            "seed": config.seed,
            "final_loss": losses[-1],
        },
    )
    return BipoResult(vector, tuple(losses))


def _mean_norm(
    model: nn.Module, block: nn.Module, seqs: list[list[int]], device: torch.device
) -> float:
    """The mean norm of the block's output over every token (for ``--scale relative``)."""
    total, count = 0.0, 0

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total, count
        hidden = block_output(output).float()
        real = mask_now[0].bool()
        total += float(hidden.norm(dim=-1)[real].sum())
        count += int(real.sum())

    mask_now: list[torch.Tensor] = []
    handle = block.register_forward_hook(hook)
    try:
        for i in range(0, len(seqs), 16):
            ids, mask = pad_batch(seqs[i : i + 16], 0, side="right")
            mask_now[:] = [mask.to(device)]
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        handle.remove()
    return total / max(count, 1)
