"""Rendering prompts to token ids: the model's chat template when it has one, plain text otherwise.

Every module that turns text into model input goes through :func:`prompt_ids` (or
:func:`encode_prompts` for a left-padded batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Rendered:
    """A prompt rendered to text, and whether the text already holds special tokens."""

    text: str
    templated: bool


def render(
    tokenizer: Any,
    user: str,
    *,
    system: str | None = None,
    assistant_prefix: str = "",
    chat: bool = True,
) -> Rendered:
    """Render one user turn, with the assistant turn opened and starting with ``assistant_prefix``.

    Without a chat template (or with ``chat=False``) the text is ``user`` followed by
    ``assistant_prefix``, with the system prompt as a first paragraph.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Rendered(text=str(text) + assistant_prefix, templated=True)
    head = f"{system}\n\n" if system else ""
    if not chat:
        joiner = " " if assistant_prefix and user and not user.endswith((" ", "\n")) else ""
        return Rendered(text=f"{head}{user}{joiner}{assistant_prefix}", templated=False)
    return Rendered(text=f"{head}User: {user}\nAssistant: {assistant_prefix}", templated=False)


def render_messages(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, chat: bool = True
) -> Rendered:
    """Render a whole conversation (OpenAI-style ``role``/``content`` dicts), assistant turn open."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return Rendered(text=str(text), templated=True)
    names = {"system": "", "user": "User: ", "assistant": "Assistant: "}
    body = "\n".join(f"{names.get(m['role'], m['role'] + ': ')}{m['content']}" for m in messages)
    return Rendered(text=f"{body}\nAssistant: ", templated=False)


_LONGEST: dict[int, int] = {}


def longest_piece(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` spells (its longest vocabulary
    entry, at least 1): a text of more than ``context * longest_piece`` characters is over
    the context however it is tokenized, so it can be refused before tokenizing."""
    key = id(tokenizer)
    if key not in _LONGEST:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _LONGEST[key] = max((len(str(piece)) for piece in vocab), default=1) or 1
    return _LONGEST[key]


def encode(tokenizer: Any, rendered: Rendered) -> list[int]:
    """Token ids of a rendered prompt (special tokens added only for plain text)."""
    ids = tokenizer(rendered.text, add_special_tokens=not rendered.templated)["input_ids"]
    return [int(i) for i in ids]


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into ``input_ids`` and ``attention_mask`` (both ``[batch, seq]``)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Position ids that count only real tokens (pads get 0), for left or right padding."""
    positions = attention_mask.long().cumsum(-1) - 1  # [batch, past + seq]
    positions = positions.clamp(min=0)
    return positions[:, past:]


def prompt_ids(
    tokenizer: Any,
    user: str,
    *,
    system: str | None = None,
    assistant_prefix: str = "",
    chat: bool = True,
) -> list[int]:
    """Token ids of one user turn rendered by :func:`render` (the one rendering path)."""
    return encode(
        tokenizer,
        render(tokenizer, user, system=system, assistant_prefix=assistant_prefix, chat=chat),
    )


def left_padded(
    tokenizer: Any, sequences: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of a left-padded batch, padded with the pad token."""
    return pad_batch(sequences, int(tokenizer.pad_token_id), side="left")


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    chat: bool = True,
    system: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render and left-pad prompts into ``input_ids`` and ``attention_mask``."""
    return left_padded(
        tokenizer, [prompt_ids(tokenizer, p, system=system, chat=chat) for p in prompts]
    )


def token_pieces(
    tokenizer: object, ids: Sequence[int], *, skip_special_tokens: bool = False
) -> list[str]:
    """Each token's text, so that the pieces concatenate to the decoded text.

    A token that ends half way through a multi-byte character gets ``""``; the character
    shows with the token that completes it.
    """
    pieces, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(  # type: ignore[attr-defined]
            list(ids[: i + 1]), skip_special_tokens=skip_special_tokens
        )
        if text.endswith("\ufffd") and i < len(ids) - 1:
            pieces.append("")
            continue
        pieces.append(text[len(before) :] if text.startswith(before) else text)
        before = text
    return pieces
