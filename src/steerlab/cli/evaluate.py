"""Commands that measure: sweep and the demo (compare-policies: cli/policies.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import typer
from rich.table import Table

from steerlab.cli.common import (
    MAX_ROWS_AT_ONCE,
    DeviceOpt,
    DtypeOpt,
    EagerOpt,
    EngineOpt,
    ModelOpt,
    app,
    engine_loader,
    err,
    judge_of,
    load,
    model_layers,
    out,
    print_rows,
)
from steerlab.core.errors import SteerlabError
from steerlab.evaluation.judges import judge_help


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
    judge: str = typer.Option("sentiment", "--judge", help=judge_help()),
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
        192,
        "--batch-rows",
        help="Most rows per padded batch of cells, and rows vLLM runs at once (at most "
        f"{MAX_ROWS_AT_ONCE}; memory and speed, not results).",
    ),
    out_dir: Path = typer.Option(
        Path("steerlab-out/sweep"), "--out", "-o", help="Output directory (resumable)."
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Discard earlier results in --out."),
    engine: str = EngineOpt,
    enforce_eager: bool = EagerOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Sweep layers x multipliers: results table, plots and a report with a recommendation.

    Rerun with the same --out and another --direction, --target or --perplexity-bound, a
    finished sweep only rewrites its recommendation and report (no model work). With
    --engine vllm the vector is extracted on the Hugging Face engine, then the cells run on
    vLLM in groups of up to --batch-rows rows, each one continuous batch (greedy
    completions; KL from an unsteered twin per row).
    """
    from steerlab.core.dataset import load_dataset
    from steerlab.core.policy import Policy
    from steerlab.engines import engine_entry, require
    from steerlab.evaluation.sweep import SweepConfig, parse_floats, run_sweep
    from steerlab.hf.layers import resolve_layers
    from steerlab.hf.methods import sweep_extractor

    engine_entry(engine)  # an unknown engine fails first
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
    for p in config.policies:
        if not Policy.parse(p).persisting:
            require(engine, "transient", "--policies transient")
    ab = data.format in ("ab", "yesno")
    if not ab:
        require(engine, "kl", "a free-text sweep")
        if engine != "hf" and samples > 1:
            raise SteerlabError(
                "--samples above 1 samples completions, and the vLLM engine measures KL on "
                "greedy rows only: use --engine hf, or --samples 1"
            )
    config = dataclasses.replace(config, layers=tuple(resolve_layers(layers, model_layers(model))))
    hf = engine_loader("hf", model, device, dtype)

    def extractor(train, cfg, chat):  # type: ignore[no-untyped-def]
        return sweep_extractor(hf(), sys.stderr.isatty())(train, cfg, chat)

    scoring = (
        hf
        if engine == "hf"
        else engine_loader(
            engine, model, device, dtype, vectors=out_dir, eager=enforce_eager, rows=batch_rows
        )
    )
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
        scoring,
        data,
        config,
        out_dir,
        extractor=extractor,
        judge=scorer,
        behaviour_label=label,
        fresh=fresh,
        on_row=lambda r: err.print(
            f"{r['context']} {r['policy']} layer {r['layer']:>3} x{r['multiplier']:<6g} "
            f"behaviour {r['behaviour']:.3f} fluency {r['fluency']:.2f}"
        ),
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


@app.command()
def demo(
    model: str = ModelOpt,
    out_dir: Path = typer.Option(Path("steerlab-out/demo"), "--out", "-o"),
    fresh: bool = typer.Option(False, "--fresh", help="Discard earlier results in --out."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """The main job: sentiment vector, sweep, side-by-side completions, policy comparison, report."""
    from steerlab.cli.demo import run_demo

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
