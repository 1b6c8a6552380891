"""The policy comparison: one vector, layer and multiplier under each position policy.

This answers the founding question (does it matter whether steering stays in the KV
cache?) side by side; see docs/design.md, "Persisting or transient".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerlab.core.dataset import Dataset
from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.core.vector import SteeringVector
from steerlab.evaluation.config import write_table
from steerlab.evaluation.judges import Judge
from steerlab.evaluation.metrics import behaviour_probability, judged_generation
from steerlab.evaluation.sweep_report import markdown_table

COMPARED_POLICIES = ("after-prompt", "transient", "all", "prompt", "actadd")


def compare_policies(
    lm: Engine,
    vector: SteeringVector,
    layer: int,
    multiplier: float,
    prompts: Sequence[str],
    judge: Judge,
    out_dir: Path,
    *,
    policies: Sequence[str] = COMPARED_POLICIES,
    actadd_rows: int = 4,
    max_new_tokens: int = 32,
    behaviour_label: str = "behaviour",
    ab_dataset: Dataset | None = None,
) -> list[dict[str, Any]]:
    """The same vector, layer and multiplier under each policy, against the unsteered model.

    ``actadd`` adds the vector at the first ``actadd_rows`` prompt positions. Writes
    ``policies.csv``/``.json``, ``policies.png`` and ``policies.md`` into ``out_dir``.

    Returns:
        One row per policy (plus ``unsteered``): behaviour, KL, perplexity, distinct-2, an
        example completion, and the A/B score when ``ab_dataset`` is given.
    """
    if layer not in vector.directions:
        raise SteerlabError(
            f"the vector has no layer {layer}: it has layers {','.join(map(str, vector.layers))}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    rows: list[dict[str, Any]] = []
    for name in ["unsteered", *policies]:
        if name == "unsteered":
            steering: list[Steering] = []
        elif name == "actadd":
            tiled = vector.select([layer]).tiled(actadd_rows)
            steering = [Steering(tiled, multiplier, (layer,), Policy("actadd"))]
        else:
            steering = [Steering(vector, multiplier, (layer,), Policy.parse(name))]
        g = judged_generation(lm, prompts, steering, judge, sampling)
        row: dict[str, Any] = {
            "policy": name,
            "behaviour": g.behaviour,
            "kl": g.kl,
            "perplexity": g.perplexity,
            "distinct2": g.distinct2,
            "neutral_perplexity": g.neutral_perplexity,
            "example": g.texts[0],
        }
        if ab_dataset is not None:
            row["ab_score"] = behaviour_probability(lm, ab_dataset, steering).mean
        rows.append(row)
    write_table(rows, out_dir, "policies")
    from steerlab.evaluation.plots import policy_plots

    policy_plots(rows, out_dir, behaviour_label)
    cols = ["policy", "behaviour", "kl", "perplexity", "distinct2"] + (
        ["ab_score"] if ab_dataset else []
    )
    (out_dir / "policies.md").write_text(
        f"# Policy comparison: layer {layer}, multiplier {multiplier:g}\n\n"
        + markdown_table(rows, cols)
        + "\n![policies](policies.png)\n"
    )
    return rows
