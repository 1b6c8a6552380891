"""The sweep's recommendation, chosen honestly, and its report (``report.md``).

The items (prompts, or A/B items) are split once, by the seed, into a *selection* half and
a *report* half. The rule picks a cell on the selection half; the numbers reported for it
come from the report half only, so they do not carry the luck of the choice (the winner's
curse). Neighbouring cells whose difference from the chosen one is not distinguishable
from zero on the selection half (a paired 95% bootstrap interval that contains 0) are named.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerlab.core.dataset import Dataset
from steerlab.evaluation import stats
from steerlab.evaluation.config import SweepConfig


def halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Item indices split into selection and report halves (the report half gets the odd one)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = n // 2
    return sorted(order[:cut]), sorted(order[cut:])


def rule_text(config: SweepConfig) -> str:
    if config.target is not None:
        goal = f"the behaviour closest to the target {config.target:g}"
    else:
        goal = f"the largest {config.direction} in behaviour over the unsteered baseline"
    return (
        f"{goal}, among cells whose fluency is at most {config.perplexity_bound:g} x the "
        "unsteered value; chosen on the selection half of the items, reported on the other half"
    )


def _take(values: Sequence[float], index: Sequence[int]) -> list[float]:
    return [values[i] for i in index]


def _fluency(row: dict[str, Any], index: Sequence[int] | None) -> float:
    """Perplexity over the chosen items (free text), or the row's fluency (A/B)."""
    nll, tokens = row.get("item_nll"), row.get("item_tokens")
    if index is None or not nll or not tokens:
        return float(row["fluency"])
    count = sum(tokens[i] for i in index)
    return math.exp(sum(nll[i] for i in index) / max(count, 1))


def _objective(config: Any, value: float, shift: float) -> float:
    """Larger is better."""
    target = getattr(config, "target", None)
    if target is not None:
        return -abs(value - target)
    return -shift if getattr(config, "direction", "increase") == "decrease" else shift


def recommend(
    rows: Sequence[dict[str, Any]], config: SweepConfig | None = None, *, bound: float | None = None
) -> dict[str, Any] | None:
    """The cell the stated rule picks, with its report-half numbers, or None.

    Rows without per-item scores are judged on their means (selection = report = all).
    """
    base = next((r for r in rows if r["multiplier"] == 0), None)
    if base is None:
        return None
    limit = bound if bound is not None else (config.perplexity_bound if config else 2.0)
    seed = config.seed if config else 0
    items = base.get("items")
    sel, rep = halves(len(items), seed) if items else (None, None)

    def mean_on(row: dict[str, Any], index: Sequence[int] | None) -> float:
        return stats.mean(_take(row["items"], index)) if index is not None else row["behaviour"]

    base_sel, base_flu = mean_on(base, sel), _fluency(base, sel)
    ok = [
        r
        for r in rows
        if r["multiplier"] != 0
        and _fluency(r, sel) <= limit * base_flu
        and not math.isnan(mean_on(r, sel))
    ]
    if not ok:
        return None

    def score(r: dict[str, Any]) -> float:
        value = mean_on(r, sel)
        return _objective(config, value, value - base_sel)

    best = max(ok, key=score)
    out = {**best, "baseline": base["behaviour"], "shift": best["behaviour"] - base["behaviour"]}
    out = {k: v for k, v in out.items() if k not in ("items", "item_nll", "item_tokens")}
    if sel is None or rep is None:
        return out
    rep_b = stats.Estimate.of(_take(best["items"], rep), seed)
    rep_shift = stats.Estimate.of(
        stats.paired(_take(best["items"], rep), _take(base["items"], rep)), seed
    )
    out.update(
        {
            "selection_items": len(sel),
            "report_items": len(rep),
            "selection_shift": mean_on(best, sel) - base_sel,
            "behaviour": rep_b.mean,
            "behaviour_lo": rep_b.lo,
            "behaviour_hi": rep_b.hi,
            "baseline": stats.mean(_take(base["items"], rep)),
            "shift": rep_shift.mean,
            "shift_lo": rep_shift.lo,
            "shift_hi": rep_shift.hi,
            "fluency": _fluency(best, rep),
            "baseline_fluency": _fluency(base, rep),
            "ties": _ties(best, ok, rows, sel, seed, config),
        }
    )
    return out


def _ties(
    best: dict[str, Any],
    ok: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    sel: list[int],
    seed: int,
    config: Any,
) -> list[str]:
    """Neighbouring cells (adjacent multiplier or layer of the sweep's grid, same policy and
    context) within the fluency bound that the selection half cannot tell apart from ``best``."""
    layers = sorted({r["layer"] for r in rows})
    mults = sorted({r["multiplier"] for r in rows})  # 0 included: -4 and 4 are not neighbours
    out = []
    for r in ok:
        if r is best or (r["policy"], r.get("context")) != (best["policy"], best.get("context")):
            continue
        dl = abs(layers.index(r["layer"]) - layers.index(best["layer"]))
        dm = abs(mults.index(r["multiplier"]) - mults.index(best["multiplier"]))
        if dl + dm != 1:
            continue
        sign = (
            -1.0
            if config is not None and config.target is None and config.direction == "decrease"
            else 1.0
        )
        diff = stats.paired(_take(best["items"], sel), _take(r["items"], sel))
        est = stats.Estimate.of([sign * d for d in diff], seed)
        if config is not None and config.target is not None:
            continue  # closeness to a target: no paired sign to test
        if not est.excludes(0.0):
            out.append(f"layer {r['layer']} x{r['multiplier']:g}")
    return out


