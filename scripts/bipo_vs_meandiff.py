"""BiPO versus mean-diff on the shipped sentiment pairs: each method's own best cell of the
same sweep (same 32 prompts, same split, same fluency bound), in both directions.

Run: .venv/bin/python scripts/bipo_vs_meandiff.py [OUT]  (about 20 minutes on 2 cores).
Prints the Markdown table the README shows; the sweeps' reports are in OUT/<method>/.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import steerlab
from steerlab.core.dataset import load_dataset
from steerlab.core.files import sentiment_dataset_path
from steerlab.evaluation.judges import sentiment
from steerlab.evaluation.sweep import SweepConfig, run_sweep
from steerlab.evaluation.sweep_report import recommend
from steerlab.hf.methods import sweep_extractor

LAYERS = (6, 9, 12)
MULTIPLIERS = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "steerlab-out/bipo-vs-meandiff")
    lm = steerlab.load_model()
    data = load_dataset(sentiment_dataset_path())
    lines = [
        "| method | direction | best cell (layer, x) | sentiment [95% CI] | shift [95% CI] "
        "| fluency (baseline) | ties |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("mean-diff", "bipo"):
        config = SweepConfig(
            layers=LAYERS, multipliers=MULTIPLIERS, method=method, max_new_tokens=24
        )
        start = time.time()
        result = run_sweep(
            lm, data, config, out / method, extractor=sweep_extractor(lm), judge=sentiment()
        )
        print(f"{method}: {time.time() - start:.0f} s", file=sys.stderr)
        for direction in ("increase", "decrease"):
            best = recommend(result["rows"], dataclasses.replace(config, direction=direction))
            if best is None:
                lines.append(f"| {method} | {direction} | none within the bound | | | | |")
                continue
            lines.append(
                f"| {method} | {direction} | {best['layer']}, {best['multiplier']:g} "
                f"| {best['behaviour']:.3f} [{best['behaviour_lo']:.3f}, {best['behaviour_hi']:.3f}] "
                f"| {best['shift']:+.3f} [{best['shift_lo']:+.3f}, {best['shift_hi']:+.3f}] "
                f"| {best['fluency']:.2f} ({best['baseline_fluency']:.2f}) "
                f"| {', '.join(best['ties']) or 'none'} |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
