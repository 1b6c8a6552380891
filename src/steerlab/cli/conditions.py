"""``steerlab condition fit``: the threshold for conditional steering (CAST)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from steerlab.cli.common import (
    AllowMismatchOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    ModelOpt,
    app,
    load,
    out,
    warn,
)
from steerlab.core.errors import SteerlabError
from steerlab.formats.atomic import atomic_write_bytes, check_output

condition_app = typer.Typer(
    no_args_is_help=True, help="Conditional steering: fit a condition's threshold."
)
app.add_typer(condition_app, name="condition")


@condition_app.command("fit")
def fit(
    dataset: Path = typer.Argument(
        ...,
        help="Labelled prompts: an unpaired set (text, label), or pairs whose positive and "
        "negative texts are scored as prompts.",
    ),
    vector: Path = typer.Option(..., "--vector", "-v", help="The condition vector."),
    layer: int = typer.Option(
        ..., "--layer", "-l", help="The layer whose prompt activations decide."
    ),
    model: str = ModelOpt,
    reduce: str = typer.Option("mean", "--reduce", help="mean over the prompt, or last token."),
    when: str = typer.Option(
        "positive",
        "--when",
        help="Which examples the condition should hold for (steer): positive or negative.",
    ),
    chat: bool = typer.Option(
        True, "--chat/--no-chat", help="Render each prompt through the chat template."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the condition here (JSON, for generate --condition)."
    ),
    allow_model_mismatch: bool = AllowMismatchOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    engine: str = EngineOpt,
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Find the threshold on the projection onto VECTOR at LAYER that best separates the
    dataset's positive prompts (steer) from its negative ones (don't), and its accuracy."""
    from steerlab.core.condition import Condition
    from steerlab.core.dataset import load_dataset
    from steerlab.engines import require
    from steerlab.formats import load_vector
    from steerlab.hf.condition_fit import fit_condition

    require(engine, "activations", "condition fit")  # it reads the prompts' activations
    if output is not None:
        check_output(output)
    if reduce not in ("mean", "last"):
        raise SteerlabError(f"--reduce {reduce!r}: use mean or last")
    if when not in ("positive", "negative"):
        raise SteerlabError(f"--when {when!r}: use positive or negative")
    vec = load_vector(vector)
    Condition(vec, layer, 0.0, reduce=reduce)  # type: ignore[arg-type]  # bad layer: before loading
    data = load_dataset(dataset)
    lm = load(model, device, dtype)
    for warning in vec.check_model(lm.identity, allow_model_mismatch):
        warn(warning)
    result = fit_condition(
        lm,
        data,
        vec,
        layer,
        reduce=reduce,  # type: ignore[arg-type]
        chat=chat,
        holds_for_positive=when == "positive",
    )
    payload = result.to_json(vector.resolve())
    if output is not None:
        atomic_write_bytes(output, (json.dumps(payload, indent=2) + "\n").encode())
    if as_json:
        out.print_json(json.dumps(payload))
        return
    side = ">" if result.condition.above else "<"
    out.print(
        f"condition: projection at layer {layer} {side} {result.condition.threshold:.4g} "
        f"({reduce} over the prompt)"
    )
    out.print(
        f"accuracy {result.accuracy:.3f} on {len(result.positive)} prompts to steer and "
        f"{len(result.negative)} to leave alone (AUC {result.auc:.3f}); fitted on these "
        "prompts, so check it on held-out ones"
    )
    if output is not None:
        out.print(f"wrote {output}")
