"""Position policies: which positions of each row are steered (../shared/DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from steerlab.errors import SteerlabError

PolicyKind = Literal["all", "after-prompt", "from-marker", "prompt", "actadd", "transient"]
POLICY_KINDS: tuple[str, ...] = get_args(PolicyKind)
PERSISTING: tuple[str, ...] = ("all", "after-prompt", "from-marker", "prompt", "actadd")


@dataclass(frozen=True)
class Policy:
    """A position policy, relative to each row's own prompt of length P.

    * ``all``: every prompt and generated position.
    * ``after-prompt`` (default): t >= P-1.
    * ``from-marker:STR``: t >= the last token of the last occurrence of STR in the prompt.
    * ``prompt``: t < P.
    * ``actadd``: t < k for a k-row position-wise vector, row i at position i.
    * ``transient``: only the newest position, and the KV cache keeps unsteered keys/values.
    """

    kind: PolicyKind = "after-prompt"
    marker: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise SteerlabError(
                f"unknown policy '{self.kind}': use one of {', '.join(POLICY_KINDS)} "
                "(from-marker as from-marker:STR)"
            )
        if (self.kind == "from-marker") != bool(self.marker):
            raise SteerlabError(
                "policy from-marker needs a marker string, e.g. from-marker:[/INST]; "
                "other policies take none"
            )

    @classmethod
    def parse(cls, value: str | Policy) -> Policy:
        """Read ``after-prompt``, ``from-marker:[/INST]`` and so on."""
        if isinstance(value, Policy):
            return value
        text = str(value).strip()
        if text.startswith("from-marker"):
            marker = text[len("from-marker") :].removeprefix(":")
            return cls("from-marker", marker or None)
        if text not in POLICY_KINDS:
            raise SteerlabError(
                f"unknown policy '{text}': use one of {', '.join(POLICY_KINDS)} "
                "(from-marker as from-marker:STR)"
            )
        return cls(text)  # type: ignore[arg-type]

    @property
    def persisting(self) -> bool:
        """Whether steered keys/values stay in the cache (every policy but transient)."""
        return self.kind != "transient"

    def __str__(self) -> str:
        return f"from-marker:{self.marker}" if self.kind == "from-marker" else self.kind


def marker_end(tokenizer: object, prompt_ids: list[int], marker: str) -> int:
    """Index of the token that ends the last occurrence of ``marker`` in the prompt.

    Found by bisection on the decoded prefix, so markers split across tokens work.

    Raises:
        SteerlabError: the marker does not occur in the prompt.
    """
    decode = getattr(tokenizer, "decode")  # noqa: B009
    full = decode(prompt_ids)
    count = full.count(marker)
    if count == 0:
        raise SteerlabError(
            f"the from-marker string {marker!r} does not occur in the prompt: "
            "pick a marker that the rendered prompt contains, or another policy"
        )
    lo, hi = 0, len(prompt_ids) - 1
    while lo < hi:  # smallest t such that prompt[: t + 1] holds all `count` occurrences
        mid = (lo + hi) // 2
        if decode(prompt_ids[: mid + 1]).count(marker) >= count:
            hi = mid
        else:
            lo = mid + 1
    return lo
