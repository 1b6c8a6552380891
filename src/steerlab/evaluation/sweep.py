"""Sweeps over layer x multiplier x policy x extraction context, with incremental, resumable
results; the recommendation and report are in :mod:`steerlab.evaluation.sweep_report`."""

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
from steerlab.core.vector import SteeringVector
from steerlab.evaluation.cells import Cell, add_shifts, cell_keys, cells_per_batch, score_cells
from steerlab.evaluation.judges import Judge
from steerlab.evaluation.sweep_report import recommend, write_sweep_report
from steerlab.formats import load_vector, save_vector
from steerlab.hf.extraction import extract
from steerlab.hf.model import LoadedModel

DEFAULT_PROMPTS = (  # the first six shipped neutral prompts (the quick demo uses them)
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
        policies: position policies (an axis of the sweep).
        contexts: extraction contexts (an axis): ``chat`` (the chat template) and/or
            ``raw`` (plain text); one vector is extracted per context.
        method: aggregator.
        test_fraction: share of prompts held out for scoring.
        seed: split, sampling and bootstrap seed.
        max_new_tokens: tokens per judged completion.
        prompts: prompts for judged generation (default: the shipped neutral prompts).
        samples: completions per prompt (1: greedy; more: sampled at ``temperature``).
        temperature: sampling temperature when ``samples`` > 1.
        perplexity_bound: the recommendation keeps cells whose fluency is at most this
            times the unsteered one.
        direction: ``increase`` or ``decrease`` the behaviour.
        target: a behaviour value to reach instead (the cell closest to it).
        scale: absolute or relative multipliers.
        max_test_items: A/B items scored per cell.
        batch_rows: most rows per batch when cells run together.
    """

    layers: tuple[int, ...]
    multipliers: tuple[float, ...]
    policies: tuple[str, ...] = ("after-prompt",)
    contexts: tuple[str, ...] = ("chat",)
    method: str = "mean-diff"
    test_fraction: float = 0.3
    seed: int = 0
    max_new_tokens: int = 32
    prompts: tuple[str, ...] = ()
    samples: int = 1
    temperature: float = 0.7
    perplexity_bound: float = 2.0
    direction: str = "increase"
    target: float | None = None
    scale: str = "absolute"
    max_test_items: int = 200
    batch_rows: int = 192

    def __post_init__(self) -> None:
        if not self.layers:
            raise SteerlabError("a sweep needs at least one layer: pass --layers")
        if not self.multipliers:
            raise SteerlabError("a sweep needs at least one multiplier: pass --multipliers")
        if any(not math.isfinite(m) for m in self.multipliers):
            raise SteerlabError("multipliers must be finite numbers")
        if not self.policies:
            raise SteerlabError("a sweep needs at least one policy: pass --policies")
        for policy in self.policies:
            Policy.parse(policy)
        if not self.contexts or any(c not in ("chat", "raw") for c in self.contexts):
            raise SteerlabError("--contexts takes chat, raw or both (chat,raw)")
        if self.perplexity_bound <= 1:
            raise SteerlabError(f"--perplexity-bound must be above 1, got {self.perplexity_bound}")
        if self.direction not in ("increase", "decrease"):
            raise SteerlabError(f"--direction must be increase or decrease, got {self.direction!r}")
        if self.target is not None and not math.isfinite(self.target):
            raise SteerlabError("--target must be a finite number")
        if self.samples < 1:
            raise SteerlabError(f"--samples must be at least 1, got {self.samples}")
        if self.batch_rows < 1:
            raise SteerlabError(f"--batch-rows must be at least 1, got {self.batch_rows}")
        if self.samples > 1 and not self.temperature > 0:
            raise SteerlabError("--samples above 1 needs a --temperature above 0")

    def manifest(self) -> dict[str, Any]:
        """What the results depend on (``batch_rows`` changes no number, so it is left out)."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(self).items()
            if k != "batch_rows"
        }


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
    """Rows appended to ``results.jsonl`` batch by batch, so Ctrl-C loses one batch at most."""

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
        return (row.get("layer"), row.get("multiplier"), row.get("policy"), row.get("context"))

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        self.rows.append(row)
        self.done.add(self.key(row))


