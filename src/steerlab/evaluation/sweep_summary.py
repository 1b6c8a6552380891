"""A finished sweep read back from its ``--out`` directory: the table, the recommendation
under the sweep's own rule, and the plots (what ``steerlab serve --sweep-dir`` shows)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab.core.errors import SteerlabError
from steerlab.evaluation.sweep_report import recommend

SWEEP_PLOTS = ("behaviour_vs_multiplier.png", "behaviour_vs_layer.png", "tradeoff.png")


@dataclass(frozen=True)
class SweepSummary:
    """A finished sweep read back from its directory (what the playground shows).

    Attributes:
        rows: the result table, one row per (layer, multiplier).
        recommendation: the cell the stated rule picks, or None.
        perplexity_bound: the rule's fluency bound.
        plots: each plot's file name and PNG bytes.
        vector: the sweep's vector file, when it is there.
    """

    rows: list[dict[str, Any]]
    recommendation: dict[str, Any] | None
    perplexity_bound: float
    plots: dict[str, bytes]
    vector: Path | None


def read_sweep(out_dir: Path) -> SweepSummary:
    """Read a sweep's ``results.json``, ``manifest.json`` and plots from ``out_dir``.

    Raises:
        SteerlabError: a missing directory or one that holds no finished sweep.
    """
    results, manifest = out_dir / "results.json", out_dir / "manifest.json"
    if not results.is_file() or not manifest.is_file():
        raise SteerlabError(
            f"'{out_dir}' holds no finished sweep (results.json, manifest.json): "
            "run steerlab sweep --out DIR first"
        )
    try:
        rows = json.loads(results.read_text())
        bound = float(json.loads(manifest.read_text())["sweep"]["perplexity_bound"])
        chosen = out_dir / "recommendation.json"
        # the sweep's own choice (made on its selection half); else the rule on the table
        best = json.loads(chosen.read_text()) if chosen.is_file() else recommend(rows, bound=bound)
    except (ValueError, KeyError, TypeError) as exc:
        raise SteerlabError(
            f"'{out_dir}' has unreadable sweep results ({exc}): rerun the sweep with --fresh"
        ) from None
    plots = {
        name: (out_dir / name).read_bytes() for name in SWEEP_PLOTS if (out_dir / name).is_file()
    }
    context = (best or {}).get("context", "chat")
    vector = out_dir / (
        "vector.safetensors" if context == "chat" else f"vector-{context}.safetensors"
    )
    return SweepSummary(rows, best, bound, plots, vector if vector.is_file() else None)
