"""The README's answer to the founding question: policies compared at equal behaviour shift.

For three behaviours on the default model (the shipped sentiment pairs, the casual-register
pairs and the weddings-topic pairs, each 32+ pairs), this runs the commands a user would:

    steerlab extract DATA --layers 9 -o VECTOR
    steerlab compare-policies --frontier --vector VECTOR --layer 9 --multipliers 1,2,3,4,6,8 \\
        --policies after-prompt,transient,all --judge JUDGE -o docs/frontiers/NAME

on the 32 shipped neutral prompts, then writes docs/frontiers/summary.md: each policy's
multiplier and side effects at one shared shift per behaviour, with 95% intervals.

Usage: .venv/bin/python scripts/policy_frontiers.py   (about 20 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from steerlab.evaluation.frontier_report import ci_text as ci

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "steerlab" / "data"
OUT = ROOT / "docs" / "frontiers"
LAYER = "9"
MULTIPLIERS = "1,2,3,4,6,8"
POLICIES = "after-prompt,transient,all"
WEDDING_WORDS = "wedding,bride,groom,marri,vow,ceremony,newlywed,engage,bouquet,honeymoon"
BEHAVIOURS = {
    "sentiment": (DATA / "sentiment.jsonl", ["--judge", "sentiment"], "VADER sentiment"),
    "casual": (DATA / "casual.jsonl", ["--judge", "casual"], "casual register (lexicon)"),
    "weddings": (DATA / "weddings.jsonl", ["--keywords", WEDDING_WORDS], "wedding words / 100"),
}


def steerlab(*args: str) -> None:
    command = [sys.executable, "-m", "steerlab.cli", *args]
    print("$ steerlab " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [
        "| behaviour | shift read at | policy | multiplier needed | KL per token | "
        "perplexity | distinct-2 | KL minus after-prompt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    timings = {}
    for name, (data, judge, label) in BEHAVIOURS.items():
        start = time.perf_counter()
        vector = OUT / f"{name}.safetensors"
        steerlab("extract", str(data), "--layers", LAYER, "-o", str(vector))
        steerlab(
            "compare-policies", "--frontier", "--vector", str(vector), "--layer", LAYER,
            "--multipliers", MULTIPLIERS, "--policies", POLICIES, *judge,
            "-o", str(OUT / name),
        )  # fmt: skip
        vector.unlink()
        timings[name] = time.perf_counter() - start
        result = json.loads((OUT / name / "frontier-readings.json").read_text())
        shift = result["shift"]
        for r in result["readings"]:
            lines.append(
                f"| {label} | {shift:+.3f} | {r['policy']} | {ci(r['multiplier'], 2)} | "
                f"{ci(r['kl'])} | {ci(r['perplexity'], 2)} | {ci(r['distinct2'])} | "
                f"{ci(r['kl_minus_after-prompt']) if 'kl_minus_after-prompt' in r else '-'} |"
            )
    lines += [
        "",
        "Seconds per behaviour (extraction and frontier, 2 CPU cores): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
    ]
    (OUT / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
