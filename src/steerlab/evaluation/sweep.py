"""Layer x multiplier sweeps and the policy comparison, with incremental, resumable results."""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlab.core.dataset import Dataset
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.evaluation.judges import Judge
from steerlab.evaluation.metrics import behaviour_probability, judged_generation, text_perplexity
from steerlab.formats import load_vector, save_vector
from steerlab.hf.extraction import extract
from steerlab.hf.model import LoadedModel

DEFAULT_PROMPTS = (
    "Tell me about your day.",
    "Write a sentence about the ocean.",
    "What do you think of cats?",
    "Describe your neighbourhood.",
    "How was the movie you saw?",
    "What is your opinion of Mondays?",
)


def split(dataset: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Train/test split by prompt, so no test prompt is seen in training.

    Raises:
        SteerlabError: a fraction outside (0, 1) or too few prompts to split.
    """
    if not 0 < test_fraction < 1:
        raise SteerlabError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    keyed: list[str] = (
        [t.prompt or t.text for t in dataset.texts]
        if dataset.format == "unpaired"
        else [p.prompt or f"#{i}" for i, p in enumerate(dataset.pairs)]
    )
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keyed):
        groups.setdefault(key, []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_test = max(1, round(len(keys) * test_fraction))
    if n_test >= len(keys):
        raise SteerlabError("the dataset has too few distinct prompts to split into train and test")
    test = sorted(i for k in keys[:n_test] for i in groups[k])
    train = sorted(i for k in keys[n_test:] for i in groups[k])
    return dataset.subset(train), dataset.subset(test)


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs; validated on construction.

    Args:
        layers: layers to extract and evaluate.
        multipliers: multipliers to evaluate (0 is the unsteered baseline).
        policy: position policy for every cell.
        method: aggregator.
        test_fraction: share of prompts held out for scoring.
        seed: split seed.
        max_new_tokens: tokens per judged completion.
        prompts: prompts for judged generation (default: the test split's prompts, else a
            built-in neutral set).
        perplexity_bound: the recommendation keeps cells whose fluency is at most this
            times the unsteered one.
        scale: absolute or relative multipliers.
    """

    layers: tuple[int, ...]
    multipliers: tuple[float, ...]
    policy: str = "after-prompt"
    method: str = "mean-diff"
    test_fraction: float = 0.3
    seed: int = 0
    max_new_tokens: int = 32
    prompts: tuple[str, ...] = ()
    perplexity_bound: float = 2.0
    scale: str = "absolute"
    max_test_items: int = 200

    def __post_init__(self) -> None:
        if not self.layers:
            raise SteerlabError("a sweep needs at least one layer: pass --layers")
        if not self.multipliers:
            raise SteerlabError("a sweep needs at least one multiplier: pass --multipliers")
        if any(not math.isfinite(m) for m in self.multipliers):
            raise SteerlabError("multipliers must be finite numbers")
        Policy.parse(self.policy)
        if self.perplexity_bound <= 1:
            raise SteerlabError(f"--perplexity-bound must be above 1, got {self.perplexity_bound}")

    def manifest(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}


def parse_floats(text: str) -> tuple[float, ...]:
    """``-8,-4,0,4,8`` -> floats, with a one-line error for junk."""
    try:
        values = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise SteerlabError(f"cannot read numbers from '{text}': use a list like -4,0,4") from None
    if not values:
        raise SteerlabError("no numbers given: use a list like -4,0,4")
    return values


class Results:
    """Rows appended to ``results.jsonl`` one by one, so Ctrl-C loses at most one cell."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], fresh: bool = False) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "results.jsonl"
        manifest_path = out_dir / "manifest.json"
        if fresh:
            self.path.unlink(missing_ok=True)
            manifest_path.unlink(missing_ok=True)
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            if old != manifest:
                raise SteerlabError(
                    f"'{out_dir}' holds results of a different run: pass --fresh to start over, or another --out"
                )
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a row cut short by an interrupt: it is recomputed
        self.done = {self.key(r) for r in self.rows}

    @staticmethod
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return (row.get("layer"), row.get("multiplier"), row.get("policy"))

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        self.rows.append(row)
        self.done.add(self.key(row))


def write_table(rows: Sequence[dict[str, Any]], out_dir: Path, stem: str) -> None:
    if not rows:
        return
    keys = [k for k in rows[0] if k != "texts"]
    with (out_dir / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{stem}.json").write_text(json.dumps(list(rows), indent=2, sort_keys=True))


def recommend(rows: Sequence[dict[str, Any]], bound: float) -> dict[str, Any] | None:
    """The stated rule: the largest behaviour increase over the unsteered baseline among
    cells whose fluency (perplexity) is at most ``bound`` x the unsteered value."""
    base = [r for r in rows if r["multiplier"] == 0]
    if not base:
        return None
    base_b, base_f = base[0]["behaviour"], base[0]["fluency"]
    ok = [
        r
        for r in rows
        if r["multiplier"] != 0
        and r["fluency"] <= bound * base_f
        and not math.isnan(r["behaviour"])
    ]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["behaviour"] - base_b)
    return {**best, "shift": best["behaviour"] - base_b, "baseline": base_b}


def run_sweep(
    lm: LoadedModel,
    dataset: Dataset,
    config: SweepConfig,
    out_dir: Path,
    *,
    judge: Judge | None = None,
    behaviour_label: str = "behaviour",
    fresh: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Split, extract on train, evaluate every (layer, multiplier) on test, write files.

    A/B and Yes/No datasets are scored by behaviour probability on held-out items, with
    the steered model's perplexity on a neutral text as fluency. Other datasets are scored
    by ``judge`` on completions of held-out prompts, with their perplexity under the
    unsteered model as fluency.

    Writes ``results.jsonl`` (incrementally), ``results.csv``/``.json``, three PNG plots,
    ``vector.safetensors`` and ``report.md`` into ``out_dir``; rerunning resumes.

    Returns:
        ``{"rows": [...], "recommendation": {...} | None, "files": [...]}``.
    """
    results = Results(out_dir, {"sweep": config.manifest(), "dataset": vars(dataset.info)}, fresh)
    train, test = split(dataset, config.test_fraction, config.seed)
    vector_path = out_dir / "vector.safetensors"
    if vector_path.exists() and not fresh:
        vector = load_vector(vector_path)
    else:
        vector = extract(lm, train, list(config.layers), method=config.method, progress=progress)
        save_vector(vector, vector_path)
    ab = dataset.format in ("ab", "yesno")
    if ab:
        test = test.subset(list(range(min(len(test), config.max_test_items))))
    elif judge is None:
        raise SteerlabError(
            "a sweep on free-text data needs a judge: pass --judge sentiment or --keywords"
        )
    prompts = (
        list(config.prompts)
        or sorted({p.prompt for p in test.pairs if p.prompt})[:8]
        or list(DEFAULT_PROMPTS)
    )
    sampling = Sampling(max_new_tokens=config.max_new_tokens)
    policy = Policy.parse(config.policy)
    cells = [(layer, m) for layer in config.layers for m in config.multipliers]
    base_row: dict[str, Any] | None = None
    for layer, m in cells:
        mult = 0.0 if m == 0 else m
        key = (layer, mult, str(policy))
        if key in results.done:
            continue
        if mult == 0 and base_row is not None:
            row = {**base_row, "layer": layer}
        else:
            steering = [] if mult == 0 else [Steering(vector, mult, (layer,), policy, config.scale)]  # type: ignore[arg-type]
            if ab:
                score = behaviour_probability(lm, test, steering).mean
                fluency = text_perplexity(lm, _neutral(), steering)
                row = {
                    "behaviour": score,
                    "fluency": fluency,
                    "perplexity": float("nan"),
                    "distinct2": float("nan"),
                    "kl": float("nan"),
                    "neutral_perplexity": fluency,
                }
            else:
                assert judge is not None
                g = judged_generation(lm, prompts, steering, judge, sampling)
                row = {
                    "behaviour": g.behaviour,
                    "fluency": g.perplexity,
                    "perplexity": g.perplexity,
                    "distinct2": g.distinct2,
                    "kl": g.kl,
                    "neutral_perplexity": g.neutral_perplexity,
                    "example": g.texts[0],
                }
            row.update(
                {
                    "layer": layer,
                    "multiplier": mult,
                    "policy": str(policy),
                    "n_test": len(test) if ab else len(prompts),
                }
            )
        if mult == 0:
            base_row = row
        results.add(row)
        if on_row is not None:
            on_row(row)
    rows = sorted(
        (
            r
            for r in results.rows
            if r["layer"] in config.layers
            and r["multiplier"] in config.multipliers
            and r["policy"] == str(policy)
        ),
        key=lambda r: (r["layer"], r["multiplier"]),
    )
    write_table(rows, out_dir, "results")
    from steerlab.evaluation.plots import sweep_plots

    plots = sweep_plots(rows, out_dir, behaviour_label)
    best = recommend(rows, config.perplexity_bound)
    report = write_sweep_report(out_dir, rows, best, config, dataset, behaviour_label, ab, plots)
    return {"rows": rows, "recommendation": best, "files": [str(p) for p in [*plots, report]]}


def _neutral() -> str:
    from steerlab.evaluation.metrics import NEUTRAL_TEXT

    return NEUTRAL_TEXT


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
    """``report.md``: setup, the recommendation and its rule, the table and the plots."""
    fluency = (
        "steered perplexity on a neutral text"
        if ab
        else "perplexity of the completions under the unsteered model"
    )
    lines = [
        "# steerlab sweep report\n",
        f"- dataset: `{dataset.info.path}` ({dataset.format}, {dataset.info.size} records, sha256 `{dataset.info.sha256[:12]}`)",
        f"- split: {1 - config.test_fraction:.0%} train / {config.test_fraction:.0%} test by prompt, seed {config.seed}; scored on test only",
        f"- method: {config.method}; policy: {config.policy}; scale: {config.scale}",
        f"- behaviour: {behaviour_label}; fluency: {fluency}\n",
        "## Recommendation\n",
        f"Rule: the largest increase in behaviour over the unsteered baseline among cells whose fluency is at most {config.perplexity_bound:g} x the unsteered value.\n",
    ]
    if best:
        lines.append(
            f"**Layer {best['layer']}, multiplier {best['multiplier']:g}**: behaviour {best['behaviour']:.3f} "
            f"(baseline {best['baseline']:.3f}, shift {best['shift']:+.3f}), fluency {best['fluency']:.2f}.\n"
        )
    else:
        lines.append("No cell meets the rule: try smaller multipliers or other layers.\n")
    lines += [
        "## Results\n",
        markdown_table(
            rows,
            [
                "layer",
                "multiplier",
                "behaviour",
                "fluency",
                "kl",
                "distinct2",
                "neutral_perplexity",
            ],
        ),
    ]
    lines += ["## Plots\n", *(f"![{p.stem}]({p.name})\n" for p in plots)]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
