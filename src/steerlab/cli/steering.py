"""Commands that steer: generate and serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    clamp_range,
    engine_loader,
    err,
    linked_folder,
    load,
    out,
    steerings_of,
    warn,
)
from steerlab.core.errors import SteerlabError
from steerlab.core.policy import POLICY_HELP, Policy, check_marker
from steerlab.core.steering import OPERATORS
from steerlab.core.vector import SITES


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user prompt."),
    vector: Path = typer.Option(..., "--vector", "-v", help="A .safetensors or .gguf vector."),
    model: str = ModelOpt,
    layer: str | None = typer.Option(
        None, "--layer", "-l", help="Layers to steer (default: all of the vector's)."
    ),
    multiplier: list[float] | None = typer.Option(
        None,
        "--multiplier",
        "-x",
        help="Repeat for several values (default 4; ablate and clamp take 1, the default).",
    ),
    operator: str = typer.Option(
        "add",
        "--operator",
        help="add (the multiplier times the vector), ablate (project its direction out) or "
        "clamp (keep the projection onto it inside --clamp).",
    ),
    clamp: str | None = typer.Option(
        None, "--clamp", help="LO,HI: the projection's range for --operator clamp."
    ),
    site: str | None = typer.Option(
        None,
        "--site",
        help="block, attn or mlp: where in each block to steer (default: where the vector was "
        "read).",
    ),
    condition: Path | None = typer.Option(
        None,
        "--condition",
        help="Steer only if the prompt passes this condition (from `steerlab condition fit -o`).",
    ),
    policy: str = typer.Option(
        "after-prompt",
        "--policy",
        "-p",
        help=POLICY_HELP + ".",
    ),
    scale: str = typer.Option(
        "absolute", "--scale", help="absolute, or relative to the stored residual norm."
    ),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n"),
    engine: str = EngineOpt,
    enforce_eager: bool = EagerOpt,
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Render through the chat template."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    allow_model_mismatch: bool = AllowMismatchOpt,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Print the unsteered and steered completions of a prompt side by side."""
    from steerlab.core.engine import generate_multipliers
    from steerlab.core.prompts import render
    from steerlab.core.sampling import Sampling
    from steerlab.engines import engine_entry, require

    engine_entry(engine)  # an unknown engine fails first
    if not Policy.parse(policy).persisting:  # a bad policy fails before the model loads
        require(engine, "transient", "--policy transient")
    clamp_to = clamp_range(clamp)
    if operator not in OPERATORS:
        raise SteerlabError(f"unknown operator {operator!r}: use {', '.join(OPERATORS)}")
    multipliers = multiplier or [4.0 if operator == "add" else 1.0]
    if site is not None and site not in SITES:
        raise SteerlabError(f"unknown site {site!r}: use {', '.join(SITES)}")
    if site not in (None, "block"):
        require(engine, "sites", f"--site {site}")
    if condition is not None:
        require(engine, "conditions", "--condition")

    sampling = Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    if engine != "hf":
        lm, steerings = _registry_single(
            engine, model, vector, layer, policy, scale, operator, clamp_to, enforce_eager
        )
    else:
        lm = load(model, device, dtype)
        steerings = steerings_of(
            vector, layer, policy, scale, lm, allow_model_mismatch, operator, clamp_to
        )
        if site is not None:
            import dataclasses

            steerings = [dataclasses.replace(s, site=site) for s in steerings]
        if condition is not None:
            import dataclasses

            from steerlab.core.condition import read_condition
            from steerlab.formats import load_vector

            gate = read_condition(condition, load_vector)
            steerings = [dataclasses.replace(s, condition=gate) for s in steerings]
            gate_note = _condition_note(lm, gate, prompt, system, chat)
    text = render(lm.tokenizer, prompt, system=system, chat=chat).text
    if condition is None:
        gate_note = None
    check_marker(steerings[0].policy, text)
    results = generate_multipliers(
        lm, prompt, steerings, multipliers, sampling, chat=chat, system=system
    )
    if as_json:
        payload = {
            "prompt": prompt,
            "policy": str(steerings[0].policy),
            "layers": list(steerings[0].layers or ()),
            "scale": scale,
            "operator": operator,
            "condition": gate_note,
            "completions": [{"multiplier": m, "text": t} for m, t in results],
        }
        out.print_json(json.dumps(payload))
        return
    if gate_note is not None:
        err.print(
            f"condition {'holds' if gate_note['holds'] else 'does not hold'}: score "
            f"{gate_note['score']:.4g} vs threshold {gate_note['threshold']:.4g}"
            + ("" if gate_note["holds"] else " (the steered column is the unsteered text)")
        )
    done = {"add": "steered", "ablate": "ablated", "clamp": "clamped"}[operator]
    titles = [
        "unsteered" if m == 0 else f"steered x{m:g}" if operator == "add" else done
        for m, _ in results
    ]
    if out.width >= 40 * len(results):
        table = Table(*titles, show_lines=True)
        table.add_row(*[t for _, t in results])
        out.print(table)
    else:
        for title, (_, text) in zip(titles, results, strict=True):
            out.rule(title)
            out.print(text)


