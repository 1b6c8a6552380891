"""Policies at equal behaviour shift: the interpolation, the bootstrap readings, the files,
the CLI, and bad input refused before any model work."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import tiny
import torch
from helpers import random_vector

from steerlab import SteerlabError
from steerlab.evaluation.frontier import (
    FrontierConfig,
    read_at,
    read_policies,
    reliable_shift,
    run_frontier,
    unconditional,
)
from steerlab.evaluation.judges import casual, keywords
from steerlab.formats import save_vector

PROMPTS = ("the cat", "a dog ran", "hello there friend", "rain", "sun and sea", "ok")
JUDGE = keywords(["e", "a"])


def _steered_letters(texts):
    """Share of characters among those the tiny model's steered completions favour."""
    return [sum(ch in "YvCb" for ch in t) / max(len(t), 1) for t in texts]


def test_read_at_interpolates_at_the_first_crossing_and_is_nan_when_never_reached():
    shift = torch.tensor([[0.0, 0.2, 0.6, 0.4], [0.0, 0.1, 0.2, 0.3], [0.0, 0.5, 1.0, 1.5]])
    value = torch.tensor([[1.0, 2.0, 4.0, 9.0], [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]])
    got = read_at(shift, value, 0.4)
    assert got[0].item() == pytest.approx(3.0)  # halfway from 0.2 to 0.6, not the later 0.4
    assert math.isnan(got[1].item())
    assert got[2].item() == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"multipliers": (2.0, -2.0)}, "one sign"),
        ({"multipliers": (0.0,)}, "nonzero multipliers"),
        ({"multipliers": (float("inf"),)}, "finite"),
        ({"policies": ("actadd",)}, "actadd"),
        ({"policies": ("sideways",)}, "unknown policy"),
        ({"direction": "up"}, "--direction"),
        ({"shift": -1.0}, "--shift"),
        ({"policies": ()}, "at least one policy"),
    ],
)
def test_bad_frontier_settings_are_refused(kwargs, message):
    with pytest.raises(SteerlabError, match=message):
        FrontierConfig(layer=1, **kwargs)


def test_frontier_cells_readings_and_files(tmp_path):
    lm = tiny.model("llama")
    vector = random_vector(lm, [1])
    config = FrontierConfig(layer=1, multipliers=(4.0, 8.0), max_new_tokens=6, batch_rows=12)
    result = run_frontier(lm, vector, PROMPTS, _steered_letters, config, tmp_path, resamples=200)
    cells = result["cells"]
    assert [c["policy"] for c in cells] == ["unsteered"] + [
        p for p in ("after-prompt", "transient", "all") for _ in (4.0, 8.0)
    ]
    base = cells[0]
    assert base["shift"] == 0.0 and base["kl"] == pytest.approx(0.0, abs=1e-6)
    for c in cells:
        for key in ("shift", "kl", "perplexity", "distinct2"):
            assert c[f"{key}_lo"] - 1e-9 <= c[key] <= c[f"{key}_hi"] + 1e-9
    for name in ("frontier.md", "frontier.png", "frontier.csv", "frontier.json"):
        assert (tmp_path / name).is_file()
    assert result["shift"] is not None and result["shift"] > 0, result["reliable_reach"]
    assert [r["policy"] for r in result["readings"]] == ["after-prompt", "transient", "all"]
    for r in result["readings"]:
        assert 0.0 <= r["reached"] <= 1.0
        for key in ("multiplier", "kl", "perplexity", "distinct2"):
            point, lo, hi = r[key]
            assert not any(math.isnan(x) for x in (lo, hi)), (r["policy"], key, r[key])
            assert math.isnan(point) or lo - 1e-9 <= point <= hi + 1e-9, (key, r[key])
        point = r["multiplier"][0]
        assert math.isnan(point) or 0 < point <= 8.0
    assert "kl_minus_after-prompt" in result["readings"][1]
    assert "## Costs at shift" in (tmp_path / "frontier.md").read_text()


def _synthetic(resamples: int = 1000, miss: float = 0.1):
    """Three cells per policy (baseline, x1, x2); policy b misses the shift 0.5 in a share
    ``miss`` of the resamples (its shift stays at 0.3 there)."""
    gen = torch.Generator().manual_seed(0)
    shift = torch.zeros(resamples, 5, dtype=torch.float64)
    shift[:, 1], shift[:, 2] = 0.4, 1.0  # policy a: baseline, 1, 2 -> reaches 0.5 always
    missing = torch.rand(resamples, generator=gen) < miss
    shift[:, 3] = 0.4
    shift[:, 4] = torch.where(missing, 0.3, 1.2)  # policy b: misses 0.5 in `miss` of them
    cost = torch.tensor([0.0, 1.0, 2.0, 1.0, 3.0], dtype=torch.float64).expand(resamples, -1)
    boot = {"shift": shift, "kl": cost, "perplexity": cost + 1, "distinct2": cost}
    full = {k: v[:1] for k, v in boot.items()}
    full["shift"] = torch.tensor([[0.0, 0.4, 1.0, 0.4, 1.2]], dtype=torch.float64)
    paths = {"a": [0, 1, 2], "b": [0, 3, 4]}
    return full, boot, paths, missing


