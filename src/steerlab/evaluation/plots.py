"""PNG plots of sweeps and policy comparisons (matplotlib, imported only here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        from steerlab.core.errors import SteerlabError

        raise SteerlabError("plots need matplotlib: pip install 'steerlab[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_plots(rows: Sequence[dict[str, Any]], out_dir: Path, behaviour_label: str) -> list[Path]:
    """Behaviour vs multiplier per layer, behaviour vs layer per multiplier, and the
    behaviour/fluency trade-off. Returns the PNG paths."""
    plt = pyplot()
    layers = sorted({r["layer"] for r in rows})
    mults = sorted({r["multiplier"] for r in rows})
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in layers:
        pts = sorted((r["multiplier"], r["behaviour"]) for r in rows if r["layer"] == layer)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"layer {layer}")
    ax.set_xlabel("multiplier")
    ax.set_ylabel(behaviour_label)
    ax.set_title("Behaviour vs multiplier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out_dir / "behaviour_vs_multiplier.png", plt))

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in mults:
        pts = sorted((r["layer"], r["behaviour"]) for r in rows if r["multiplier"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"x{m:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel(behaviour_label)
    ax.set_title("Behaviour vs layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out_dir / "behaviour_vs_layer.png", plt))

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in layers:
        cells = [
            (r["fluency"], r["behaviour"], r["multiplier"]) for r in rows if r["layer"] == layer
        ]
        ax.scatter([c[0] for c in cells], [c[1] for c in cells], label=f"layer {layer}")
        for x, y, m in cells:
            ax.annotate(f"{m:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity under the unsteered model (log)")
    ax.set_ylabel(behaviour_label)
    ax.set_title("Behaviour vs fluency trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out_dir / "tradeoff.png", plt))
    return paths


def policy_plots(rows: Sequence[dict[str, Any]], out_dir: Path, behaviour_label: str) -> Path:
    """Four bar charts (behaviour, KL, perplexity, distinct-2) by policy."""
    plt = pyplot()
    names = [r["policy"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    for ax, key, title in zip(
        axes,
        ("behaviour", "kl", "perplexity", "distinct2"),
        (behaviour_label, "mean KL from unsteered", "perplexity (unsteered model)", "distinct-2"),
        strict=True,
    ):
        ax.bar(names, [r[key] for r in rows], color="#4a7ab5")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Same vector, layer and multiplier under each position policy")
    return save_figure(fig, out_dir / "policies.png", plt)


def contrast_histogram(positive: Sequence[float], negative: Sequence[float], title: str) -> bytes:
    """Overlaid histograms of the projections of positive and negative examples (PNG bytes)."""
    import io

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    values = list(positive) + list(negative)
    lo, hi = min(values), max(values)
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    ax.hist(negative, bins=bins, alpha=0.6, color="#2f6fd6", label=f"negative ({len(negative)})")
    ax.hist(positive, bins=bins, alpha=0.6, color="#d6452f", label=f"positive ({len(positive)})")
    ax.set_xlabel("projection onto the unit vector")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def training_curve(losses: Sequence[float], title: str) -> bytes:
    """The loss after every training step (PNG bytes)."""
    import io

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(range(1, len(losses) + 1), list(losses), color="#2f6fd6", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def save_figure(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
