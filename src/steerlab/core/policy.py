"""Position policies: which positions of each row are steered (docs/design.md, "Policies").

This module is the one owner of a policy's meaning. :meth:`Policy.span` gives, for one row,
the steered span from that row's prompt length (and marker position); the Hugging Face
hooks, the plain reference and every other engine call it. Adding a policy means adding a
kind here, its parsing, its span and its help line; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from typing_extensions import assert_never

from steerlab.core.errors import SteerlabError

PolicyKind = Literal[
    "all", "after-prompt", "from-marker", "prompt", "actadd", "transient", "window"
]
POLICY_KINDS: tuple[str, ...] = get_args(PolicyKind)
FAR = 1 << 60  # "no upper bound" for a span
MAX_WINDOW = 10**9  # window bounds above this exceed any context: refused

#: One line per policy, for ``--help`` texts and error messages.
POLICY_HELP = (
    "all, after-prompt, from-marker:STR, prompt, actadd, transient, "
    "window:A-B (generated tokens A..B, 0-based; window:A- has no end)"
)


@dataclass(frozen=True)
class Span:
    """The steered positions of one row: ``lo <= t < hi`` relative to the row's first token.

    Attributes:
        lo: first steered position.
        hi: first position past the span (:data:`FAR` for none).
        newest_only: steer only the newest position of each forward pass, and let nothing
            persist in the KV cache (``transient``); the span still bounds it.
    """

    lo: int
    hi: int = FAR
    newest_only: bool = False

    def positions(self, seq_len: int) -> list[int]:
        """The steered positions of a whole (uncached) sequence of ``seq_len`` tokens."""
        if self.newest_only:
            newest = seq_len - 1
            return [newest] if self.lo <= newest < self.hi else []
        return list(range(max(self.lo, 0), min(self.hi, seq_len)))


def _unknown(text: str) -> SteerlabError:
    return SteerlabError(f"unknown policy '{text}': use one of {POLICY_HELP}")


@dataclass(frozen=True)
class Policy:
    """A position policy, relative to each row's own prompt of length P.

    * ``all``: every prompt and generated position.
    * ``after-prompt`` (default): t >= P-1.
    * ``from-marker:STR``: t >= the last token of the last occurrence of STR in the prompt.
    * ``prompt``: t < P.
    * ``actadd``: t < k for a k-row position-wise vector, row i at position i.
    * ``transient``: only the newest position, and the KV cache keeps unsteered keys/values.
    * ``window:A-B``: P-1+A <= t <= P-1+B, the forwards that produce generated tokens A..B
      (0-based); ``window:A-`` has no end, and ``window:0-`` equals ``after-prompt``.
    """

    kind: PolicyKind = "after-prompt"
    marker: str | None = None
    start: int = 0
    stop: int | None = None  # window: last steered generated token (inclusive), None = open

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise _unknown(str(self.kind))
        if (self.kind == "from-marker") != bool(self.marker):
            raise SteerlabError(
                "policy from-marker needs a marker string, e.g. from-marker:[/INST]; "
                "other policies take none"
            )
        if self.kind == "window":
            if max(self.start, self.stop or 0) > MAX_WINDOW:
                raise SteerlabError(
                    f"window bounds above {MAX_WINDOW:,} exceed any model's context: give "
                    "bounds within the generated tokens, e.g. window:0-9"
                )
            if self.start < 0 or (self.stop is not None and self.stop < self.start):
                raise SteerlabError(
                    f"window:{self.start}-{'' if self.stop is None else self.stop} is empty or "
                    "negative: write window:A-B with 0 <= A <= B, e.g. window:0-9"
                )
        elif self.start != 0 or self.stop is not None:
            raise SteerlabError(f"policy {self.kind} takes no window bounds")

    @classmethod
    def parse(cls, value: str | Policy) -> Policy:
        """Read ``after-prompt``, ``from-marker:[/INST]``, ``window:0-9`` and so on."""
        if isinstance(value, Policy):
            return value
        text = str(value).strip()
        if text.startswith("from-marker"):
            marker = text[len("from-marker") :].removeprefix(":")
            return cls("from-marker", marker or None)
        if text.startswith("window"):
            return cls._parse_window(text)
        if text not in POLICY_KINDS:
            raise _unknown(text)
        return cls(text)  # type: ignore[arg-type]

    @classmethod
    def _parse_window(cls, text: str) -> Policy:
        bounds = text[len("window") :].removeprefix(":")
        lo, dash, hi = bounds.partition("-")
        if not dash or not lo.isdigit() or (hi and not hi.isdigit()) or len(bounds) > 24:
            raise SteerlabError(
                f"cannot read policy '{text[:40]}': write window:A-B (generated tokens A to B, "
                "0-based), e.g. window:0-9, or window:A- with no end"
            )
        return cls("window", start=int(lo), stop=int(hi) if hi else None)

    @property
    def persisting(self) -> bool:
        """Whether steered keys/values stay in the cache (every policy but transient)."""
        return self.kind != "transient"

    @property
    def needs_marker(self) -> bool:
        """Whether :meth:`span` needs the marker position of the row's prompt."""
        return self.kind == "from-marker"

    def span(self, prompt_len: int, marker_at: int | None = None, rows: int = 1) -> Span:
        """The steered span of one row.

        Args:
            prompt_len: P, the row's prompt length in real tokens.
            marker_at: for ``from-marker``, the index of the token that ends the marker
                (:func:`marker_end`).
            rows: for ``actadd``, k, the number of rows of the position-wise vector.

        Raises:
            SteerlabError: ``from-marker`` without ``marker_at``.
        """
        last = max(prompt_len - 1, 0)
        kind = self.kind
        if kind == "all":
            return Span(0)
        if kind == "after-prompt":
            return Span(last)
        if kind == "prompt":
            return Span(0, prompt_len)
        if kind == "actadd":
            return Span(0, rows)
        if kind == "transient":
            return Span(last, newest_only=True)
        if kind == "from-marker":
            if marker_at is None:
                raise SteerlabError("policy from-marker needs the prompt's token ids")
            return Span(marker_at)
        if kind == "window":
            hi = FAR if self.stop is None else last + self.stop + 1
            return Span(last + self.start, hi)
        assert_never(kind)

    def __str__(self) -> str:
        if self.kind == "from-marker":
            return f"from-marker:{self.marker}"
        if self.kind == "window":
            return f"window:{self.start}-{'' if self.stop is None else self.stop}"
        return self.kind


