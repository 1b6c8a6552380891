"""``steerlab compare-policies``: one vector under several policies, or at equal behaviour
shift (``--frontier``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from steerlab.cli.common import (
    AllowMismatchOpt,
    DeviceOpt,
    DtypeOpt,
    EagerOpt,
    EngineOpt,
    ModelOpt,
    app,
    engine_loader,
    err,
    judge_of,
    linked_folder,
    out,
    print_rows,
)
from steerlab.core.errors import SteerlabError
from steerlab.evaluation.judges import judge_help


@app.command("compare-policies")
def compare_policies_cmd(
    vector: Path = typer.Option(..., "--vector", "-v", help="A vector file."),
    layer: int = typer.Option(..., "--layer", "-l"),
    multiplier: float = typer.Option(4.0, "--multiplier", "-x"),
    model: str = ModelOpt,
    prompts: Path | None = typer.Option(
        None, "--prompts", help="Text file, one prompt per line (default: built-in)."
    ),
    judge: str = typer.Option("sentiment", "--judge", help=judge_help()),
    keywords: str | None = typer.Option(None, "--keywords", help="Keyword judge: word1,word2."),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str = typer.Option("judge", "--judge-model"),
    behaviour: str = typer.Option("the target behaviour", "--behaviour"),
    ab_dataset: Path | None = typer.Option(
        None, "--ab-dataset", help="Also score A/B behaviour probability on this set."
    ),
    actadd_rows: int = typer.Option(4, "--actadd-rows", help="Front positions steered by actadd."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    frontier: bool = typer.Option(
        False,
        "--frontier",
        help="Compare at equal behaviour shift: sweep each policy's --multipliers and read "
        "its side effects (KL, perplexity, distinct-2) at one shift, with 95% intervals.",
    ),
    multipliers: str = typer.Option(
        "1,2,3,4,6,8", "--multipliers", help="--frontier: multipliers of one sign, comma-separated."
    ),
    policies: str | None = typer.Option(
        None,
        "--policies",
        help="Policies, comma-separated (default: after-prompt,transient,all with --frontier, "
        "else after-prompt,transient,all,prompt,actadd; without those the engine lacks).",
    ),
    direction: str = typer.Option(
        "increase", "--direction", help="--frontier: increase or decrease (the shift sought)."
    ),
    shift: float | None = typer.Option(
        None,
        "--shift",
        help="--frontier: the shift to read costs at (default: half the smallest largest "
        "shift of any policy).",
    ),
    seed: int = typer.Option(0, "--seed", help="--frontier: bootstrap seed."),
    out_dir: Path = typer.Option(Path("steerlab-out/policies"), "--out", "-o"),
    allow_model_mismatch: bool = AllowMismatchOpt,
    engine: str = EngineOpt,
    enforce_eager: bool = EagerOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """One vector, layer and multiplier under after-prompt, transient, all, prompt and actadd;
    with --frontier, every policy's multiplier swept and its cost read at equal shift."""
    from steerlab.core.dataset import load_dataset
    from steerlab.core.files import read_prompts
    from steerlab.core.policy import Policy
    from steerlab.engines import engine_entry, require
    from steerlab.evaluation.frontier import FRONTIER_POLICIES
    from steerlab.evaluation.policies import COMPARED_POLICIES, compare_policies
    from steerlab.evaluation.sweep import DEFAULT_PROMPTS, neutral_prompts, parse_floats
    from steerlab.formats import load_vector

    caps = engine_entry(engine).capabilities
    require(engine, "kl", "compare-policies")
    if policies is None:
        compared: tuple[str, ...] = FRONTIER_POLICIES if frontier else COMPARED_POLICIES
        # an engine with a fixed registry cannot steer the tiled ActAdd copy of the vector
        chosen = [
            p for p in compared
            if (caps.transient or Policy.parse(p).persisting) and (engine == "hf" or p != "actadd")
        ]  # fmt: skip
    else:
        chosen = [p.strip() for p in policies.split(",") if p.strip()]
    for p in chosen:
        if not Policy.parse(p).persisting:
            require(engine, "transient", "the transient policy")
    if frontier:
        from steerlab.evaluation.frontier import FrontierConfig

        if ab_dataset is not None:
            raise SteerlabError("--ab-dataset is not part of --frontier (free-text judges only)")
        config = FrontierConfig(
            layer=layer,
            multipliers=parse_floats(multipliers),
            policies=tuple(chosen),
            direction=direction,
            shift=shift,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
    default = neutral_prompts() if frontier else DEFAULT_PROMPTS
    texts = list(default) if prompts is None else read_prompts(prompts)
    ab = load_dataset(ab_dataset) if ab_dataset else None  # bad input fails before the model
    scorer = judge_of(judge, keywords, judge_url, judge_model, behaviour)
    vec = load_vector(vector)
    folder = None if engine == "hf" else linked_folder(vector)
    start = engine_loader(
        engine, model, device, dtype, vectors=folder, eager=enforce_eager,
        allow_mismatch=allow_model_mismatch,
    )  # fmt: skip
    lm = start()
    for warning in vec.check_model(lm.identity, allow_model_mismatch):
        err.print(f"warning: {warning}")
    if layer not in vec.directions:
        raise SteerlabError(
            f"the vector has no layer {layer}: it has layers {','.join(map(str, vec.layers))}"
        )
    if frontier:
        from steerlab.evaluation.frontier import run_frontier

        label = "keyword rate" if keywords else judge
        result = run_frontier(
            lm, vec, texts, scorer, config, out_dir, behaviour_label=label,
            on_batch=lambda done, total: err.print(f"  cells {done}/{total} scored"),
        )  # fmt: skip
        show_frontier(result)
        out.print(
            f"wrote {out_dir}/frontier.md, frontier.csv, frontier.json, "
            "frontier-readings.json, frontier.png"
        )
        return
    rows = compare_policies(
        lm,
        vec,
        layer,
        multiplier,
        texts,
        scorer,
        out_dir,
        policies=chosen,
        actadd_rows=actadd_rows,
        max_new_tokens=max_new_tokens,
        ab_dataset=ab,
    )
    cols = ["policy", "behaviour", "kl", "perplexity", "distinct2"] + (["ab_score"] if ab else [])
    print_rows(rows, cols, f"layer {layer}, multiplier {multiplier:g}")
    out.print(f"wrote {out_dir}/policies.md, policies.csv, policies.json, policies.png")


def show_frontier(result: dict[str, object]) -> None:
    """The frontier's cells and its readings at equal shift, as tables."""
    from steerlab.evaluation.frontier_report import ci_text

    cells = result["cells"]
    assert isinstance(cells, list)
    table = Table("policy", "multiplier", "shift", "KL/token", "perplexity", "distinct-2")
    for c in cells:
        table.add_row(
            c["policy"],
            f"{c['multiplier']:g}",
            *(
                ci_text([c[k], c[f"{k}_lo"], c[f"{k}_hi"]])
                for k in ("shift", "kl", "perplexity", "distinct2")
            ),
        )
    out.print(table)
    readings = result["readings"]
    assert isinstance(readings, list)
    if not readings:
        out.print("some policy never shifts the behaviour: no equal shift to read costs at")
        return
    shift = result["shift"]
    assert isinstance(shift, float)
    at = Table(
        "policy",
        "multiplier needed",
        "KL/token",
        "perplexity",
        "distinct-2",
        title=f"at shift {shift:.3f}",
    )
    for r in readings:
        at.add_row(
            r["policy"],
            ci_text(r["multiplier"], 2),
            *(ci_text(r[k]) for k in ("kl", "perplexity", "distinct2")),
        )
    out.print(at)
