"""vLLM (CPU build) with steerlab's plugin: compiled and eager, steered and unsteered, plugin
loaded and absent, beside steerlab's Hugging Face engine, in one run.

Run by `make bench` in .venv-vllm. Five engines, each in its own worker process
(``bench/vllm_worker.py``) and idle while another runs: vLLM's default compiled mode with
the plugin and two registered vectors (one layer; all 30 layers), a second such process, two
processes of the same mode with no plugin at all (``VLLM_PLUGINS=""``), and eager mode with
the plugin. Default model, fp32, greedy, 32 tokens per request, batch 1, 8 and 32. Every
(engine, variant) runs once per round, in an order that rotates each round; a ratio's figure
is the median over rounds of the ratio within a round (paired), and tokens/s come from each
unit's median round.

Before each timed call a worker makes one short untimed call, so its engine's weights are
back in the CPU's cache after another engine's turn, as they are for an engine that runs
alone (without it, a unit that follows another process pays for the cache and one that
follows its own does not, which the rotation cannot pair away). Ratios within one process
(steered / unsteered) need nothing more; plugin loaded / absent compares processes, and two
processes of one engine differ by a few percent on this machine (where each process's
pages land in the caches), so each side is four processes (their summed time per round): the
two started with the others, and two more pairs in a second phase, after the first phase's
engines have stopped (nine at once would not fit in memory). Half the absent processes
against the other half is reported beside it as the noise floor. In side experiments here the
first engine process started ran 3-4% slower than those started after it, whatever its kind,
so each phase first starts an engine that is never timed (idle until the phase ends). The HF
engine runs the same prompts in this process between the first phase's rounds. Writes
``bench/results/vllm-<date>.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import THREADS, Quiet, write_result  # noqa: E402

TOKENS = int(os.environ.get("BENCH_VLLM_TOKENS", "32"))
BATCHES = (1, 8, 32)
LAYER = 10
ROUNDS = int(os.environ.get("BENCH_VLLM_ROUNDS", "9"))
HF_ROUNDS = 3
WORKER = Path(__file__).with_name("vllm_worker.py")
# (engine, variant): what each round times, per batch size
UNITS = [
    ("compiled", "unsteered"),
    ("compiled", "steered, 1 layer"),
    ("compiled", "steered, all 30 layers"),
    ("no plugin", "unsteered"),
    ("eager", "unsteered"),
    ("compiled b", "unsteered"),
    ("eager", "steered, 1 layer"),
    ("no plugin b", "unsteered"),
    ("eager", "steered, all 30 layers"),
]
# The second phase: two more processes with the plugin and two without, unsteered
SECOND = [
    ("compiled c", "unsteered"),
    ("no plugin c", "unsteered"),
    ("compiled d", "unsteered"),
    ("no plugin d", "unsteered"),
]
LOADED = ("compiled", "compiled b", "compiled c", "compiled d")
ABSENT = ("no plugin", "no plugin b", "no plugin c", "no plugin d")


class Worker:
    """One engine in its own process, timed on request."""

    def __init__(self, name: str, options: dict[str, Any], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "READY":
                return
        raise RuntimeError(f"the {name} vLLM worker did not start (exit {self.proc.wait()})")

    def ask(self, command: dict[str, Any]) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.name} worker stopped")
            try:
                return float(json.loads(line))
            except (ValueError, TypeError):
                continue  # a log line

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


def main() -> None:
    import torch

    import steerlab
    from steerlab import Sampling, Steering, SteeringVector, decode, save_vector
    from steerlab.core.prompts import encode_prompts, prompt_ids

    torch.set_num_threads(THREADS)
    lm = steerlab.load_model("smollm2-135m", device="cpu", dtype="float32")
    d, n_layers = lm.info.hidden_size, lm.info.num_layers
    gen = torch.Generator().manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-vectors-"))
    one = SteeringVector({LAYER: torch.randn(d, generator=gen) * 0.5}, lm.identity)
    every = SteeringVector(
        {k: torch.randn(d, generator=gen) * 0.1 for k in range(n_layers)}, lm.identity
    )
    save_vector(one, folder / "one.safetensors")
    save_vector(every, folder / "every.safetensors")
    texts = [f"Tell me fact number {i} about the sea." for i in range(32)]
    ids = [prompt_ids(lm.tokenizer, t) for t in texts]
    variants = {
        "unsteered": [],
        "steered, 1 layer": [{"vector": "one", "multiplier": 2.0, "layers": [LAYER]}],
        f"steered, all {n_layers} layers": [{"vector": "every", "multiplier": 2.0}],
    }
    base = {"prompts": ids, "batches": list(BATCHES)}
    env = {**os.environ, "STEERLAB_VECTORS": str(folder), "BENCH_VLLM_TOKENS": str(TOKENS)}
    unsteered = {**base, "variants": {"unsteered": []}, "eager": False}

    def plain(name: str) -> Worker:
        """A compiled engine that times unsteered requests, with the plugin or without."""
        absent = name.startswith("no plugin")
        return Worker(name, unsteered, {**env, "VLLM_PLUGINS": ""} if absent else env)

    with Quiet("vllm") as quiet:
        first = plain("no plugin, untimed")  # see the module's docstring
        workers = {
            "compiled": Worker("compiled", {**base, "variants": variants, "eager": False}, env),
            **{name: plain(name) for name in ("compiled b", "no plugin", "no plugin b")},
            "eager": Worker("eager", {**base, "variants": variants, "eager": True}, env),
        }
        times: dict[str, dict[str, list[float]]] = {
            str(b): {f"{e} | {v}": [] for e, v in UNITS + SECOND} for b in BATCHES
        }
        hf_times: dict[str, dict[str, list[float]]] = {
            str(b): {v: [] for v in variants} for b in BATCHES
        }
        steers = {
            "unsteered": [],
            "steered, 1 layer": [Steering(one, 2.0, (LAYER,))],
            f"steered, all {n_layers} layers": [Steering(every, 2.0)],
        }
        greedy = Sampling(TOKENS, stop_at_eos=False)

        def time_units(
            group: dict[str, Worker], units: list[tuple[str, str]], r: int, batch: int
        ) -> None:
            """Time every unit once at this batch size, in an order that rotates each round."""
            for engine, variant in units[r % len(units) :] + units[: r % len(units)]:
                seconds = group[engine].ask({"batch": batch, "variant": variant})
                times[str(batch)][f"{engine} | {variant}"].append(seconds)

        for r in range(ROUNDS):
            for batch in BATCHES:
                time_units(workers, UNITS, r, batch)
                if r < HF_ROUNDS:
                    pids, mask = encode_prompts(lm.tokenizer, texts[:batch])
                    for name in list(variants)[r % 3 :] + list(variants)[: r % 3]:
                        start = time.perf_counter()
                        decode(lm.model, pids, mask, steers[name], greedy, layer_map=lm.layers)
                        hf_times[str(batch)][name].append(time.perf_counter() - start)
            print(f"round {r + 1}/{ROUNDS} done", flush=True)
        shares = {
            str(b): {v: workers["compiled"].ask({"batch": b, "share": v}) for v in variants}
            for b in BATCHES
        }
        for worker in [first, *workers.values()]:
            worker.close()
        first = plain("no plugin, untimed")
        workers = {name: plain(name) for name, _ in SECOND}
        for r in range(ROUNDS):
            for batch in BATCHES:
                time_units(workers, SECOND, r, batch)
            print(f"second phase: round {r + 1}/{ROUNDS} done", flush=True)
        for worker in [first, *workers.values()]:
            worker.close()

    def paired(batch: str, a: str, b: str) -> float:
        """Median over rounds of time(b) / time(a): the throughput of a relative to b."""
        rows = times[batch]
        return statistics.median(y / x for x, y in zip(rows[a], rows[b], strict=True))

    def pooled(batch: str, a: tuple[str, ...], b: tuple[str, ...]) -> float:
        """As :func:`paired`, each side the summed time of its processes' units in the round."""
        rows = times[batch]
        sides = [[sum(ts) for ts in zip(*(rows[u] for u in side), strict=True)] for side in (a, b)]
        return statistics.median(y / x for x, y in zip(*sides, strict=True))

    result: dict[str, Any] = {"tokens": TOKENS, "rounds": ROUNDS, "hf_rounds": HF_ROUNDS,
                              "seconds": times, "hf_seconds": hf_times, "plugin_host_share": shares}  # fmt: skip
    ratios: dict[str, dict[str, float]] = {}
    every_name = f"steered, all {n_layers} layers"
    for b in map(str, BATCHES):
        ratios[b] = {
            "compiled steered 1 layer / compiled unsteered": paired(
                b, "compiled | steered, 1 layer", "compiled | unsteered"
            ),
            "compiled steered all layers / compiled unsteered": paired(
                b, f"compiled | {every_name}", "compiled | unsteered"
            ),
            "plugin loaded, unsteered / plugin absent": pooled(
                b,
                tuple(f"{e} | unsteered" for e in LOADED),
                tuple(f"{e} | unsteered" for e in ABSENT),
            ),
            "plugin absent, two processes / two others (noise floor)": pooled(
                b,
                ("no plugin b | unsteered", "no plugin d | unsteered"),
                ("no plugin | unsteered", "no plugin c | unsteered"),
            ),
            "compiled steered all layers / eager steered all layers": paired(
                b, f"compiled | {every_name}", f"eager | {every_name}"
            ),
            "compiled steered 1 layer / eager steered 1 layer": paired(
                b, "compiled | steered, 1 layer", "eager | steered, 1 layer"
            ),
            "eager unsteered / plugin absent (compiled)": paired(
                b, "eager | unsteered", "no plugin | unsteered"
            ),
        }
    result["paired"] = ratios
    result["tokens_per_s"] = {
        b: {unit: int(b) * TOKENS / statistics.median(t) for unit, t in rows.items()}
        for b, rows in times.items()
    }
    result["hf_tokens_per_s"] = {
        b: {v: int(b) * TOKENS / statistics.median(t) for v, t in rows.items()}
        for b, rows in hf_times.items()
    }
    print(json.dumps(ratios, indent=1))
    import vllm  # noqa: F401  (its version goes into the result)

    write_result("vllm", result, quiet)


if __name__ == "__main__":
    main()