def write_table(rows: Sequence[dict[str, Any]], out_dir: Path, stem: str) -> None:
    """``stem.csv`` (scalars only) and ``stem.json`` (everything but per-item lists)."""
    if not rows:
        return
    keys = [k for k in rows[0] if k not in LISTS]
    with (out_dir / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plain = [{k: v for k, v in r.items() if k not in LISTS} for r in rows]
    (out_dir / f"{stem}.json").write_text(json.dumps(plain, indent=2, sort_keys=True))


LISTS = (
    "texts",
    "items",
    "item_nll",
    "item_tokens",
    "item_kl",
    "item_distinct2",
)  # per-item data, kept in results.jsonl


def neutral_prompts() -> tuple[str, ...]:
    """The shipped neutral prompts for free-text sweeps (32)."""
    from importlib.resources import files

    text = files("steerlab").joinpath("data/neutral_prompts.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def make_vector(
    lm: LoadedModel, train: Dataset, config: SweepConfig, chat: bool, progress: bool
) -> SteeringVector:
    """The sweep's vector from the train split: extracted, or (``bipo``) trained per layer."""
    if config.method != "bipo":
        return extract(
            lm, train, list(config.layers), method=config.method, progress=progress, chat=chat
        )
    from steerlab.hf.bipo import BipoConfig, train_bipo

    trained = [
        train_bipo(lm, train, layer, BipoConfig(seed=config.seed), chat=chat, progress=progress)
        for layer in config.layers
    ]
    first = trained[0].vector
    return SteeringVector(
        directions={
            layer: t.vector.directions[layer]
            for layer, t in zip(config.layers, trained, strict=True)
        },
        model=first.model,
        method="bipo",
        read_position="trained",
        residual_norms={k: v for t in trained for k, v in t.vector.residual_norms.items()},
        dataset=first.dataset,
        notes={**dict(first.notes), "final_loss": [t.losses[-1] for t in trained]},
    )


def vector_file(out_dir: Path, context: str) -> Path:
    """Where a sweep keeps the vector of an extraction context."""
    return out_dir / (
        "vector.safetensors" if context == "chat" else f"vector-{context}.safetensors"
    )


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
    """Split, extract on train (once per context), evaluate every cell on test, write files.

    A/B and Yes/No datasets are scored by behaviour probability on held-out items, with
    the steered model's perplexity on a neutral text as fluency. Other datasets are scored
    by ``judge`` on completions of the prompts, with their perplexity under the unsteered
    model as fluency. The cells of a context (every layer, multiplier and policy, and the
    unsteered baseline) run together in padded batches of up to ``batch_rows`` rows with
    per-row steering, sharing each prompt's prefill (:func:`score_cells`).

    Writes ``results.jsonl`` (incrementally, per-item scores included),
    ``results.csv``/``.json``, three PNG plots, the vectors and ``report.md``; rerunning
    resumes.

    Returns:
        ``{"rows": [...], "recommendation": {...} | None, "files": [...]}``.
    """
    results = Results(out_dir, {"sweep": config.manifest(), "dataset": vars(dataset.info)}, fresh)
    train, test = split(dataset, config.test_fraction, config.seed)
    vectors = {}
    for context in config.contexts:
        path = vector_file(out_dir, context)
        if path.exists() and not fresh:
            vectors[context] = load_vector(path)
        else:
            vectors[context] = make_vector(lm, train, config, context == "chat", progress)
            save_vector(vectors[context], path)
    ab = dataset.format in ("ab", "yesno")
    if ab:
        test = test.subset(list(range(min(len(test), config.max_test_items))))
    elif judge is None:
        raise SteerlabError(
            "a sweep on free-text data needs a judge: pass --judge sentiment or --keywords"
        )
    prompts = list(config.prompts) or list(neutral_prompts())
    base = next((r for r in results.rows if r["multiplier"] == 0), None)

    def save(row: dict[str, Any]) -> None:
        results.add(row)
        if on_row is not None:
            on_row(row)

    for context in config.contexts:
        todo: list[Cell] = [  # by policy first: cells that share prompt prefills batch together
            (layer, float(m), str(Policy.parse(p)), context)
            for p in config.policies
            for layer in config.layers
            for m in config.multipliers
            if (layer, float(m), str(Policy.parse(p)), context) not in results.done
        ]
        if not todo:
            continue
        fresh_cells = [c for c in todo if c[1] != 0]
        if base is None:  # the unsteered baseline runs in the first batch
            fresh_cells.insert(0, (todo[0][0], 0.0, todo[0][2], context))
        per_call = (
            len(config.policies) * len(config.multipliers)
            if ab
            else cells_per_batch(config, len(prompts))
        )
        for first in range(0, len(fresh_cells), per_call):
            group = fresh_cells[first : first + per_call]
            computed = score_cells(
                lm, test if ab else None, prompts, group, vectors[context], config, judge
            )
            if base is None:
                base = computed[group[0]]
            for cell in group:  # saved batch by batch: an interrupted sweep resumes here
                if cell in todo:
                    save(computed[cell])
        assert base is not None
        for cell in todo:
            if cell not in results.done:  # the other unsteered cells copy the baseline
                save({**base, **cell_keys(cell)})
    wanted = {
        (float(m), str(Policy.parse(p)), c)
        for m in config.multipliers
        for p in config.policies
        for c in config.contexts
    }
    rows = sorted(
        (
            r
            for r in results.rows
            if r["layer"] in config.layers
            and (r["multiplier"], r["policy"], r.get("context", "chat")) in wanted
        ),
        key=lambda r: (r.get("context", "chat"), r["policy"], r["layer"], r["multiplier"]),
    )
    add_shifts(rows, config.seed)
    write_table(rows, out_dir, "results")
    best = recommend(rows, config)
    (out_dir / "recommendation.json").write_text(json.dumps(best, indent=2, sort_keys=True))
    from steerlab.evaluation.plots import sweep_plots

    focus = (best["policy"], best["context"]) if best else (rows[0]["policy"], rows[0]["context"])
    plots = sweep_plots(
        [r for r in rows if (r["policy"], r["context"]) == focus], out_dir, behaviour_label
    )
    report = write_sweep_report(out_dir, rows, best, config, dataset, behaviour_label, ab, plots)
    return {"rows": rows, "recommendation": best, "files": [str(p) for p in [*plots, report]]}
