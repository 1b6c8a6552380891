"""The Hugging Face engine: a loaded model with what every engine offers
(:class:`steerlab.core.engine.Engine`): batched, per-row steered decoding (with the unsteered
comparison behind KL and perplexity) and scoring of continuations. Loading is
:mod:`steerlab.hf.model`; the decoding loop :mod:`steerlab.hf.decoding`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from steerlab.core.decoded import Decoded
from steerlab.core.engine import Capabilities, OnStep
from steerlab.core.prompts import encode_prompts, left_padded, pad_batch
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.core.vector import ModelIdentity
from steerlab.hf.decoding import decode
from steerlab.hf.hooks import Steerer
from steerlab.hf.layers import LayerMap, embedding_weight, input_device


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is and where it came from.

    Attributes:
        name: the spec the user gave, or the alias.
        architecture: the config's ``model_type``.
        num_layers: number of decoder blocks.
        hidden_size: width of the residual stream.
        dtype: parameter dtype, e.g. ``float32``.
        device: device of the input embeddings.
        chat_template: whether the tokenizer has a chat template.
        source: the file or directory the weights came from.
        cache_dir: the converted copy for GGUF models, else ``None``.
        layers_path: dotted path of the decoder blocks.
        fingerprint: a cheap hash of a sample of the weights (see :func:`fingerprint`).
    """

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    dtype: str
    device: str
    chat_template: bool
    source: str
    cache_dir: str | None
    layers_path: str
    fingerprint: str


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer, its block map and its description.

    This is the Hugging Face engine: it satisfies :class:`steerlab.core.engine.Engine`
    (``decode_batch``, ``score``) with every capability.
    """

    model: nn.Module
    tokenizer: Any
    layers: LayerMap
    info: ModelInfo
    #: everything: transient, sites, conditions, explain (per-token KL), KL in evaluation
    capabilities: ClassVar[Capabilities] = Capabilities()

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the residual stream (that of the input embeddings)."""
        return embedding_weight(self.model).dtype

    @property
    def identity(self) -> ModelIdentity:
        """The :class:`ModelIdentity` that vectors made on this model record."""
        i = self.info
        return ModelIdentity(i.name, i.architecture, i.hidden_size, i.num_layers, i.fingerprint)

    @property
    def context_length(self) -> int:
        """The longest sequence the model takes (2048 when its config does not say)."""
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def learned_positions(self) -> bool:
        """Whether positions index a learned table (GPT-2, OPT ...): a hard context limit."""
        return str(self.info.architecture) in _LEARNED_POSITIONS

    def decode_batch(
        self,
        prompts: Sequence[Sequence[int]],
        steering: Sequence[Sequence[Steering]],
        sampling: Sampling,
        *,
        on_step: OnStep | None = None,
        explain: int = 0,
        seeds: Sequence[int | None] | None = None,
        track_unsteered: bool = False,
        share_prompts: bool = False,
    ) -> Decoded:
        """Generate from unpadded prompt ids, one steering list per row (the engine seam).

        ``explain=k`` also tracks the unsteered model: per-step KL and the ``k`` tokens
        whose probability the steering changed most (``Decoded.kl``, ``.changes``);
        ``track_unsteered`` gives the per-step KL and unsteered log-probabilities alone.
        ``share_prompts``: see :func:`steerlab.hf.decoding.decode`.
        """
        ids, mask = left_padded(self.tokenizer, prompts)
        return decode(
            self.model,
            ids,
            mask,
            steering,
            sampling,
            layer_map=self.layers,
            tokenizer=self.tokenizer,
            eos_token_id=self.tokenizer.eos_token_id,
            on_step=on_step,
            track_unsteered=track_unsteered or explain > 0,
            top_changes=explain,
            seeds=seeds,
            share_prompts=share_prompts,
        )

    @torch.no_grad()
    def next_token_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        steering: Sequence[Sequence[Steering]],
        candidates: Sequence[Sequence[int]],
        *,
        batch_size: int = 16,
    ) -> list[list[float]]:
        """Each candidate token's log-probability at the position after each prompt, each
        row with its own steerings (a logits pass: ``transient`` steers that position)."""
        out: list[list[float]] = []
        model, device = self.model, self.device
        for begin in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[begin : begin + batch_size]]
            rows = [list(s) for s in steering[begin : begin + batch_size]]
            ids, mask = left_padded(self.tokenizer, chunk)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            lengths = [len(p) for p in chunk]
            steerer = Steerer(
                model, rows, self.layers, lengths, self.tokenizer, allow_transient=True
            )
            with steerer, steerer.logits_pass():
                logits = (
                    model(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        position_ids=positions.to(device),
                    )
                    .logits[:, -1]
                    .float()
                )  # [rows, vocab]
            logp = torch.log_softmax(logits, -1).cpu()
            for r, tokens in enumerate(candidates[begin : begin + batch_size]):
                out.append([float(logp[r, int(t)]) for t in tokens])
        return out

    @torch.no_grad()
    def score(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        steering: Sequence[Sequence[Steering]],
        *,
        batch_size: int = 16,
    ) -> list[tuple[float, bool]]:
        """log p(continuation | context) of each pair, and whether every continuation token
        is the greedy one, each row with its own steerings (the engine seam).

        The steering's policy counts positions from the context, as when the continuation
        is generated after it (``after-prompt``: the context's last token and every
        continuation token). When every continuation is one token (A/B letters) the
        contexts run alone and the last position's logits are read in a logits pass, so
        ``transient`` steers exactly the position that predicts it; for longer
        continuations ``transient`` steers the newest position of the pass. Rows run in
        left-padded batches; contexts over the model's context lose their first tokens.
        """
        out: list[tuple[float, bool]] = []
        model, device = self.model, self.device
        limit = self.context_length
        for begin in range(0, len(pairs), batch_size):
            chunk = pairs[begin : begin + batch_size]
            rows = [list(s) for s in steering[begin : begin + batch_size]]
            single = all(len(cont) == 1 for _, cont in chunk)
            seqs, prompts = [], []
            for ctx, cont in chunk:
                full = (list(ctx) if single else list(ctx) + list(cont))[-limit:]
                seqs.append(full)
                prompts.append(len(full) if single else max(len(full) - len(cont), 1))
            ids, mask = pad_batch(seqs, 0, side="left")
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            steerer = Steerer(
                model, rows, self.layers, prompts, self.tokenizer, allow_transient=True
            )
            with steerer, steerer.logits_pass():
                logits = model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                ).logits.float()  # [rows, seq, vocab]
            logp = torch.log_softmax(logits, -1)
            width = ids.shape[1]
            for row, (_, cont) in enumerate(chunk):
                n = len(cont)
                if single:
                    span = logp[row, width - 1 : width]  # the last context position
                    target = torch.tensor(list(cont), device=span.device)
                else:
                    span = logp[row, width - n - 1 : width - 1]  # predicts the continuation
                    target = ids[row, width - n :].to(span.device)
                total = float(span.gather(-1, target[:, None]).sum())
                out.append((total, bool((span.argmax(-1) == target).all())))
        return out


_LEARNED_POSITIONS = frozenset({"gpt2", "opt", "gpt_neo", "gptj", "bloom"})


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    steering: Sequence[Steering] | Sequence[Sequence[Steering]] = (),
    sampling: Sampling | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
    track_unsteered: bool = False,
    share_prompts: bool = False,
) -> tuple[list[str], Decoded]:
    """Generate completions for text prompts, steered (``share_prompts``: see :func:`decode`).

    Returns:
        The decoded completions (without special tokens) and the raw :class:`Decoded`.
    """
    ids, mask = encode_prompts(lm.tokenizer, prompts, chat=chat, system=system)
    result = decode(
        lm.model,
        ids,
        mask,
        steering,
        sampling,
        layer_map=lm.layers,
        tokenizer=lm.tokenizer,
        eos_token_id=lm.tokenizer.eos_token_id,
        track_unsteered=track_unsteered,
        share_prompts=share_prompts,
    )
    texts = [
        lm.tokenizer.decode(
            result.tokens[r, : result.lengths[r]].tolist(), skip_special_tokens=True
        )
        for r in range(len(prompts))
    ]
    return texts, result
