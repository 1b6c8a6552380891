"""Write BENCHMARKS.md, and the README's benchmark blocks, from committed results only.

Every figure comes from the newest ``bench/results/<section>-<date>.json`` of each section
(see ``bench/common.py``); nothing here is typed in by hand, and ``tests/test_benchmarks.py``
regenerates both texts and compares them with the committed files byte for byte.

Usage: ``python bench/report.py`` (``make bench`` runs it after the sections).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECTIONS = ("extraction", "generation", "overhead", "vllm", "sweep")
# The README blocks this script owns: the summary under "Benchmarks" and the measured table
# in "Steering inside vLLM"; each lies between its begin and end markers.
BLOCKS = ("bench", "bench-vllm")
# The noise floor of plugin loaded / absent: absent processes against other absent ones
FLOORS = (
    "plugin absent, two processes / two others (noise floor)",
    "plugin absent, one process / another (noise floor)",  # results before 2026-12-07 11:00
)


def floor_key(paired: dict[str, dict[str, float]]) -> str | None:
    """The noise-floor ratio's key in a vLLM result, if it has one."""
    keys = next(iter(paired.values()))
    return next((k for k in FLOORS if k in keys), None)


def begin(block: str) -> str:
    return f"<!-- {block}:begin (written by bench/report.py from bench/results) -->"


def end(block: str) -> str:
    return f"<!-- {block}:end -->"


LAYER, LAYERS = 10, 30  # the steered layer of the generation section and SmolLM2's depth


def latest(section: str, results: Path = RESULTS) -> tuple[str, dict[str, Any]] | None:
    """The newest result file of a section (by the date in its name) and its contents."""
    files = sorted(results.glob(f"{section}-????-??-??.json"))
    if not files:
        return None
    return files[-1].name, json.loads(files[-1].read_text())


def _provenance(name: str, r: dict[str, Any]) -> str:
    m, load = r["machine"], r["machine_load"]
    cpu = f": {m['cpu']}" if "cpu" in m else ""  # recorded since 2026-12-07
    versions = ", ".join(
        f"{k} {m[k]}" for k in ("torch", "transformers", "vllm", "steering_vectors", "repeng")
        if k in m
    )  # fmt: skip
    alone = (
        "alone on the machine"
        if load["alone"]
        else "**not alone on the machine: read these figures with care**"
    )
    return (
        f"Result file `bench/results/{name}`, {r['date']}; {m['platform']} ({m['processor']}, "
        f"{m['cpus']} CPUs{cpu}), {m['threads']} threads; {versions}, steerlab {m['steerlab']}. "
        f"Run {alone}: other processes used {100 * load['other_processes_cpu_share']:.1f}% of "
        f"the CPU during its {load['seconds']:.0f} s (peak load average "
        f"{load['peak_load_average']:.2f})."
    )


def _extraction(name: str, r: dict[str, Any], summary: list[str]) -> list[str]:
    lines = [
        "## Extraction throughput (`bench/extraction.py`)",
        "",
        _provenance(name, r),
        "",
        f"{r['pairs']} A/B pairs of `corrigible-neutral-HHH.jsonl` (two sequences each), batch "
        f"size {r['batch_size']} for every tool that batches; steerlab and steering-vectors read "
        "the same position (the answer letter), repeng reads the last token and runs PCA. Every "
        f"tool ran {r['rounds']} times in interleaved rounds (the order rotates each round); "
        "pairs/s from each tool's median round.",
        "",
    ]
    ratios = {}
    for label in ("one layer", "all layers"):
        rows = r[label]["pairs_per_s"]
        fastest = max(v for k, v in rows.items() if k != "steerlab" and not k.startswith("naive"))
        ratios[label] = rows["steerlab"] / fastest
        lines += [
            f"**{label}** (vectors agree with steering-vectors' mean-diff: min cosine "
            f"{r[label]['min_cosine_vs_steering_vectors']:.6f})",
            "",
            "| tool | pairs/s | steerlab is ×faster |",
            "|---|---|---|",
        ]
        for tool, value in rows.items():
            lines.append(f"| {tool} | {value:.1f} | {rows['steerlab'] / value:.2f} |")
        lines += ["", f"steerlab / fastest peer: **{ratios[label]:.2f}×**", ""]
    summary.append(
        f"- extraction ({r['date'][:10]}, {r['pairs']} pairs): **{ratios['one layer']:.1f}×** "
        f"the pairs/s of the fastest peer for one layer and **{ratios['all layers']:.1f}×** for "
        "all 30 layers, the same vector as steering-vectors (cosine "
        f"{min(r[k]['min_cosine_vs_steering_vectors'] for k in ('one layer', 'all layers')):.6f});"
    )
    return lines