def _condition_note(lm: Any, gate: Any, prompt: str, system: str | None, chat: bool) -> Any:
    """Whether the prompt passes the condition, and its score (for the user to see)."""
    from steerlab.core.prompts import prompt_ids
    from steerlab.hf.conditions import prompt_scores

    ids = prompt_ids(lm.tokenizer, prompt, system=system, chat=chat)
    score = prompt_scores(lm.model, lm.layers, [ids], gate)[0]
    return {"holds": gate.holds(score), "score": score, "threshold": gate.threshold}


def _registry_single(
    engine: str,
    model: str,
    vector: Path,
    layer: str | None,
    policy: str,
    scale: str,
    operator: str = "add",
    clamp: tuple[float, float] | None = None,
    eager: bool = False,
) -> Any:
    """An engine with a fixed vector registry (vLLM) started with one vector registered."""
    from steerlab.core.steering import Steering
    from steerlab.formats import load_vector
    from steerlab.hf.layers import resolve_layers

    vec = load_vector(vector)  # a bad file fails before the engine starts
    lm = engine_loader(engine, model, None, None, vectors=linked_folder(vector), eager=eager)()
    chosen = None if layer is None else tuple(resolve_layers(layer, lm.identity.num_layers))
    return lm, [Steering(vec, 1.0, chosen, policy, scale, operator, clamp)]  # type: ignore[arg-type]


