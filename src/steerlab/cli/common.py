"""What every ``steerlab`` command shares: the Typer apps, common options, loading, output."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from steerlab.core.errors import SteerlabError

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
AllowMismatchOpt = typer.Option(
    False,
    "--allow-model-mismatch",
    help="Use a vector made on another model of the same shape.",
)
EngineOpt = typer.Option(
    "hf", "--engine", help=__import__("steerlab.engines").engines.engine_help()
)
EagerOpt = typer.Option(
    False, "--enforce-eager", help="vLLM only: run eagerly instead of its compiled graph."
)
LayersPathOpt = typer.Option(
    None, "--layers-path", help="Dotted path of the decoder blocks, e.g. model.layers."
)


def load(model: str, device: str | None, dtype: str | None, layers_path: str | None = None) -> Any:
    from steerlab.hf.model import load_model

    with err.status(f"loading {model}"):
        return load_model(model, device=device, dtype=dtype, layers_path=layers_path)


# The most rows an engine that schedules its own (vLLM) runs at once: it sizes per-request
# buffers by this number when it starts; more rows than this wait their turn, which changes
# no result (a sweep's --batch-rows is memory and speed, not numbers).
MAX_ROWS_AT_ONCE = 1024


def engine_loader(
    name: str,
    model: str,
    device: str | None,
    dtype: str | None,
    *,
    vectors: Path | None = None,
    eager: bool = False,
    allow_mismatch: bool = False,
    rows: int | None = None,
) -> Any:
    """A function that starts the named engine (from the registry) when first called;
    ``rows``: the rows an engine that schedules its own may run at once (a sweep's
    ``--batch-rows``, at most :data:`MAX_ROWS_AT_ONCE`; None: the engine's default)."""
    from steerlab.engines import EngineOptions, engine_entry

    entry = engine_entry(name)
    started: list[Any] = []

    def start() -> Any:
        if not started:
            if name == "hf":
                started.append(load(model, device, dtype))
            else:
                if allow_mismatch:
                    import os

                    os.environ["STEERLAB_ALLOW_MODEL_MISMATCH"] = "1"
                options = EngineOptions(model, device, dtype, vectors, eager)
                if rows is not None:
                    options = dataclasses.replace(options, max_num_seqs=min(rows, MAX_ROWS_AT_ONCE))
                with err.status(f"starting {name} with {model}"):
                    started.append(entry.load(options))
        return started[0]

    return start


def linked_folder(vector: Path) -> Path:
    """A new folder holding a link to one vector file (a registry for one vector)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="steerlab-vectors-"))
    (folder / f"v{vector.suffix.lower()}").symlink_to(vector.resolve())
    return folder


def model_layers(model: str) -> int:
    """The decoder blocks of a model spec, from its config (no weights loaded)."""
    from steerlab.hf.model import config_of

    return config_of(model)


def steerings_of(
    vector: Path,
    layers: str | None,
    policy: str,
    scale: str,
    lm: Any,
    allow_mismatch: bool,
    operator: str = "add",
    clamp: tuple[float, float] | None = None,
) -> list[Any]:
    """The steering a command's --vector/--layer/--policy/--scale options name (multiplier 1)."""
    from steerlab.core.steering import Steering
    from steerlab.formats import load_vector
    from steerlab.hf.layers import resolve_layers

    vec = load_vector(vector)
    for warning in vec.check_model(lm.identity, allow_mismatch):
        warn(warning)
    chosen = None if layers is None else tuple(resolve_layers(layers, lm.info.num_layers))
    return [Steering(vec, 1.0, chosen, policy, scale, operator, clamp)]  # type: ignore[arg-type]


def clamp_range(text: str | None) -> tuple[float, float] | None:
    """``--clamp LO,HI`` as two numbers (None when not given)."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise SteerlabError(
            f"--clamp {text!r} is not two numbers: give the projection's range as LO,HI, e.g. 0,2"
        ) from None


def judge_of(
    judge: str, keywords: str | None, judge_url: str | None, judge_model: str, behaviour: str
) -> Any:
    """The judge a command's options name (the registry in :mod:`steerlab.evaluation.judges`)."""
    from steerlab.evaluation.judges import make_judge

    return make_judge(judge, keywords, judge_url, judge_model, behaviour)


def print_rows(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    table = Table(*columns, title=title)
    for r in rows:
        table.add_row(
            *[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        )
    out.print(table)


def fail(message: str) -> None:
    """Print ``error: message`` unwrapped (no markup, no traceback) and exit 2."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
