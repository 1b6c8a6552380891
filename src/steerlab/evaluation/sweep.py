"""Sweeps over layer x multiplier x policy x extraction context, with incremental, resumable
results; the recommendation and report are in :mod:`steerlab.evaluation.sweep_report`."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerlab.core.dataset import Dataset
from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import Policy
from steerlab.core.vector import SteeringVector
from steerlab.evaluation.cells import add_shifts, score_cells
from steerlab.evaluation.config import (
    DEFAULT_PROMPTS,
    Cell,
    SweepConfig,
    cell_keys,
    cells_per_batch,
    neutral_prompts,
    parse_floats,
    write_table,
)
from steerlab.evaluation.judges import Judge
from steerlab.evaluation.sweep_report import recommend, write_sweep_report
from steerlab.formats import load_vector, save_vector

#: Makes a sweep's vector from its train split: (train, config, chat template or raw text).
Extractor = Callable[[Dataset, SweepConfig, bool], SteeringVector]


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


def vector_file(out_dir: Path, context: str) -> Path:
    """Where a sweep keeps the vector of an extraction context."""
    return out_dir / (
        "vector.safetensors" if context == "chat" else f"vector-{context}.safetensors"
    )


def run_sweep(
    engine: Engine | Callable[[], Engine],
    dataset: Dataset,
    config: SweepConfig,
    out_dir: Path,
    *,
    extractor: Extractor | None = None,
    judge: Judge | None = None,
    behaviour_label: str = "behaviour",
    fresh: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
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
    resumes, and a finished sweep rerun with another rule (``direction``, ``target``,
    ``perplexity_bound``) only rewrites the recommendation and the report.

    Args:
        engine: the engine that scores the cells, or a function that starts it; it is
            started only if some cell is left to score (after the vectors exist, so an
            engine with a fixed registry can load them from ``out_dir``).
        extractor: makes each context's vector from the train split when ``out_dir`` has
            none yet (:func:`steerlab.hf.extraction.sweep_extractor`).

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
            if extractor is None:
                raise SteerlabError(f"'{out_dir}' has no vector for context {context} to reuse")
            vectors[context] = extractor(train, config, context == "chat")
            save_vector(vectors[context], path)
    started: list[Engine] = []

    def lm() -> Engine:  # started at the first cell it scores
        if not started:
            started.append(engine() if callable(engine) else engine)
        return started[0]

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
                lm(), test if ab else None, prompts, group, vectors[context], config, judge
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


__all__ = [
    "DEFAULT_PROMPTS",
    "Extractor",
    "Results",
    "SweepConfig",
    "neutral_prompts",
    "parse_floats",
    "run_sweep",
    "split",
    "vector_file",
    "write_table",
]
