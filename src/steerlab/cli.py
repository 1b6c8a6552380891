"""The ``steerlab`` command: thin wrappers that parse, call one library function, and print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from steerlab.errors import SteerlabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Activation steering: extract vectors, steer generation with exact position policies, evaluate, serve.",
)
vector_app = typer.Typer(no_args_is_help=True, help="Inspect, convert and edit vector files.")
app.add_typer(vector_app, name="vector")
out = Console()
err = Console(stderr=True)

ModelOpt = typer.Option(
    "smollm2-135m", "--model", "-m", help="Alias, .gguf file, model directory or HF id."
)
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto (device_map=auto).")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16, float16 or auto.")
LayersPathOpt = typer.Option(
    None, "--layers-path", help="Dotted path of the decoder blocks, e.g. model.layers."
)


def _load(model: str, device: str | None, dtype: str | None, layers_path: str | None = None) -> Any:
    from steerlab.model import load_model

    with err.status(f"loading {model}"):
        return load_model(model, device=device, dtype=dtype, layers_path=layers_path)


@app.command()
def info(
    model: str = typer.Argument(
        "smollm2-135m", help="Alias, .gguf file, model directory or HF id."
    ),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Describe a model: architecture, layers, hidden size, dtype, device, files."""
    lm = _load(model, device, dtype, layers_path)
    data = vars(lm.info)
    if as_json:
        out.print_json(json.dumps(data))
        return
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in data.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command()
def extract(
    dataset: Path = typer.Argument(
        ..., help="JSONL, JSON or CSV dataset (or positive texts with --negatives)."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Where to write the .safetensors vector."
    ),
    model: str = ModelOpt,
    layers: str = typer.Option("all", "--layers", "-l", help="all, 6-18, 3,5,-1 ..."),
    method: str = typer.Option("mean-diff", "--method", help="mean-diff, pca-diff or logistic."),
    fmt: str | None = typer.Option(
        None, "--format", help="ab, yesno, pairs, unpaired or actadd (default: detect)."
    ),
    negatives: Path | None = typer.Option(
        None, "--negatives", help="Negative texts for an unpaired set."
    ),
    read_position: str = typer.Option(
        "auto", "--read-position", help="auto, answer, last or mean."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Sequences per forward pass."),
    system: str | None = typer.Option(
        None, "--system", help="System prompt for the chat template."
    ),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Render through the chat template."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Extract a steering vector from a contrastive dataset."""
    from steerlab.dataset import load_dataset
    from steerlab.extraction import extract as run

    if output.suffix.lower() != ".safetensors":
        raise SteerlabError(
            f"output '{output}' must end in .safetensors (GGUF: `steerlab vector export-gguf`)"
        )
    data = load_dataset(dataset, fmt, negatives)  # type: ignore[arg-type]
    for warning in data.warnings:
        _warn(warning)
    lm = _load(model, device, dtype, layers_path)
    vec = run(
        lm,
        data,
        layers,
        method=method,
        read_position=read_position,
        batch_size=batch_size,
        chat=chat,
        system=system,
        progress=sys.stderr.isatty(),
    )
    vec.save(output)
    out.print(
        f"wrote {output}: {len(vec.layers)} layers, {method}, read at {vec.read_position}, {len(data)} examples"
    )


@vector_app.command("show")
def vector_show(
    path: Path = typer.Argument(..., help="A .safetensors or .gguf vector."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print a vector's metadata and per-layer norms."""
    from steerlab.vector import SteeringVector

    vec = SteeringVector.load(path)
    meta = vec.metadata()
    meta["norms"] = {str(k): v for k, v in vec.norms().items()}
    if as_json:
        out.print_json(json.dumps(meta, sort_keys=True))
        return
    summary = Table(show_header=False, box=None)
    for key in (
        "model",
        "method",
        "read_position",
        "layer_convention",
        "dataset",
        "steerlab_version",
        "created",
        "shape",
        "notes",
    ):
        summary.add_row(
            key,
            json.dumps(meta[key], sort_keys=True)
            if isinstance(meta[key], (dict, list))
            else str(meta[key]),
        )
    out.print(summary)
    table = Table("layer", "norm", "residual norm", "ratio")
    for layer, norm in vec.norms().items():
        res = vec.residual_norms.get(layer)
        table.add_row(
            str(layer),
            f"{norm:.4g}",
            "-" if res is None else f"{res:.4g}",
            "-" if not res else f"{norm / res:.3f}",
        )
    out.print(table)


@vector_app.command("export-gguf")
def vector_export(
    path: Path = typer.Argument(..., help="A steerlab vector."),
    output: Path = typer.Option(..., "--output", "-o", help="The .gguf to write."),
) -> None:
    """Write a llama.cpp control vector (direction.N = output of block N)."""
    from steerlab.llamacpp import export_gguf
    from steerlab.vector import SteeringVector

    export_gguf(SteeringVector.load(path), output)
    out.print(f"wrote {output}")


@vector_app.command("import-gguf")
def vector_import(
    path: Path = typer.Argument(..., help="A llama.cpp or repeng control-vector .gguf."),
    output: Path = typer.Option(..., "--output", "-o", help="The .safetensors to write."),
) -> None:
    """Convert a llama.cpp/repeng control vector to a steerlab vector file."""
    from steerlab.llamacpp import import_gguf

    vec = import_gguf(path)
    vec.save(output)
    out.print(f"wrote {output}: layers {','.join(map(str, vec.layers))}")


@vector_app.command("select")
def vector_select(
    path: Path = typer.Argument(..., help="A vector file."),
    layers: str = typer.Option(..., "--layers", "-l", help="Layers to keep: 6-18, 3,5 ..."),
    output: Path = typer.Option(..., "--output", "-o", help="The .safetensors to write."),
    scale: float = typer.Option(1.0, "--scale", help="Multiply the kept directions by this."),
) -> None:
    """Keep some layers of a vector (and optionally scale it)."""
    from steerlab.layers import resolve_layers
    from steerlab.vector import SteeringVector

    vec = SteeringVector.load(path)
    chosen = resolve_layers(layers, vec.model.num_layers or max(vec.layers) + 1)
    vec.select(chosen).scale(scale).save(output)
    out.print(f"wrote {output}: layers {','.join(map(str, chosen))}")


def _steerings(
    vector: Path, layers: str | None, policy: str, scale: str, lm: Any, allow_mismatch: bool
) -> list[Any]:
    from steerlab.layers import resolve_layers
    from steerlab.model import ModelInfo
    from steerlab.steering import Steering
    from steerlab.vector import ModelIdentity, SteeringVector

    vec = SteeringVector.load(vector)
    info: ModelInfo = lm.info
    for warning in vec.check_model(
        ModelIdentity(
            info.name, info.architecture, info.hidden_size, info.num_layers, info.fingerprint
        ),
        allow_mismatch,
    ):
        _warn(warning)
    chosen = None if layers is None else tuple(resolve_layers(layers, info.num_layers))
    return [Steering(vec, 1.0, chosen, policy, scale)]  # type: ignore[arg-type]


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user prompt."),
    vector: Path = typer.Option(..., "--vector", "-v", help="A .safetensors or .gguf vector."),
    model: str = ModelOpt,
    layer: str | None = typer.Option(
        None, "--layer", "-l", help="Layers to steer (default: all of the vector's)."
    ),
    multiplier: list[float] = typer.Option(
        [4.0], "--multiplier", "-x", help="Repeat for several values."
    ),
    policy: str = typer.Option(
        "after-prompt",
        "--policy",
        "-p",
        help="all, after-prompt, from-marker:STR, prompt, actadd, transient.",
    ),
    scale: str = typer.Option(
        "absolute", "--scale", help="absolute, or relative to the stored residual norm."
    ),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Render through the chat template."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    allow_model_mismatch: bool = typer.Option(
        False,
        "--allow-model-mismatch",
        help="Apply a vector made on another model of the same shape.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Print the unsteered and steered completions of a prompt side by side."""
    from steerlab.generation import Sampling, generate_multipliers

    sampling = Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    lm = _load(model, device, dtype)
    steerings = _steerings(vector, layer, policy, scale, lm, allow_model_mismatch)
    if steerings[0].policy.kind == "from-marker":
        from steerlab.chat import render

        text = render(lm.tokenizer, prompt, system=system, chat=chat).text
        if str(steerings[0].policy.marker) not in text:
            raise SteerlabError(
                f"the from-marker string {steerings[0].policy.marker!r} does not occur in the "
                "rendered prompt: pick a marker it contains, or another policy"
            )
    results = generate_multipliers(
        lm, prompt, steerings, multiplier, sampling, chat=chat, system=system
    )
    if as_json:
        payload = {
            "prompt": prompt,
            "policy": str(steerings[0].policy),
            "layers": list(steerings[0].layers or ()),
            "scale": scale,
            "completions": [{"multiplier": m, "text": t} for m, t in results],
        }
        out.print_json(json.dumps(payload))
        return
    titles = ["unsteered" if m == 0 else f"steered x{m:g}" for m, _ in results]
    if out.width >= 40 * len(results):
        table = Table(*titles, show_lines=True)
        table.add_row(*[t for _, t in results])
        out.print(table)
    else:
        for title, (_, text) in zip(titles, results, strict=True):
            out.rule(title)
            out.print(text)


def _judge(
    judge: str, keywords: str | None, judge_url: str | None, judge_model: str, behaviour: str
) -> Any:
    from steerlab import judges

    if keywords:
        return judges.keywords(keywords.split(","))
    if judge == "sentiment":
        return judges.sentiment()
    if judge == "llm":
        if not judge_url:
            raise SteerlabError("--judge llm needs --judge-url, e.g. http://127.0.0.1:8000/v1")
        return judges.llm(judge_url, judge_model, behaviour)
    raise SteerlabError(f"unknown judge '{judge}': use sentiment, llm, or --keywords word1,word2")


def _print_rows(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    table = Table(*columns, title=title)
    for r in rows:
        table.add_row(
            *[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        )
    out.print(table)


@app.command()
def sweep(
    dataset: Path = typer.Argument(..., help="A/B, Yes/No, pairs or unpaired dataset."),
    model: str = ModelOpt,
    layers: str = typer.Option("6,9,12", "--layers", "-l", help="Layers to sweep: 6-18, 3,5 ..."),
    multipliers: str = typer.Option(
        "-8,-4,0,4,8", "--multipliers", help="Comma-separated multipliers."
    ),
    policy: str = typer.Option("after-prompt", "--policy", "-p"),
    method: str = typer.Option("mean-diff", "--method"),
    scale: str = typer.Option("absolute", "--scale", help="absolute or relative."),
    test_fraction: float = typer.Option(0.3, "--test-fraction"),
    seed: int = typer.Option(0, "--seed"),
    judge: str = typer.Option(
        "sentiment", "--judge", help="sentiment or llm (free-text datasets)."
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
    out_dir: Path = typer.Option(
        Path("steerlab-out/sweep"), "--out", "-o", help="Output directory (resumable)."
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Discard earlier results in --out."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Sweep layers x multipliers: results table, plots and a report with a recommendation."""
    from steerlab.dataset import load_dataset
    from steerlab.layers import resolve_layers
    from steerlab.sweep import SweepConfig, parse_floats, run_sweep

    data = load_dataset(dataset)
    lm = _load(model, device, dtype)
    config = SweepConfig(
        layers=tuple(resolve_layers(layers, lm.info.num_layers)),
        multipliers=parse_floats(multipliers),
        policy=policy,
        method=method,
        test_fraction=test_fraction,
        seed=seed,
        max_new_tokens=max_new_tokens,
        perplexity_bound=perplexity_bound,
        scale=scale,
        max_test_items=max_test_items,
    )
    scorer = (
        None
        if data.format in ("ab", "yesno")
        else _judge(judge, keywords, judge_url, judge_model, behaviour)
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
            f"layer {r['layer']:>3} x{r['multiplier']:<6g} behaviour {r['behaviour']:.3f} fluency {r['fluency']:.2f}"
        ),
        progress=sys.stderr.isatty(),
    )
    _print_rows(
        result["rows"], ["layer", "multiplier", "behaviour", "fluency", "kl", "distinct2"], "sweep"
    )
    best = result["recommendation"]
    if best:
        out.print(
            f"recommended: layer {best['layer']}, multiplier {best['multiplier']:g} (shift {best['shift']:+.3f})"
        )
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
    judge: str = typer.Option("sentiment", "--judge"),
    keywords: str | None = typer.Option(None, "--keywords"),
    judge_url: str | None = typer.Option(None, "--judge-url"),
    judge_model: str = typer.Option("judge", "--judge-model"),
    behaviour: str = typer.Option("the target behaviour", "--behaviour"),
    ab_dataset: Path | None = typer.Option(
        None, "--ab-dataset", help="Also score A/B behaviour probability on this set."
    ),
    actadd_rows: int = typer.Option(4, "--actadd-rows", help="Front positions steered by actadd."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    out_dir: Path = typer.Option(Path("steerlab-out/policies"), "--out", "-o"),
    allow_model_mismatch: bool = typer.Option(False, "--allow-model-mismatch"),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """One vector, layer and multiplier under after-prompt, transient, all, prompt and actadd."""
    from steerlab.dataset import load_dataset
    from steerlab.sweep import DEFAULT_PROMPTS, compare_policies

    lm = _load(model, device, dtype)
    steerings = _steerings(vector, str(layer), "after-prompt", "absolute", lm, allow_model_mismatch)
    texts = list(DEFAULT_PROMPTS)
    if prompts is not None:
        texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        if not texts:
            raise SteerlabError(f"'{prompts}' has no prompts: write one per line")
    ab = load_dataset(ab_dataset) if ab_dataset else None
    rows = compare_policies(
        lm,
        steerings[0].vector,
        layer,
        multiplier,
        texts,
        _judge(judge, keywords, judge_url, judge_model, behaviour),
        out_dir,
        actadd_rows=actadd_rows,
        max_new_tokens=max_new_tokens,
        ab_dataset=ab,
    )
    cols = ["policy", "behaviour", "kl", "perplexity", "distinct2"] + (["ab_score"] if ab else [])
    _print_rows(rows, cols, f"layer {layer}, multiplier {multiplier:g}")
    out.print(f"wrote {out_dir}/policies.md, policies.csv, policies.json, policies.png")


@app.command()
def demo(
    model: str = ModelOpt,
    out_dir: Path = typer.Option(Path("steerlab-out/demo"), "--out", "-o"),
    fresh: bool = typer.Option(False, "--fresh", help="Discard earlier results in --out."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """The main job: sentiment vector, sweep, side-by-side completions, policy comparison, report."""
    from steerlab.demo import run_demo

    lm = _load(model, device, dtype)
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
    _print_rows(
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
    _print_rows(
        result.policies,
        ["policy", "behaviour", "kl", "perplexity", "distinct2"],
        "policy comparison (same vector, layer, multiplier)",
    )
    out.print(f"report: {result.report}")


@app.command()
def serve(
    vectors: Path = typer.Option(
        ..., "--vectors", help="Directory of .safetensors/.gguf vectors (name = file stem)."
    ),
    model: str = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port"),
    max_tokens: int = typer.Option(
        512, "--max-tokens", help="Largest max_tokens a request may ask for."
    ),
    max_batch: int = typer.Option(8, "--max-batch", help="Rows per batch."),
    allow_model_mismatch: bool = typer.Option(False, "--allow-model-mismatch"),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Serve an OpenAI-compatible API with per-request steering, and a playground at /."""
    from steerlab.server import Limits, load_vectors
    from steerlab.server import serve as run

    lm = _load(model, device, dtype)
    registry = load_vectors(vectors, lm, allow_model_mismatch)
    err.print(
        f"{len(registry)} vectors: {', '.join(sorted(registry)) or 'none'}; playground at http://{host}:{port}/"
    )
    run(lm, registry, host, port, Limits(max_tokens=max_tokens, max_batch=max_batch))


def _fail(message: str) -> None:
    """Print ``error: message`` unwrapped (no markup, no traceback) and exit 2."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def main() -> None:
    """Entry point: one-line errors with exit status 2, never a traceback for bad input."""
    command = typer.main.get_command(app)
    try:
        result = command.main(standalone_mode=False)
    except SteerlabError as exc:
        _fail(str(exc))
    except (KeyboardInterrupt, EOFError):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        _fail(f"{exc.strerror}: '{exc.filename}': check the path")
    except Exception as exc:
        # Click's own exceptions (typer may vendor click, so match by shape, not class).
        name = type(exc).__name__
        if name == "Exit":
            sys.exit(int(getattr(exc, "exit_code", 0)))
        if name == "Abort":
            sys.stderr.write("interrupted\n")
            sys.exit(130)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(int(exc.exit_code))
        raise
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