def _occurrences(text: str, marker: str) -> int:
    """How many times ``marker`` occurs in ``text``, overlapping occurrences included."""
    count, at = 0, text.find(marker)
    while at >= 0:
        count, at = count + 1, text.find(marker, at + 1)
    return count


def marker_end(tokenizer: object, prompt_ids: list[int], marker: str) -> int:
    """Index of the token that ends the last occurrence of ``marker`` in the prompt.

    Found by bisection on the decoded prefix, so markers split across tokens work, and
    overlapping occurrences count (the last ``"\n\n"`` of ``"\n\n\n"`` ends at the third).

    Raises:
        SteerlabError: the marker does not occur in the prompt.
    """
    decode = getattr(tokenizer, "decode")  # noqa: B009
    count = _occurrences(decode(prompt_ids), marker)
    if count == 0:
        raise marker_missing(marker)
    lo, hi = 0, len(prompt_ids) - 1
    while lo < hi:  # smallest t such that prompt[: t + 1] holds all `count` occurrences
        mid = (lo + hi) // 2
        if _occurrences(decode(prompt_ids[: mid + 1]), marker) >= count:
            hi = mid
        else:
            lo = mid + 1
    return lo


def marker_missing(marker: str) -> SteerlabError:
    """The one error for a from-marker string that the prompt does not contain."""
    return SteerlabError(
        f"the from-marker string {marker!r} does not occur in the prompt: "
        "pick a marker that the rendered prompt contains, or another policy"
    )


def check_marker(policy: Policy, prompt_text: str) -> None:
    """Refuse a ``from-marker`` policy whose marker is not in the rendered prompt text.

    Raises:
        SteerlabError: the marker does not occur (other policies always pass).
    """
    if policy.needs_marker and str(policy.marker) not in prompt_text:
        raise marker_missing(str(policy.marker))