def test_a_resample_that_never_reaches_the_shift_counts_and_is_never_dropped():
    full, boot, paths, missing = _synthetic(miss=0.1)
    a, b = read_policies(full, boot, paths, (0.0, 1.0, 2.0), 0.5)
    assert a["reached"] == 1.0 and b["reached"] == pytest.approx(1 - float(missing.double().mean()))
    # a: halfway... 0.4 -> 1.0 at 0.5 is 1/6 of the way from cost 1 to 2
    assert a["kl"] == pytest.approx([1 + 1 / 6] * 3)
    # b misses in 10% of resamples: its upper end is unbounded, not the 90% that reached
    assert b["kl"][2] == math.inf and math.isfinite(b["kl"][1])
    assert b["kl_minus_a"][2] == math.inf
    assert all(not math.isnan(x) for r in (a, b) for k in ("kl", "multiplier") for x in r[k])


def test_unconditional_intervals_and_the_reliable_shift():
    values = torch.tensor([1.0, 2.0, 3.0, float("inf")] * 25, dtype=torch.float64)
    assert unconditional(values, 2.0) == [2.0, 1.0, math.inf]  # 25% infinite
    both_missed = torch.tensor([float("nan")] + [0.5] * 99, dtype=torch.float64)
    assert unconditional(both_missed, 0.5) == [0.5, 0.5, 0.5]  # 1% counts at both ends
    many = torch.tensor([float("nan")] * 5 + [0.5] * 95, dtype=torch.float64)
    assert unconditional(many, 0.5) == [0.5, -math.inf, math.inf]
    reach = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    assert reliable_shift(reach) == pytest.approx(0.025)
    assert float((reach >= reliable_shift(reach)).double().mean()) >= 0.975
    # read at that shift, the upper end of the interval stays finite
    for count in (200, 1000, 999):
        reach = torch.rand(count, generator=torch.Generator().manual_seed(count))
        target = reliable_shift(reach)
        costs = torch.where(reach >= target, 1.0, math.inf).double()
        assert math.isfinite(unconditional(costs, 1.0)[2]), count


def test_an_explicit_shift_that_no_policy_reaches_reads_nothing(tmp_path):
    lm = tiny.model("llama")
    vector = random_vector(lm, [1])
    config = FrontierConfig(
        layer=1, multipliers=(2.0,), policies=("after-prompt",), shift=1e9, max_new_tokens=4
    )
    result = run_frontier(lm, vector, PROMPTS, JUDGE, config, tmp_path, resamples=50)
    (reading,) = result["readings"]
    assert reading["reached"] == 0.0 and math.isnan(reading["kl"][0])
    assert "not reached" in (tmp_path / "frontier.md").read_text()


def test_casual_judge_scores_register():
    judge = casual()
    formal, informal = judge(
        [
            "The meeting shall therefore commence at nine; kindly ensure you are punctual.",
            "Hey, it's gonna be super cool, don't be late!",
        ]
    )
    assert informal > 0 > formal


def test_cli_frontier_writes_the_report_and_refuses_bad_input_first(tmp_path):
    lm = tiny.model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    vec = tmp_path / "v.safetensors"
    save_vector(random_vector(lm, [1]), vec)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "steerlab.cli", "compare-policies", "--vector", str(vec), *args],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    out = tmp_path / "f"
    r = run(
        "--layer", "1", "--model", str(tmp_path / "model"), "--frontier", "--multipliers",
        "3,6", "--policies", "after-prompt,all", "--prompts", str(prompts), "--keywords",
        "e,a", "-n", "4", "--allow-model-mismatch", "-o", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "frontier.md").is_file() and "wrote" in r.stdout
    assert json.loads((out / "frontier-readings.json").read_text())["layer"] == 1
    for args, message in [
        (("--multipliers", "2,-2"), "one sign"),
        (("--policies", "after-prompt,sideways"), "unknown policy"),
        (("--direction", "up"), "--direction"),
        (("--ab-dataset", str(prompts)), "--ab-dataset is not part of --frontier"),
    ]:
        r = run("--layer", "1", "--model", "/no/such/model", "--frontier", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert message in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["casual", "weddings"])
def test_shipped_frontier_datasets_are_pairs_of_24_or_more(name):
    from steerlab.core.dataset import load_dataset
    from steerlab.core.files import sentiment_dataset_path

    data = load_dataset(sentiment_dataset_path().with_name(f"{name}.jsonl"))
    assert data.format == "pairs" and len(data.pairs) >= 24
    assert len({p.prompt for p in data.pairs}) >= 24
