"""Commands that show what a vector does: inspect."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from steerlab.cli.common import (
    AllowMismatchOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    app,
    err,
    load,
    out,
    warn,
)
from steerlab.core.errors import SteerlabError
from steerlab.formats.atomic import atomic_write_bytes, check_output


@app.command()
def inspect(
    text: str = typer.Argument(..., help="The text whose tokens to project onto the vector."),
    vector: Path = typer.Option(..., "--vector", "-v", help="A .safetensors or .gguf vector."),
    layer: int | None = typer.Option(
        None, "--layer", "-l", help="The vector's layer to project at (default: its middle one)."
    ),
    model: str = ModelOpt,
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Also write a standalone HTML page here."
    ),
    contrast: Path | None = typer.Option(
        None,
        "--contrast",
        help="A dataset (any extract format, best held out): score every example and report "
        "the AUC of positive vs negative projections, with a histogram.",
    ),
    histogram: Path | None = typer.Option(
        None,
        "--histogram",
        help="Where the contrast histogram PNG goes (default: beside --output, else contrast.png).",
    ),
    chat: bool = typer.Option(
        False, "--chat/--no-chat", help="Render TEXT as a user turn of the chat template."
    ),
    allow_model_mismatch: bool = AllowMismatchOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Colour each token of TEXT by its activation's projection onto a vector (terminal and
    HTML); with --contrast, how well the projection separates a dataset (AUC)."""
    from steerlab.core.dataset import load_dataset
    from steerlab.evaluation import pages
    from steerlab.formats import load_vector
    from steerlab.hf import projection

    if output is not None:
        check_output(output)
    if histogram is not None and contrast is None:
        raise SteerlabError("--histogram needs --contrast FILE (the dataset to score)")
    if contrast is not None and histogram is None:
        histogram = output.with_suffix(".contrast.png") if output else Path("contrast.png")
    if histogram is not None:
        check_output(histogram)
    vec = load_vector(vector)
    chosen = vec.layers[len(vec.layers) // 2] if layer is None else layer
    projection.check_layer(vec, chosen)
    data = None if contrast is None else load_dataset(contrast)
    lm = load(model, device, dtype)
    for warning in vec.check_model(lm.identity, allow_model_mismatch):
        warn(warning)
    view = projection.token_projections(lm, text, vec, chosen, chat=chat, name=vector.stem)
    result = None
    png = None
    if data is not None and contrast is not None and histogram is not None:
        with err.status(f"scoring {len(data)} examples"):
            result = projection.contrast(lm, data, vec, chosen)
        from steerlab.evaluation.plots import contrast_histogram

        png = contrast_histogram(
            result.positive,
            result.negative,
            f"{vector.stem} at layer {chosen} on {contrast.name}: AUC {result.auc:.3f}",
        )
        atomic_write_bytes(histogram, png)
    if output is not None:
        atomic_write_bytes(output, pages.html_page(view, result, png).encode())
    if as_json:
        payload: dict[str, object] = {
            "layer": chosen,
            "scale": view.scale,
            "tokens": [
                {"text": p, "value": v} for p, v in zip(view.pieces, view.values, strict=True)
            ],
        }
        if result is not None:
            payload["contrast"] = {
                "auc": result.auc,
                "positive": list(result.positive),
                "negative": list(result.negative),
                "read_position": result.read_position,
                "histogram": str(histogram),
            }
        out.print_json(json.dumps(payload))
        return
    out.print(pages.terminal_text(view))
    if result is not None:
        out.print(pages.contrast_line(result), markup=False, highlight=False)
        out.print(f"histogram: {histogram}", markup=False, highlight=False)
    if output is not None:
        out.print(f"page: {output}", markup=False, highlight=False)
