"""Commands that make and edit vectors: info, extract, vector show/export/import/select."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from steerlab.cli.common import (
    DeviceOpt,
    DtypeOpt,
    LayersPathOpt,
    ModelOpt,
    app,
    load,
    out,
    vector_app,
    warn,
)
from steerlab.core.errors import SteerlabError
from steerlab.core.methods import method_entry, method_help
from steerlab.formats.atomic import atomic_write_bytes, check_output


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
    lm = load(model, device, dtype, layers_path)
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
    method: str = typer.Option("mean-diff", "--method", help=method_help()),
    fmt: str | None = typer.Option(
        None, "--format", help="ab, yesno, pairs, unpaired or actadd (default: detect)."
    ),
    negatives: Path | None = typer.Option(
        None, "--negatives", help="Negative texts for an unpaired set."
    ),
    read_position: str = typer.Option(
        "auto", "--read-position", help="auto, answer, last or mean."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Sequences per forward pass (32); bipo: pairs per step (8)."
    ),
    steps: int = typer.Option(100, "--steps", help="bipo: optimiser steps."),
    lr: float = typer.Option(0.02, "--lr", help="bipo: AdamW learning rate."),
    beta: float = typer.Option(0.5, "--beta", help="bipo: preference temperature."),
    seed: int = typer.Option(0, "--seed", help="bipo: seed (batches and directions)."),
    system: str | None = typer.Option(
        None, "--system", help="System prompt for the chat template."
    ),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Render through the chat template."),
    site: str = typer.Option(
        "block",
        "--site",
        help="Read the block output (block), or what its attention (attn) or MLP (mlp) adds.",
    ),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Extract a steering vector from a contrastive dataset."""
    from steerlab.core.dataset import load_dataset
    from steerlab.core.vector import SITES
    from steerlab.formats import save_vector
    from steerlab.hf.extraction import extract as run

    if output.suffix.lower() != ".safetensors":
        raise SteerlabError(
            f"output '{output}' must end in .safetensors (GGUF: `steerlab vector export-gguf`)"
        )
    check_output(output)  # before any model work
    if site not in SITES:
        raise SteerlabError(f"unknown site {site!r}: use {', '.join(SITES)}")
    trained = method_entry(method).trained  # an unknown method fails here, before the model
    if trained:  # bipo, the one trained method; its settings are checked now
        from steerlab.hf.bipo import BipoConfig

        config = BipoConfig(steps, lr, batch_size or 8, beta, seed=seed)  # bad settings: now
        if site != "block":
            raise SteerlabError("--method bipo trains a block-output vector: drop --site")
    data = load_dataset(dataset, fmt, negatives)  # type: ignore[arg-type]
    for warning in data.warnings:
        warn(warning)
    if trained:
        _bipo(data, output, model, layers, config, chat, system, device, dtype, layers_path)
        return
    lm = load(model, device, dtype, layers_path)
    vec = run(
        lm,
        data,
        layers,
        method=method,
        read_position=read_position,
        batch_size=batch_size or 32,
        chat=chat,
        system=system,
        progress=sys.stderr.isatty(),
        site=site,
    )
    save_vector(vec, output)
    where = "" if site == "block" else f" ({site} output)"
    out.print(
        f"wrote {output}: {len(vec.layers)} layers{where}, {method}, read at "
        f"{vec.read_position}, {len(data)} examples"
    )


def _bipo(
    data: Any,
    output: Path,
    model: str,
    layers: str,
    config: Any,
    chat: bool,
    system: str | None,
    device: str | None,
    dtype: str | None,
    layers_path: str | None,
) -> None:
    """``extract --method bipo``: train, then write the vector and its training curve."""
    from steerlab.formats import save_vector
    from steerlab.hf.bipo import train_bipo
    from steerlab.hf.layers import resolve_layers

    if data.format in ("unpaired", "actadd") or len(data) < 2:
        raise SteerlabError(
            f"--method bipo trains on at least 2 pairs; {data.info.path} is a {data.format} "
            f"set of {len(data)}"
        )
    lm = load(model, device, dtype, layers_path)
    chosen = resolve_layers(layers, lm.info.num_layers)
    if len(chosen) != 1:
        raise SteerlabError("--method bipo trains one layer: pass --layers L, e.g. --layers 9")
    result = train_bipo(
        lm, data, chosen[0], config, chat=chat, system=system, progress=sys.stderr.isatty()
    )
    save_vector(result.vector, output)
    curve = output.with_suffix(".bipo.json")
    record = {"loss": list(result.losses), **dict(result.vector.notes)}
    atomic_write_bytes(curve, (json.dumps(record, indent=1) + "\n").encode())
    written = [str(curve)]
    from steerlab.evaluation.plots import training_curve

    try:
        png = output.with_suffix(".bipo.png")
        atomic_write_bytes(png, training_curve(result.losses, f"BiPO, layer {chosen[0]}"))
        written.append(str(png))
    except SteerlabError:  # matplotlib is an extra
        pass
    norm = float(result.vector.directions[chosen[0]].norm())
    out.print(
        f"wrote {output}: bipo, layer {chosen[0]}, {config.steps} steps, final loss "
        f"{result.losses[-1]:.4f}, |v| = {norm:.3g}; curve: {', '.join(written)}"
    )


@vector_app.command("show")
def vector_show(
    path: Path = typer.Argument(..., help="A .safetensors or .gguf vector."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print a vector's metadata and per-layer norms."""
    from steerlab.formats import load_vector

    vec = load_vector(path)
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
    from steerlab.formats import load_vector
    from steerlab.formats.gguf import export_gguf

    check_output(output)
    export_gguf(load_vector(path), output)
    out.print(f"wrote {output}")


@vector_app.command("import-gguf")
def vector_import(
    path: Path = typer.Argument(..., help="A llama.cpp or repeng control-vector .gguf."),
    output: Path = typer.Option(..., "--output", "-o", help="The .safetensors to write."),
) -> None:
    """Convert a llama.cpp/repeng control vector to a steerlab vector file."""
    from steerlab.formats import save_vector
    from steerlab.formats.gguf import import_gguf

    check_output(output)
    vec = import_gguf(path)
    save_vector(vec, output)
    out.print(f"wrote {output}: layers {','.join(map(str, vec.layers))}")


@vector_app.command("select")
def vector_select(
    path: Path = typer.Argument(..., help="A vector file."),
    layers: str = typer.Option(..., "--layers", "-l", help="Layers to keep: 6-18, 3,5 ..."),
    output: Path = typer.Option(..., "--output", "-o", help="The .safetensors to write."),
    scale: float = typer.Option(1.0, "--scale", help="Multiply the kept directions by this."),
) -> None:
    """Keep some layers of a vector (and optionally scale it)."""
    from steerlab.formats import load_vector, save_vector
    from steerlab.hf.layers import resolve_layers

    check_output(output)
    vec = load_vector(path)
    chosen = resolve_layers(layers, vec.model.num_layers or max(vec.layers) + 1)
    save_vector(vec.select(chosen).scale(scale), output)
    out.print(f"wrote {output}: layers {','.join(map(str, chosen))}")
