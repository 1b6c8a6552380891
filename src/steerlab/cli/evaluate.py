"""Commands that measure: sweep, compare-policies and the demo."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import typer
from rich.table import Table

from steerlab.cli.common import (
    AllowMismatchOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    app,
    err,
    judge_of,
    load,
    out,
    print_rows,
    steerings_of,
)
from steerlab.core.errors import SteerlabError


@app.command()
def sweep(
    dataset: Path = typer.Argument(..., help="A/B, Yes/No, pairs or unpaired dataset."),
    model: str = ModelOpt,
    layers: str = typer.Option("6,9,12", "--layers", "-l", help="Layers to sweep: 6-18, 3,5 ..."),
    multipliers: str = typer.Option(
        "-8,-4,0,4,8", "--multipliers", help="Comma-separated multipliers."
    ),
    policy: list[str] | None = typer.Option(
        None, "--policy", "-p", help="A policy (repeat for several); default after-prompt."
    ),
    policies: str | None = typer.Option(
        None, "--policies", help="Policies as an axis, comma-separated: after-prompt,all,prompt."
    ),
    contexts: str = typer.Option(
        "chat", "--contexts", help="Extraction contexts as an axis: chat, raw or chat,raw."
    ),
    direction: str = typer.Option(
        "increase", "--direction", help="increase or decrease: what the recommendation seeks."
    ),
    target: float | None = typer.Option(
        None, "--target", help="Recommend the cell whose behaviour is closest to this value."
    ),
    prompts_file: Path | None = typer.Option(
        None, "--prompts", help="Prompts for free-text sweeps, one per line (default: 32 shipped)."
    ),
    samples: int = typer.Option(
        1, "--samples", help="Completions per prompt (1: greedy; more: sampled at --temperature)."
    ),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature."),
    method: str = typer.Option("mean-diff", "--method"),
    scale: str = typer.Option("absolute", "--scale", help="absolute or relative."),
    test_fraction: float = typer.Option(0.3, "--test-fraction"),
    seed: int = typer.Option(0, "--seed"),
    judge: str = typer.Option(
        "sentiment",
        "--judge",
        help="sentiment (VADER), casual (register lexicon), llm (a 0-10 rubric) or axbench "
        "(concept, relevance and fluency 0-2, harmonic mean) for free-text datasets; llm and "
        "axbench need --judge-url.",
    ),
    keywords: str | None = typer.Option(
        None, "--keywords", help="Keyword judge: comma-separated words."
    ),
    judge_url: str | None = typer.Option(
        None, "--judge-url", help="OpenAI-compatible base URL for --judge llm."
    ),
    judge_model: str = typer.Option("judge", "--judge-model"),
    behaviour: str = typer.Option(
        "the target behaviour", "--behaviour", help="What the LLM judge rates."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    perplexity_bound: float = typer.Option(
        2.0, "--perplexity-bound", help="Recommendation keeps fluency <= this x unsteered."
    ),
    max_test_items: int = typer.Option(200, "--max-test-items", help="A/B items scored per cell."),
    batch_rows: int = typer.Option(
        192, "--batch-rows", help="Most rows per padded batch of cells (memory, not results)."
    ),
    out_dir: Path = typer.Option(
        Path("steerlab-out/sweep"), "--out", "-o", help="Output directory (resumable)."
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Discard earlier results in --out."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Sweep layers x multipliers: results table, plots and a report with a recommendation."""
    from steerlab.core.dataset import load_dataset
    from steerlab.evaluation.sweep import SweepConfig, parse_floats, run_sweep
    from steerlab.hf.layers import resolve_layers

    chosen = list(policy or []) + [p for p in (policies or "").split(",") if p.strip()]
    prompts: tuple[str, ...] = ()
    if prompts_file is not None:
        prompts = tuple(
            line.strip() for line in prompts_file.read_text().splitlines() if line.strip()
        )
        if not prompts:
            raise SteerlabError(f"{prompts_file} holds no prompts: write one per line")
    data = load_dataset(dataset)
    config = SweepConfig(
        layers=(0,),  # validated now, before the model loads; the real layers below
        multipliers=parse_floats(multipliers),
        policies=tuple(p.strip() for p in chosen) or ("after-prompt",),
        contexts=tuple(c.strip() for c in contexts.split(",") if c.strip()),
        direction=direction,
        target=target,
        prompts=prompts,
        samples=samples,
        temperature=temperature,
        method=method,
        test_fraction=test_fraction,
        seed=seed,
        max_new_tokens=max_new_tokens,
        perplexity_bound=perplexity_bound,
        scale=scale,
        max_test_items=max_test_items,
        batch_rows=batch_rows,
    )
    lm = load(model, device, dtype)
    config = dataclasses.replace(config, layers=tuple(resolve_layers(layers, lm.info.num_layers)))
    scorer = (
        None
        if data.format in ("ab", "yesno")
        else judge_of(judge, keywords, judge_url, judge_model, behaviour)
    )
    label = (
        "p(matching answer)"
        if data.format in ("ab", "yesno")
        else ("keyword rate" if keywords else judge)
    )
    result = run_sweep(
        lm,
        data,
        config,
        out_dir,
        judge=scorer,
        behaviour_label=label,
        fresh=fresh,
        on_row=lambda r: err.print(
            f"{r['context']} {r['policy']} layer {r['layer']:>3} x{r['multiplier']:<6g} "
            f"behaviour {r['behaviour']:.3f} fluency {r['fluency']:.2f}"
        ),
        progress=sys.stderr.isatty(),
    )
    print_rows(
        result["rows"],
        ["context", "policy", "layer", "multiplier", "behaviour", "shift", "fluency", "kl"],
        "sweep",
    )
    best = result["recommendation"]
    if best:
        interval = (
            f" [{best['shift_lo']:+.3f}, {best['shift_hi']:+.3f}] on the report half"
            if "shift_lo" in best
            else ""
        )
        out.print(
            f"recommended: layer {best['layer']}, multiplier {best['multiplier']:g}, policy "
            f"{best['policy']}, context {best['context']} (shift {best['shift']:+.3f}{interval})"
        )
    else:
        out.print("no cell meets the rule (see report.md)")
    out.print(f"wrote {out_dir}/report.md, results.csv, results.json and plots")


