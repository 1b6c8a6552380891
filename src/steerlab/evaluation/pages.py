"""Views of :mod:`steerlab.core.projections`: coloured terminal text and a standalone
HTML page (inline CSS, the histogram embedded as a data URL; no network, no scripts)."""

from __future__ import annotations

import base64
import html
from typing import Any

from steerlab.core.projections import Contrast, TokenProjections

POSITIVE = (214, 69, 47)  # along the vector
NEGATIVE = (47, 111, 214)  # against it


def colour(value: float, scale: float) -> tuple[int, int, int]:
    """White blended towards red (positive) or blue (negative) by ``|value| / scale``."""
    strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    end = POSITIVE if value >= 0 else NEGATIVE
    return tuple(round(255 + (c - 255) * strength) for c in end)  # type: ignore[return-value]


def terminal_text(view: TokenProjections) -> Any:
    """A rich ``Text`` of the tokens on their colours, then the scale."""
    from rich.text import Text

    text = Text()
    for piece, value in zip(view.pieces, view.values, strict=True):
        r, g, b = colour(value, view.scale)
        text.append(piece, style=f"black on rgb({r},{g},{b})")
    text.append("\n\n")
    text.append(f"projection onto the unit vector at layer {view.layer}: ")
    text.append(f" -{view.scale:.3g} ", style="black on rgb(47,111,214)")
    text.append(" 0 ", style="black on white")
    text.append(f" +{view.scale:.3g} ", style="black on rgb(214,69,47)")
    low, high = min(view.values), max(view.values)
    text.append(f"   ({len(view.values)} tokens, min {low:.3g}, max {high:.3g})")
    return text


def contrast_line(result: Contrast) -> str:
    pos, neg = result.positive, result.negative
    return (
        f"AUC {result.auc:.3f} at layer {result.layer} ({len(pos)} positive, {len(neg)} "
        f"negative, read: {result.read_position}): the vector {result.verdict}; mean "
        f"projection {sum(pos) / len(pos):+.3g} (positive) vs {sum(neg) / len(neg):+.3g} "
        "(negative)"
    )


_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: 10px 20px; font-weight: 600; }
main { max-width: 960px; margin: 0 auto; padding: 16px 20px; }
.text { background: #fff; border: 1px solid #d8dce4; border-radius: 6px; padding: 14px;
        white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 14px; }
.tok { border-radius: 2px; }
.tok:hover { outline: 1px solid #1d2330; }
.legend { display: flex; align-items: center; gap: 10px; margin: 12px 0; font-size: 13px; }
.bar { width: 240px; height: 14px; border: 1px solid #d8dce4;
       background: linear-gradient(to right, rgb(47,111,214), #fff, rgb(214,69,47)); }
.meta { font-size: 13px; color: #4a5163; }
img { max-width: 100%; background: #fff; border: 1px solid #d8dce4; border-radius: 6px; }
"""


def html_page(
    view: TokenProjections, result: Contrast | None = None, histogram: bytes | None = None
) -> str:
    """A standalone page: the coloured tokens (hover: the value), the scale, the contrast."""
    spans = []
    for i, (piece, value) in enumerate(zip(view.pieces, view.values, strict=True)):
        r, g, b = colour(value, view.scale)
        spans.append(
            f'<span class="tok" data-i="{i}" data-value="{value:.6g}" '
            f'title="token {i}: {value:+.4g}" style="background: rgb({r},{g},{b})">'
            f"{html.escape(piece)}</span>"
        )
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>steerlab inspect: {html.escape(view.vector_name)} at layer {view.layer}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<header>steerlab inspect: {html.escape(view.vector_name)}</header><main>",
        f'<p class="meta">model {html.escape(view.model_name)} &middot; layer {view.layer} '
        f"&middot; {len(view.values)} tokens &middot; each token's block output projected "
        "onto the unit vector (hover a token for its value)</p>",
        f'<div class="text" id="tokens">{"".join(spans)}</div>',
        '<div class="legend" id="scale">',
        f'<span>-{view.scale:.3g}</span><span class="bar"></span><span>+{view.scale:.3g}</span>',
        f"<span>min {min(view.values):.3g}, max {max(view.values):.3g} (the scale is the "
        "largest |value| after the first token; beyond it colours saturate)</span></div>",
    ]
    if result is not None:
        parts.append(f'<h2>Contrast</h2><p id="contrast">{html.escape(contrast_line(result))}</p>')
        if histogram is not None:
            data = base64.b64encode(histogram).decode()
            parts.append(
                f'<img id="histogram" alt="projections of positive and negative examples" '
                f'src="data:image/png;base64,{data}">'
            )
    parts.append("</main></body></html>")
    return "\n".join(parts)
