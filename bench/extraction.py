"""Extraction throughput: steerlab against steering-vectors, repeng and a naive loop.

Run in .venv-bench (``make bench``: transformers 4.57, which steering-vectors and repeng
need). The default model in fp32 on the CPU, 64 A/B pairs of the model-written-evals
``corrigible-neutral-HHH`` set, batch 16 for every tool that batches, one layer (10) and
all 30 layers. Every tool runs the same number of times (``BENCH_ROUNDS``, default 3) in
interleaved rounds whose order rotates, so drift in the machine's speed hits every tool
alike; a tool's figure is its median round. The vectors are checked against
steering-vectors' (cosine). Writes ``bench/results/extraction-<date>.json``.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, THREADS, Quiet, rounds, write_result  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "model-written-evals" / "advanced-ai-risk"
DATA = DATA / "corrigible-neutral-HHH.jsonl"
PAIRS = int(os.environ.get("BENCH_PAIRS", "64"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BATCH = 16
LAYER = 10


def main() -> None:
    import repeng
    import steering_vectors as sv

    import steerlab
    from steerlab.core.dataset import load_dataset
    from steerlab.core.prompts import render
    from steerlab.hf.extraction import build_items, extract

    if not DATA.is_file():
        sys.exit(f"error: the extraction benchmark needs {DATA} (../shared/datasets)")
    torch.set_num_threads(THREADS)
    lm = steerlab.load_model("smollm2-135m", device="cpu", dtype="float32")
    data = load_dataset(DATA).subset(list(range(PAIRS)))
    items, _ = build_items(lm, data)
    texts: list[tuple[str, str]] = []
    offsets: dict[str, int] = {}
    bos = lm.tokenizer.bos_token or ""
    for p, ip, ineg in zip(data.pairs, items[::2], items[1::2], strict=True):
        pair = []
        for completion, item in ((p.positive, ip), (p.negative, ineg)):
            text = render(lm.tokenizer, p.prompt or "", assistant_prefix=completion).text
            # Peers tokenise raw strings with special tokens; where that adds a BOS the
            # template already has, hand them the text without it so both read the same ids.
            if lm.tokenizer(text)["input_ids"] != item.ids and bos and text.startswith(bos):
                text = text[len(bos) :]
            assert lm.tokenizer(text)["input_ids"] == item.ids, "peers would see other tokens"
            pair.append(text)
            offsets[text] = item.start - len(item.ids)  # negative index: robust to a BOS
        texts.append((pair[0], pair[1]))
    model, tok = lm.model, lm.tokenizer
    entries = [repeng.DatasetEntry(positive=a, negative=b) for a, b in texts]
    out: dict[str, Any] = {"pairs": PAIRS, "batch_size": BATCH, "rounds": ROUNDS}
    with Quiet("extraction") as quiet:
        for label, layers in (("one layer", [LAYER]), ("all layers", list(range(30)))):
            vectors: dict[str, Any] = {}

            def ours(layers: list[int] = layers) -> None:
                vectors["steerlab"] = extract(lm, data, layers, batch_size=BATCH)

            def steering_vectors(layers: list[int] = layers) -> None:
                vectors["steering-vectors"] = sv.train_steering_vector(
                    model, tok, texts, layers=layers, read_token_index=lambda s: offsets[s],
                    batch_size=BATCH, show_progress=False,
                )  # fmt: skip

            def repeng_pca(layers: list[int] = layers) -> None:
                repeng.ControlVector.train(
                    model, tok, entries, hidden_layers=layers, batch_size=BATCH
                )

            def naive(layers: list[int] = layers) -> None:
                # the CAA code's loop: one sequence at a time, every hidden state returned
                with torch.no_grad():
                    for item in items:
                        hs = model(torch.tensor([item.ids]), output_hidden_states=True)
                        for layer in layers:
                            hs.hidden_states[layer + 1][0, item.start].clone()

            tools = {
                "steerlab": ours,
                "steering-vectors": steering_vectors,
                "repeng (pca_diff)": repeng_pca,
                "naive loop (CAA code)": naive,
            }
            times = rounds(tools, ROUNDS)
            cosine = min(
                float(
                    torch.nn.functional.cosine_similarity(
                        vectors["steerlab"].directions[layer],
                        vectors["steering-vectors"].layer_activations[layer].float(),
                        dim=0,
                    )
                )
                for layer in layers
            )
            out[label] = {
                "seconds": times,
                "pairs_per_s": {name: PAIRS / statistics.median(t) for name, t in times.items()},
                "min_cosine_vs_steering_vectors": cosine,
            }
            print(label, {k: round(v, 2) for k, v in out[label]["pairs_per_s"].items()}, flush=True)
    write_result("extraction", out, quiet)


if __name__ == "__main__":
    main()