def _fmt(x: Any) -> str:
    return (
        f"{x:.3f}"
        if isinstance(x, float) and math.isfinite(x)
        else ("-" if isinstance(x, float) else str(x))
    )


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a Markdown table."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def _interval(row: dict[str, Any], key: str) -> str:
    value, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if not isinstance(value, float) or not math.isfinite(value):
        return "-"
    if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo):
        return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{value:.3f}"


def steerability_rows(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Per (context, policy, layer): Tan et al.'s steerability from the A/B item scores."""
    groups: dict[tuple[Any, ...], dict[float, list[float]]] = {}
    for r in rows:
        if r.get("items"):
            key = (r.get("context", "chat"), r["policy"], r["layer"])
            groups.setdefault(key, {})[r["multiplier"]] = r["items"]
    out = []
    for (context, policy, layer), scores in sorted(groups.items()):
        result = stats.steerability(scores, seed)
        if result is not None:
            out.append(
                {
                    "context": context,
                    "policy": policy,
                    "layer": layer,
                    "steerability": result.slope.text(),
                    "anti-steerable": f"{result.anti_steerable:.0%}",
                    "multipliers": ",".join(f"{m:g}" for m in result.multipliers),
                }
            )
    return out


def write_sweep_report(
    out_dir: Path,
    rows: Sequence[dict[str, Any]],
    best: dict[str, Any] | None,
    config: SweepConfig,
    dataset: Dataset,
    behaviour_label: str,
    ab: bool,
    plots: Sequence[Path],
) -> Path:
    """``report.md``: setup, the recommendation and its rule, the tables and the plots."""
    fluency = (
        "steered perplexity on a neutral text"
        if ab
        else "perplexity of the completions under the unsteered model"
    )
    items = "held-out A/B items" if ab else "prompts"
    lines = [
        "# steerlab sweep report\n",
        f"- dataset: `{dataset.info.path}` ({dataset.format}, {dataset.info.size} records, sha256 `{dataset.info.sha256[:12]}`)",
        f"- split: {1 - config.test_fraction:.0%} train / {config.test_fraction:.0%} test by prompt, seed {config.seed}; vectors from train only",
        f"- method: {config.method}; policies: {', '.join(config.policies)}; extraction contexts: {', '.join(config.contexts)}; scale: {config.scale}",
        f"- behaviour: {behaviour_label} over {rows[0].get('n_test', '?')} {items}"
        + (
            ""
            if ab or config.samples == 1
            else f", {config.samples} sampled completions each (T={config.temperature:g})"
        )
        + f"; fluency: {fluency}",
        "- intervals: 95% bootstrap over the items; shifts are paired with the unsteered baseline\n",
        "## Recommendation\n",
        f"Rule: {rule_text(config)}.\n",
    ]
    if best:
        where = f"layer {best['layer']}, multiplier {best['multiplier']:g}, policy {best['policy']}, context {best.get('context', 'chat')}"
        if "report_items" in best:
            lines.append(
                f"**{where}**. On the {best['report_items']} report {items} (not used to choose it): "
                f"behaviour {_interval(best, 'behaviour')} (baseline {best['baseline']:.3f}), "
                f"shift {_interval(best, 'shift')}, fluency {best['fluency']:.2f} "
                f"(baseline {best['baseline_fluency']:.2f}). On the {best['selection_items']} "
                f"selection {items} its shift was {best['selection_shift']:+.3f}.\n"
            )
            if best["ties"]:
                lines.append(
                    "Not distinguishable from its neighbours "
                    f"{', '.join(best['ties'])} on the selection half (paired 95% interval of "
                    "the difference contains 0): treat these as equally good.\n"
                )
            else:
                lines.append("Its neighbours are distinguishably worse on the selection half.\n")
        else:
            lines.append(f"**{where}**: shift {best['shift']:+.3f}.\n")
    else:
        lines.append("No cell meets the rule: try smaller multipliers or other layers.\n")
    table = [
        {
            **r,
            "behaviour [95% CI]": _interval(r, "behaviour"),
            "shift [95% CI]": _interval(r, "shift"),
        }
        for r in rows
    ]
    columns = [
        "context",
        "policy",
        "layer",
        "multiplier",
        "behaviour [95% CI]",
        "shift [95% CI]",
        "fluency",
    ]
    columns += ["neutral_perplexity"] if ab else ["kl", "distinct2"]
    lines += ["## Results (all items)\n", markdown_table(table, columns)]
    if ab:
        steer = steerability_rows(rows, config.seed)
        lines += [
            "## Steerability (Tan et al. 2024)\n",
            "Per item, the least-squares slope of the logit difference (matching minus "
            "non-matching answer) against the multiplier over the symmetric multipliers; the "
            "mean with its 95% interval, and the share of anti-steerable items (negative slope).\n",
            markdown_table(
                steer,
                ["context", "policy", "layer", "steerability", "anti-steerable", "multipliers"],
            )
            if steer
            else "Needs a symmetric range of multipliers (e.g. -4,0,4).\n",
        ]
    lines += ["## Plots\n", *(f"![{p.stem}]({p.name})\n" for p in plots)]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