@app.command()
def serve(
    vectors: Path = typer.Option(
        ..., "--vectors", help="Directory of .safetensors/.gguf vectors (name = file stem)."
    ),
    model: str = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="STEERLAB_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1 (env STEERLAB_API_KEY).",
    ),
    allow_host: list[str] = typer.Option(
        [],
        "--allow-host",
        help="Accept this Host header name too (repeat; '*' for any). Loopback names always.",
    ),
    allow_origin: list[str] = typer.Option(
        [],
        "--allow-origin",
        help="Accept browser requests from this origin too (scheme://host:port, or null; "
        "repeat). The server's own origin always.",
    ),
    expose_metadata: bool = typer.Option(
        False, "--expose-metadata", help="Show full vector metadata (dataset paths) in /v1/vectors."
    ),
    max_tokens: int = typer.Option(
        512, "--max-tokens", help="Largest max_tokens a request may ask for."
    ),
    max_batch: int = typer.Option(8, "--max-batch", help="Rows per batch."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait (then 503)."),
    max_body: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body."),
    max_prompt_chars: int = typer.Option(
        100_000, "--max-prompt-chars", help="Largest prompt, in characters."
    ),
    timeout: float = typer.Option(
        300.0,
        "--request-timeout",
        help="Seconds a request may take from its first byte, body and queueing included (504).",
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", help="Seconds to read a request body (408)."
    ),
    header_timeout: float = typer.Option(
        10.0,
        "--header-timeout",
        help="Seconds a connection may take to send a request's headers (408).",
    ),
    max_connections: int | None = typer.Option(
        None,
        "--max-connections",
        help="Open connections; more get 503 at once. Default: half the file-descriptor limit, at most 1024.",
    ),
    allow_model_mismatch: bool = AllowMismatchOpt,
    engine: str = EngineOpt,
    enforce_eager: bool = EagerOpt,
    sweep_dir: Path | None = typer.Option(
        None,
        "--sweep-dir",
        help="A finished sweep's --out directory: the playground shows its plots and "
        "recommendation, and serves its vector as 'sweep'.",
    ),
    device: str | None = DeviceOpt,
    dtype: str | None = DtypeOpt,
) -> None:
    """Serve an OpenAI-compatible API with per-request steering, and a playground at /."""
    from steerlab.serving.app import Limits, Security, is_loopback, load_vectors
    from steerlab.serving.connections import default_max_connections
    from steerlab.serving.server import serve as run

    connections = default_max_connections() if max_connections is None else max_connections
    for name, value in (
        ("--max-tokens", max_tokens),
        ("--max-batch", max_batch),
        ("--max-queue", max_queue),
        ("--max-body-bytes", max_body),
        ("--max-prompt-chars", max_prompt_chars),
        ("--max-connections", connections),
    ):
        if value < 1:
            raise SteerlabError(f"{name} must be at least 1, got {value}")
    for name, seconds in (
        ("--request-timeout", timeout),
        ("--body-timeout", body_timeout),
        ("--header-timeout", header_timeout),
    ):
        if not 0 < seconds < 1e6:
            raise SteerlabError(f"{name} must be a positive number of seconds, got {seconds}")
    limits = Limits(
        max_tokens=max_tokens,
        max_batch=max_batch,
        max_queue=max_queue,
        max_body_bytes=max_body,
        max_prompt_chars=max_prompt_chars,
        request_timeout=timeout,
        body_timeout=body_timeout,
        header_timeout=header_timeout,
        max_connections=connections,
    )
    if not vectors.is_dir():
        raise SteerlabError(f"vector directory '{vectors}' does not exist: pass --vectors DIR")
    if not is_loopback(host) and not api_key:
        warn(
            f"binding to {host} without an API key: anyone who can reach this machine can use "
            "the server; pass --api-key (or set STEERLAB_API_KEY)"
        )
    from steerlab.engines import engine_entry

    engine_entry(engine)
    summary = None
    if sweep_dir is not None:
        from steerlab.evaluation.sweep_summary import read_sweep

        summary = read_sweep(sweep_dir)
    if engine != "hf":
        import os

        from steerlab.engines import EngineOptions

        if allow_model_mismatch:
            os.environ["STEERLAB_ALLOW_MODEL_MISMATCH"] = "1"  # every vLLM process reads it
        options = EngineOptions(
            model, device, dtype, vectors, enforce_eager, max_model_len=max_tokens + 2048,
            max_num_seqs=max_batch, extra={"max_queue": max_queue},
        )  # fmt: skip
        with err.status(f"starting {engine} with {model}"):
            lm: Any = engine_entry(engine).load(options)
        registry = lm.vectors
    else:
        lm = load(model, device, dtype)
        registry = load_vectors(vectors, lm, allow_model_mismatch, warn=warn)
    sweep_vector = None
    if summary is not None and summary.vector is not None:
        if "sweep" in registry:
            warn(
                "--vectors has a vector named 'sweep' already: the sweep's own vector is not served"
            )
        elif engine != "hf":
            warn(f"the {engine} engine serves only --vectors: copy the sweep's vector there")
        else:
            from steerlab.formats import load_vector

            vector = load_vector(summary.vector)
            vector.check_model(lm.identity, allow_model_mismatch)
            registry["sweep"], sweep_vector = vector, "sweep"
    err.print(
        f"{len(registry)} vectors: {', '.join(sorted(registry)) or 'none'}; playground at http://{host}:{port}/"
    )
    from steerlab.serving.guard import origin_key

    for origin in allow_origin:
        if origin != "null" and origin_key(origin) is None:
            raise SteerlabError(
                f"--allow-origin {origin[:80]!r} is not an origin: write scheme://host:port "
                "(http or https) or null"
            )
    security = Security(
        api_key=api_key or None,
        expose_metadata=expose_metadata,
        allowed_origins=tuple(allow_origin),
    )
    run(lm, registry, host, port, limits, security, allow_host, summary, sweep_vector)
