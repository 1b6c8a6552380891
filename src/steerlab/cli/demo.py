"""The main job on the embedded default model: a sentiment vector, a sweep, side-by-side
completions, the policy comparison, and a report with plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab.core.dataset import load_dataset
from steerlab.core.engine import generate_multipliers
from steerlab.core.files import sentiment_dataset_path
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.evaluation.judges import sentiment
from steerlab.evaluation.policies import compare_policies
from steerlab.evaluation.sweep import DEFAULT_PROMPTS, SweepConfig, run_sweep
from steerlab.formats import load_vector
from steerlab.hf.methods import sweep_extractor
from steerlab.hf.model import DEFAULT_MODEL, LoadedModel

SHOWCASE_PROMPTS = (
    "Tell me about your day.",
    "Write a sentence about the ocean.",
    "What do you think of cats?",
)


@dataclass(frozen=True)
class DemoResult:
    """What the demo found and wrote."""

    sweep: dict[str, Any]
    layer: int
    multiplier: float
    side_by_side: list[tuple[str, list[tuple[float, str]]]]
    policies: list[dict[str, Any]]
    report: Path


def run_demo(
    lm: LoadedModel,
    out_dir: Path,
    *,
    layers: tuple[int, ...] = (6, 9, 12),
    multipliers: tuple[float, ...] = (-8.0, -4.0, 0.0, 4.0, 8.0),
    max_new_tokens: int = 24,
    fresh: bool = False,
    on_row: Any = None,
) -> DemoResult:
    """Run the demo and write ``report.md`` (with the sweep and policy reports) to ``out_dir``."""
    data = load_dataset(sentiment_dataset_path())
    config = SweepConfig(
        layers=layers,
        multipliers=multipliers,
        max_new_tokens=max_new_tokens,
        prompts=DEFAULT_PROMPTS,
    )
    judge = sentiment()
    sweep = run_sweep(
        lm,
        data,
        config,
        out_dir / "sweep",
        extractor=sweep_extractor(lm),
        judge=judge,
        behaviour_label="VADER sentiment",
        fresh=fresh,
        on_row=on_row,
    )
    best = sweep["recommendation"]
    layer = int(best["layer"]) if best else layers[len(layers) // 2]
    multiplier = abs(float(best["multiplier"])) if best else 4.0
    vector = load_vector(out_dir / "sweep" / "vector.safetensors")
    steering = [Steering(vector, 1.0, (layer,))]
    sampling = Sampling(max_new_tokens=max_new_tokens + 16)
    side = [
        (p, generate_multipliers(lm, p, steering, [multiplier, -multiplier], sampling))
        for p in SHOWCASE_PROMPTS
    ]
    policies = compare_policies(
        lm,
        vector,
        layer,
        multiplier,
        DEFAULT_PROMPTS,
        judge,
        out_dir / "policies",
        max_new_tokens=max_new_tokens,
        behaviour_label="VADER sentiment",
    )
    report = out_dir / "report.md"
    lines = [
        "# steerlab demo\n",
        f"Model: {lm.info.name} ({lm.info.architecture}, {lm.info.num_layers} layers). Vector: mean difference of "
        f"the shipped sentiment pairs, read over the completion tokens. Steering at layer {layer}, multiplier "
        f"+/-{multiplier:g}, policy after-prompt.\n",
        "## Side by side\n",
    ]
    for prompt, outs in side:
        lines.append(f"**{prompt}**\n")
        for m, text in outs:
            label = "unsteered" if m == 0 else ("positive" if m > 0 else "negative")
            lines.append(f"- *{label}*: {text.strip()}")
        lines.append("")
    lines += [
        "## Sweep\n",
        "See [sweep/report.md](sweep/report.md).\n",
        "![behaviour vs multiplier](sweep/behaviour_vs_multiplier.png)\n",
        "## Does it matter whether steering stays in the residual stream?\n",
        "See [policies/policies.md](policies/policies.md).\n",
        "![policies](policies/policies.png)\n",
    ]
    report.write_text("\n".join(lines))
    return DemoResult(sweep, layer, multiplier, side, policies, report)


__all__ = ["DEFAULT_MODEL", "DemoResult", "run_demo"]