@app.command("compare-policies")
def compare_policies_cmd(
    vector: Path = typer.Option(..., "--vector", "-v", help="A vector file."),
    layer: int = typer.Option(..., "--layer", "-l"),
    multiplier: float = typer.Option(4.0, "--multiplier", "-x"),
    model: str = ModelOpt,
    prompts: Path | None = typer.Option(
        None, "--prompts", help="Text file, one prompt per line (default: built-in)."
    ),
    judge: str = typer.Option(
        "sentiment", "--judge", help="sentiment, casual, llm or axbench (see sweep --help)."
    ),
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
    policies: str = typer.Option(
        "after-prompt,transient,all", "--policies", help="--frontier: policies, comma-separated."
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
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """One vector, layer and multiplier under after-prompt, transient, all, prompt and actadd;
    with --frontier, every policy's multiplier swept and its cost read at equal shift."""
    from steerlab.core.dataset import load_dataset
    from steerlab.core.files import read_prompts
    from steerlab.evaluation.policies import compare_policies
    from steerlab.evaluation.sweep import DEFAULT_PROMPTS, neutral_prompts, parse_floats

    if frontier:
        from steerlab.evaluation.frontier import FrontierConfig

        if ab_dataset is not None:
            raise SteerlabError("--ab-dataset is not part of --frontier (free-text judges only)")
        config = FrontierConfig(
            layer=layer,
            multipliers=parse_floats(multipliers),
            policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
            direction=direction,
            shift=shift,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
    default = neutral_prompts() if frontier else DEFAULT_PROMPTS
    texts = list(default) if prompts is None else read_prompts(prompts)
    ab = load_dataset(ab_dataset) if ab_dataset else None  # bad input fails before the model
    scorer = judge_of(judge, keywords, judge_url, judge_model, behaviour)
    lm = load(model, device, dtype)
    steerings = steerings_of(
        vector, str(layer), "after-prompt", "absolute", lm, allow_model_mismatch
    )
    if frontier:
        from steerlab.evaluation.frontier import run_frontier

        label = "keyword rate" if keywords else judge
        result = run_frontier(
            lm, steerings[0].vector, texts, scorer, config, out_dir, behaviour_label=label,
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
        steerings[0].vector,
        layer,
        multiplier,
        texts,
        scorer,
        out_dir,
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


@app.command()
def demo(
    model: str = ModelOpt,
    out_dir: Path = typer.Option(Path("steerlab-out/demo"), "--out", "-o"),
    fresh: bool = typer.Option(False, "--fresh", help="Discard earlier results in --out."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """The main job: sentiment vector, sweep, side-by-side completions, policy comparison, report."""
    from steerlab.evaluation.demo import run_demo

    lm = load(model, device, dtype)
    out.rule(f"steerlab demo on {lm.info.name}")
    err.print(
        "sweeping layers x multipliers (VADER sentiment of completions; fluency = perplexity under the unsteered model)"
    )
    result = run_demo(
        lm,
        out_dir,
        fresh=fresh,
        on_row=lambda r: err.print(
            f"  layer {r['layer']:>3} x{r['multiplier']:<5g} sentiment {r['behaviour']:+.3f}  perplexity {r['fluency']:.2f}"
        ),
    )
    print_rows(
        result.sweep["rows"],
        ["layer", "multiplier", "behaviour", "fluency", "kl", "distinct2"],
        "sweep (behaviour = VADER sentiment)",
    )
    out.print(
        f"\nsteering layer {result.layer} with multiplier +/-{result.multiplier:g}, policy after-prompt\n"
    )
    for prompt, outs in result.side_by_side:
        table = Table(
            *["unsteered" if m == 0 else ("positive" if m > 0 else "negative") for m, _ in outs],
            title=prompt,
            show_lines=True,
        )
        table.add_row(*[t.strip() for _, t in outs])
        out.print(table)
    print_rows(
        result.policies,
        ["policy", "behaviour", "kl", "perplexity", "distinct2"],
        "policy comparison (same vector, layer, multiplier)",
    )
    out.print(f"report: {result.report}")