def _generation(name: str, r: dict[str, Any], summary: list[str]) -> list[str]:
    gen = r["generation"]
    lines = [
        "## Steered generation throughput (`bench/generation.py`)",
        "",
        _provenance(name, r),
        "",
        f"{gen['new_tokens']} new tokens, greedy, one steered layer ({LAYER}), multiplier 2; "
        f"every variant in interleaved rounds ({r['rounds'] + 1} at batch 1, {r['rounds']} at "
        "batch 8), tokens/s from its median round (higher is better).",
        "",
    ]
    transient = {}
    for batch in ("batch 1", "batch 8"):
        rows = gen[batch]
        hf, loop = rows["HF generate, unsteered"], rows["steerlab loop, unsteered"]
        lines += [
            f"**{batch}**",
            "",
            "| run | tokens/s | vs unsteered (same loop) |",
            "|---|---|---|",
        ]
        for run, value in rows.items():
            base = loop if run.startswith("steerlab loop") else hf
            lines.append(f"| {run} | {value:.1f} | {value / base:.3f} |")
        transient[batch] = loop / rows["steerlab loop, transient"]
        limit = 1 + (LAYERS - LAYER - 1) / LAYERS
        lines += [
            "",
            f"after-prompt / unsteered: **{rows['HF generate + steerlab after-prompt'] / hf:.3f}** "
            f"(HF generate); transient time per token / unsteered (steerlab loop): "
            f"**{transient[batch]:.2f}×** (physical limit for layer {LAYER} of {LAYERS}: "
            f"{limit:.2f}×)",
            "",
        ]
    comp = r["compiled"]
    u, st = comp["compiled static, unsteered"], comp["compiled static + steerlab after-prompt"]
    lines += [
        "**compiled static-cache `generate`** (transformers' CUDA default, forced on the CPU with "
        "`CompileConfig._compile_all_devices`; batch 1, 48 tokens, one warm-up call each excluded)",
        "",
        "| run | tokens/s | vs unsteered |",
        "|---|---|---|",
        f"| compiled static, unsteered | {u:.1f} | 1.000 |",
        f"| compiled static + steerlab after-prompt | {st:.1f} | {st / u:.3f} |",
        "",
        f"steered / unsteered: **{st / u:.3f}**; steered tokens equal steerlab's exact `decode`: "
        f"**{100 * comp['agreement_with_decode']:.0f}%**; first calls (compiling): "
        f"{comp['first_call_unsteered_s']:.0f} s unsteered, {comp['first_call_steered_s']:.0f} s "
        "steered (a steer() block recompiles the graphs its hooks touch once).",
        "",
        "Generation speed against the number of steered layers (steerlab loop, batch 1, 32 "
        "tokens, after-prompt):",
        "",
        "| steered layers | tokens/s | vs unsteered |",
        "|---|---|---|",
    ]
    per = gen["tokens_per_s_by_steered_layers"]
    for n, value in per.items():
        lines.append(f"| {n} | {value:.1f} | {value / per['0']:.3f} |")
    lines += [
        "",
        "## Extraction scaling (mean-diff, one layer, batch 64, a process per size; the same "
        "200 pairs cycled to each size)",
        "",
        "| pairs | seconds | pairs/s | RSS before (MB) | peak RSS during extraction (MB) | "
        "growth (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["scaling"]:
        growth = row["peak_rss_mb"] - row["rss_before_mb"]
        lines.append(
            f"| {row['pairs']} | {row['seconds']:.1f} | {row['pairs'] / row['seconds']:.1f} | "
            f"{row['rss_before_mb']:.0f} | {row['peak_rss_mb']:.0f} | {growth:.0f} |"
        )
    load = r["model_load"]
    lines += [
        "",
        "## Model load (default model)",
        "",
        f"- cold (GGUF conversion into an empty cache): {load['cold_s']:.1f} s",
        f"- warm (from the cache): {load['warm_s']:.2f} s for `load_model`; "
        f"{load['warm_with_imports_s']:.2f} s from a new interpreter, `import torch, "
        "transformers` included",
        "",
    ]
    b1 = gen["batch 1"]
    summary += [
        f"- steered generation ({r['date'][:10]}): `transient` costs **{transient['batch 1']:.2f}×**"
        f" (batch 1) and **{transient['batch 8']:.2f}×** (batch 8) the time per token of "
        f"unsteered decoding (physical limit {1 + (LAYERS - LAYER - 1) / LAYERS:.2f}× for layer "
        f"{LAYER} of {LAYERS}); steer() around HF generate runs at "
        f"{b1['HF generate + steerlab after-prompt'] / b1['HF generate, unsteered']:.3f}× the "
        "unsteered tokens/s at batch 1;",
        f"- compiled static-cache `generate` (forced on the CPU): steered/unsteered "
        f"**{st / u:.3f}**, steered tokens {100 * comp['agreement_with_decode']:.0f}% equal to "
        f"the exact `decode`; warm load of the default model {load['warm_s']:.1f} s;",
    ]
    return lines


def _overhead(name: str, r: dict[str, Any], summary: list[str]) -> list[str]:
    lines = [
        "## The cost of the steering itself (`bench/overhead.py`)",
        "",
        _provenance(name, r),
        "",
        "Time spent inside steerlab's hooks (the per-forward position pre-hook and the "
        f"per-block add) during steered decoding of {r['tokens']} tokens, after-prompt, against "
        "the whole decode time. This does not drift with the machine's speed the way "
        "end-to-end tokens/s do.",
        "",
        "| batch | steered layers | ms in hooks per token | share of decode time |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['batch']} | {row['layers']} | {row['hook_ms_per_token']:.3f} | "
            f"{100 * row['fraction']:.2f}% |"
        )
    lines.append("")
    share = {(row["batch"], row["layers"]): row["fraction"] for row in r["rows"]}
    summary.append(
        f"- the hooks take **{100 * share[(1, 1)]:.2f}%** of decode time at batch 1 "
        f"({100 * share[(8, 1)]:.2f}% at batch 8) with one steered layer, "
        f"{100 * share[(1, 30)]:.1f}% with all 30 ({r['date'][:10]});"
    )
    return lines


def _vllm(name: str, r: dict[str, Any], summary: list[str]) -> list[str]:
    tps, paired, hf = r["tokens_per_s"], r["paired"], r["hf_tokens_per_s"]
    every = next(k for k in next(iter(hf.values())) if k.startswith("steered, all"))
    lines = [
        "## vLLM with steerlab's plugin (`bench/vllm_bench.py`, in .venv-vllm)",
        "",
        _provenance(name, r),
        "",
        "Each engine in its own process, idle while another runs: vLLM's default "
        "compiled mode (dynamo + inductor) with the plugin and two registered vectors (one "
        'layer; all 30 layers), the same mode without the plugin (`VLLM_PLUGINS=""`), and '
        "eager mode with the plugin. Default model, fp32, greedy, "
        f"{r['tokens']} tokens per request; every (engine, variant) once per round, "
        f"{r['rounds']} rounds whose order rotates. tokens/s from each unit's median round; "
        "*paired* ratios are the median over rounds of the ratio within a round. The HF "
        f"engine ran the same prompts ({r['hf_rounds']} rounds, median)."
        + {
            FLOORS[0]: " Plugin loaded / absent compares processes, and two processes of one "
            "engine differ by a few percent here, so each side is four processes (`compiled` "
            "to `compiled d`, `no plugin` to `no plugin d`; their summed time per round): the "
            "`c` and `d` processes ran in a second phase of as many rounds, after the first "
            "phase's engines stopped; each phase first started an engine it never timed (the "
            "first process started ran a few percent slower than later ones here). Two absent "
            "processes against the other two is the noise floor.",
            FLOORS[1]: " Plugin loaded / absent compares processes, and two processes of one "
            "engine differ by a few percent here, so each side is two processes (`compiled` "
            "and `compiled b`, `no plugin` and `no plugin b`; their summed time per round) and "
            "the two absent processes' own ratio is the noise floor.",
            None: "",
        }[floor_key(paired)],
        "",
        "| batch | engine | run | tokens/s | steerlab HF engine tokens/s | vLLM / HF |",
        "|---|---|---|---|---|---|",
    ]
    for batch, units in tps.items():
        for unit, value in units.items():
            engine, run = unit.split(" | ")
            base = hf[batch].get(run)
            hf_text = f"{base:.1f}" if base and engine == "compiled" else "-"
            ratio = f"{value / base:.2f}" if base and engine == "compiled" else "-"
            lines.append(f"| {batch} | {engine} | {run} | {value:.1f} | {hf_text} | {ratio} |")
    keys = list(next(iter(paired.values())))
    lines += [
        "",
        "Paired ratios (throughput of the first over the second; targets: steered / "
        "unsteered ≥ 0.97 and plugin loaded / absent ≥ 0.99):",
        "",
        "| ratio | " + " | ".join(f"batch {b}" for b in paired) + " |",
        "|---|" + "---|" * len(paired),
    ]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{paired[b][key]:.3f}" for b in paired) + " |")
    shares = r["plugin_host_share"]
    lines += [
        "",
        "steerlab's per-step host code (each step's requests and coefficients) took "
        + ", ".join(
            f"{100 * v:.2f}% ({run}, batch {b})"
            for b, runs in shares.items()
            for run, v in runs.items()
        )
        + " of the compiled engine's time; the steering arithmetic itself runs inside vLLM's "
        "compiled graph.",
        "",
    ]

    def span(key: str) -> str:
        values = [paired[b][key] for b in paired]
        return " / ".join(f"{v:.3f}" for v in values)

    vllm_hf = [tps[b][f"compiled | {run}"] / hf[b][run] for b in tps for run in hf[b]]
    floor = floor_key(paired)
    summary += [
        f"- vLLM in its default compiled mode ({r['date'][:10]}, paired medians at batch "
        f"{' / '.join(paired)}): steered / unsteered **{span('compiled steered 1 layer / compiled unsteered')}** "
        f"with one layer and **{span('compiled steered all layers / compiled unsteered')}** with all "
        f"30; plugin loaded (nothing steered) / plugin absent "
        f"**{span('plugin loaded, unsteered / plugin absent')}**"
        + (f" (noise floor, absent / absent: {span(floor)})" if floor else "")
        + "; compiled / eager with all 30 "
        f"layers steered {span('compiled steered all layers / eager steered all layers')}; vLLM "
        f"decodes {min(vllm_hf):.1f}–{max(vllm_hf):.1f}× the tokens/s of the HF engine;",
    ]
    del every
    return lines


def vllm_table(r: dict[str, Any]) -> list[str]:
    """The README's measured vLLM table: tokens/s and paired ratios, as BENCHMARKS.md has them."""
    tps, paired = r["tokens_per_s"], r["paired"]
    floor = floor_key(paired)
    every = next(k.split(" | ")[1] for k in next(iter(tps.values())) if "all" in k)
    lines = [
        f"Measured by `bench/vllm_bench.py` ({r['date'][:10]}, default model, fp32, greedy, "
        f"{r['tokens']} tokens per request, 2 CPU threads; BENCHMARKS.md has every unit):",
        "",
        "| batch | plugin absent, tok/s | compiled unsteered | compiled, 1 layer steered | "
        "compiled, all 30 steered | eager, all 30 steered | steered / unsteered (1 layer; "
        "all 30) | plugin loaded / absent |"
        + (" noise floor (absent / absent) |" if floor else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if floor else ""),
    ]
    for b, units in tps.items():
        q = paired[b]
        extra = f" {q[floor]:.3f} |" if floor else ""
        lines.append(
            f"| {b} | {units['no plugin | unsteered']:.1f} | {units['compiled | unsteered']:.1f} "
            f"| {units['compiled | steered, 1 layer']:.1f} | {units[f'compiled | {every}']:.1f} "
            f"| {units[f'eager | {every}']:.1f} "
            f"| {q['compiled steered 1 layer / compiled unsteered']:.3f}; "
            f"{q['compiled steered all layers / compiled unsteered']:.3f} "
            f"| {q['plugin loaded, unsteered / plugin absent']:.3f} |{extra}"
        )
    return lines


def _sweep(name: str, r: dict[str, Any], summary: list[str]) -> list[str]:
    lines = [
        "## A sweep on the Hugging Face engine and on vLLM (`bench/sweep_bench.py`, in .venv-vllm)",
        "",
        _provenance(name, r),
        "",
        f"The shipped sentiment vector at layers {','.join(map(str, r['layers']))} x "
        f"multipliers {','.join(f'{m:g}' for m in r['multipliers'])} ({r['cells']} cells, "
        f"each layer's multiplier 0 included), {r['prompts']} shipped neutral prompts, {r['tokens']} greedy tokens, "
        "the VADER judge, KL and perplexity under the unsteered model for every cell. The "
        "vector was extracted once; each engine then scored every cell, one after the other "
        "in one process: Hugging Face in padded batches of 192 rows sharing each prompt's "
        "prefill, vLLM (compiled) in the same groups, each one continuous batch with all its "
        "rows at once (as `steerlab sweep --engine vllm` starts it) and an unsteered twin per "
        "steered row for KL.",
        "",
        "| engine | seconds scoring the cells | HF / this |",
        "|---|---|---|",
        f"| Hugging Face | {r['hf_s']:.1f} | 1.00 |",
        f"| vLLM | {r['vllm_s']:.1f} | {r['speedup']:.2f} |",
        f"| vLLM, its start and compile included ({r['vllm_start_s']:.0f} s) | "
        f"{r['vllm_s'] + r['vllm_start_s']:.1f} | {r['speedup_with_start']:.2f} |",
        "",
        f"Extraction (once, Hugging Face): {r['extract_s']:.1f} s. Same recommendation: "
        f"**{r['same_recommendation']}** ({r['recommendation_hf']} on HF, "
        f"{r['recommendation_vllm']} on vLLM); first completions identical in "
        f"{r['same_first_texts']} of {r['cells']} cells; largest differences: behaviour "
        f"{r['max_behaviour_difference']:.1e}, KL {r['max_kl_difference']:.1e}, perplexity "
        f"(relative) {r['max_perplexity_relative_difference']:.1e}.",
        "",
    ]
    summary.append(
        f"- a {r['cells']}-cell sweep ({r['prompts']} prompts x {r['tokens']} tokens, KL and "
        f"perplexity on; {r['date'][:10]}): vLLM scored it **{r['speedup']:.2f}×** as fast as "
        f"the HF engine ({r['speedup_with_start']:.2f}× counting vLLM's start), same "
        f"recommendation: {r['same_recommendation']};"
    )
    return lines


RENDER: dict[str, Callable[[str, dict[str, Any], list[str]], list[str]]] = {
    "extraction": _extraction,
    "generation": _generation,
    "overhead": _overhead,
    "vllm": _vllm,
    "sweep": _sweep,
}

NOTES = [
    "## Notes",
    "",
    "- Peak memory during extraction follows the longest batch (sequence length x batch "
    "size), not the number of pairs: the mean-diff sums are [layers, d], and the scaling sizes "
    "cycle the same pairs so that only N changes; a lower --batch-size bounds it.",
    "- `transient` runs the blocks up to its lowest steered layer once per token and the "
    "blocks above it twice (an unsteered pass whose keys and values persist, then a steered "
    "pass for the logits that replays the shared blocks), so its cost is about "
    "1 + (L - l - 1)/L forwards per token.",
    "- steerlab's extraction speed comes from stopping the forward after the highest "
    "requested block, running each pair's shared prompt once through the KV cache (its two "
    "completions then share it), sorting by length, and one batched pass for all layers.",
    "- No GPU figures: the GPU script (`bench/gpu.py`) needs a lent GPU machine.",
    "",
]


def render(results: Path = RESULTS) -> tuple[str, dict[str, str]]:
    """BENCHMARKS.md and the README's blocks (by name, markers included), from ``results``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    lines = [
        "# Benchmarks",
        "",
        "Written by `bench/report.py` from the newest committed result of each section in "
        "`bench/results/` (`make bench` runs every section, then the report); nothing here is "
        "edited by hand. Each section names its result file, the machine, the software and how "
        "busy the machine was: a section refuses to run, or to write its result, when other "
        "processes use more than 10% of the CPU (`bench/common.py`). Ratios are between "
        "variants measured side by side in one run, in interleaved rounds whose order rotates.",
        "",
    ]
    summary: list[str] = []
    for section in SECTIONS:
        found = latest(section, results)
        if found is not None:
            lines += RENDER[section](found[0], found[1], summary)
    lines += NOTES
    found = latest("vllm", results)
    table = vllm_table(found[1]) if found else ["No vLLM result committed yet."]
    blocks = {
        "bench": "\n".join([begin("bench"), *summary, end("bench")]),
        "bench-vllm": "\n".join([begin("bench-vllm"), *table, end("bench-vllm")]),
    }
    return "\n".join(lines), blocks


def main() -> None:
    text, blocks = render()
    readme = ROOT / "README.md"
    new = readme.read_text()
    for name, block in blocks.items():
        pattern = re.compile(re.escape(begin(name)) + ".*?" + re.escape(end(name)), re.DOTALL)
        if not pattern.search(new):
            sys.exit(f"error: README.md has no {name} block ({begin(name)} ... {end(name)})")
        new = pattern.sub(lambda _, block=block: block, new)
    (ROOT / "BENCHMARKS.md").write_text(text)
    readme.write_text(new)
    print("wrote BENCHMARKS.md and the README's benchmark blocks")


if __name__ == "__main__":
    main()
