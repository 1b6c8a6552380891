"""The frontier's plot and report (:mod:`steerlab.evaluation.frontier` computes them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from steerlab.evaluation.plots import pyplot, save_figure
from steerlab.evaluation.sweep_report import markdown_table

COSTS = ("kl", "perplexity", "distinct2")
COST_NAMES = {"kl": "KL per token", "perplexity": "perplexity", "distinct2": "distinct-2"}


def ci_text(values: list[float], digits: int = 3) -> str:
    """``point [lo, hi]``; an infinite end (a policy that does not reach the shift in more
    than 2.5% of resamples) is written ``inf``."""
    point, lo, hi = values
    if not math.isfinite(point):
        return "not reached"
    if math.isnan(lo) or math.isnan(hi):
        return f"{point:.{digits}f}"

    def end(x: float) -> str:
        return f"{x:.{digits}f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")

    return f"{point:.{digits}f} [{end(lo)}, {end(hi)}]"


def frontier_plot(result: dict[str, Any], out_dir: Path) -> Path:
    """Each cost against the behaviour shift, one line per policy, with 95% intervals on
    both axes, and the shift the costs are read at."""
    plt = pyplot()
    cells = result["cells"]
    policies = [r["policy"] for r in result["readings"]] or sorted(
        {c["policy"] for c in cells if c["policy"] != "unsteered"}
    )
    base = next(c for c in cells if c["policy"] == "unsteered")
    fig, axes = plt.subplots(1, len(COSTS), figsize=(4.2 * len(COSTS), 3.6))
    for ax, key in zip(axes, COSTS, strict=True):
        for policy in policies:
            pts = [base] + sorted(
                (c for c in cells if c["policy"] == policy), key=lambda c: abs(c["multiplier"])
            )
            xs, ys = [p["shift"] for p in pts], [p[key] for p in pts]
            ax.errorbar(
                xs,
                ys,
                xerr=[[x - p["shift_lo"] for x, p in zip(xs, pts, strict=True)],
                      [p["shift_hi"] - x for x, p in zip(xs, pts, strict=True)]],
                yerr=[[y - p[f"{key}_lo"] for y, p in zip(ys, pts, strict=True)],
                      [p[f"{key}_hi"] - y for y, p in zip(ys, pts, strict=True)]],
                marker="o", markersize=4, capsize=2, linewidth=1.2, label=policy,
            )  # fmt: skip
        if result["shift"] is not None:
            ax.axvline(result["shift"], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(f"shift in {result['behaviour']} ({result['direction']})")
        ax.set_ylabel(COST_NAMES[key])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Side effects at equal behaviour shift, layer {result['layer']}", fontsize=10)
    return save_figure(fig, out_dir / "frontier.png", plt)


def frontier_report(result: dict[str, Any], out_dir: Path) -> Path:
    """``frontier.md``: every cell with its intervals, and the costs at equal shift."""
    cells = [
        {
            "policy": c["policy"],
            "multiplier": f"{c['multiplier']:g}",
            "shift": ci_text([c["shift"], c["shift_lo"], c["shift_hi"]]),
            **{COST_NAMES[k]: ci_text([c[k], c[f"{k}_lo"], c[f"{k}_hi"]]) for k in COSTS},
        }
        for c in result["cells"]
    ]
    text = [
        f"# Policies at equal behaviour shift: layer {result['layer']}",
        "",
        f"Behaviour: {result['behaviour']} ({result['direction']}), on {result['prompts']} "
        "prompts; shift = cell minus the unsteered baseline on the same prompts. Every "
        "interval is a 95% bootstrap over prompts. KL per token from the unsteered model, "
        "perplexity of the completions under the unsteered model, distinct-2 per completion.",
        "",
        markdown_table(cells, ["policy", "multiplier", "shift", *COST_NAMES.values()]),
    ]
    if result["shift"] is None:
        text += [
            "",
            "No policy shifts the behaviour in 97.5% of resamples: there is no equal shift to "
            "read (pass --shift to read one anyway).",
        ]
    else:
        ref = result["readings"][0]["policy"]
        readings = []
        for r in result["readings"]:
            row = {
                "policy": r["policy"],
                "multiplier needed": ci_text(r["multiplier"], 2),
                **{COST_NAMES[k]: ci_text(r[k]) for k in COSTS},
                f"KL minus {ref}": ci_text(r.get(f"kl_minus_{ref}", [0.0, 0.0, 0.0])),
                f"perplexity minus {ref}": ci_text(
                    r.get(f"perplexity_minus_{ref}", [0.0, 0.0, 0.0])
                ),
                "reached in resamples": f"{100 * r['reached']:.1f}%",
                "shift reached in 97.5%": f"{r['reliable_shift']:+.3f}",
            }
            readings.append(row)
        text += [
            "",
            f"## Costs at shift {result['shift']:.3f}",
            "",
            "Each policy's cost where its frontier (cells by multiplier, from the baseline) "
            "first reaches the shift, by linear interpolation inside every bootstrap resample; "
            "differences are paired (same resampled prompts). No resample is dropped: where a "
            "policy never reaches the shift its multiplier and costs count as infinite (it "
            "cannot get there), and where two policies both never reach it their difference "
            "counts against both ends; an end is `inf` when more than 2.5% of resamples put "
            "it there. Unless --shift was given, the shift is the smallest of the shifts each "
            "policy reaches in 97.5% of resamples (over the policies for which it is positive).",
            "",
            markdown_table(readings, list(readings[0])),
        ]
    text += ["", "![frontier](frontier.png)", ""]
    path = out_dir / "frontier.md"
    path.write_text("\n".join(text))
    return path
