"""The playground's API: the multiplier row (/v1/steerlab/compare) and the sweep panel."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import tiny
from helpers import random_vector, start_server

from steerlab import SteerlabError
from steerlab.evaluation.sweep_summary import SWEEP_PLOTS, read_sweep
from steerlab.formats import save_vector
from steerlab.serving.app import Limits, create_app, load_vectors
from steerlab.serving.service import ApiError, Service

MESSAGES = [{"role": "user", "content": "tell me about the sea"}]


def write_sweep(out, lm=None, bound=2.0):
    """A finished sweep's files: the table, the manifest and the plots (real PNGs)."""
    from steerlab.evaluation.plots import sweep_plots

    rows = [
        {"layer": layer, "multiplier": m, "policy": "after-prompt", "behaviour": b, "fluency": f}
        for layer, m, b, f in [
            (1, 0.0, 0.2, 10.0),
            (1, 4.0, 0.5, 12.0),
            (1, 8.0, 0.9, 30.0),  # too disfluent for the rule
            (2, 0.0, 0.2, 10.0),
            (2, 4.0, 0.6, 15.0),
            (2, 8.0, float("nan"), 11.0),
        ]
    ]
    for r in rows:
        r["kl"] = float("nan")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows))
    (out / "manifest.json").write_text(json.dumps({"sweep": {"perplexity_bound": bound}}))
    sweep_plots(rows, out, "behaviour")
    if lm is not None:
        save_vector(random_vector(lm, [1, 2], seed=9, scale=2.0), out / "vector.safetensors")
    return out


@pytest.fixture(scope="module")
def lm():
    return tiny.model("llama")


@pytest.fixture(scope="module")
def served(lm, tmp_path_factory):
    vdir = tmp_path_factory.mktemp("vectors")
    save_vector(random_vector(lm, [1, 2], seed=1, scale=2.0), vdir / "joy.safetensors")
    sweep = read_sweep(write_sweep(tmp_path_factory.mktemp("sweep")))
    app = create_app(
        lm, load_vectors(vdir, lm), Limits(max_tokens=64, max_batch=8), "tiny", sweep=sweep
    )
    base, stop = start_server(app)
    yield base
    stop()


def compare(base, **body):
    """POST a compare request; returns (status, events) with each SSE data object parsed."""
    body = {"messages": MESSAGES, "max_tokens": 10, **body}
    with httpx.stream("POST", base + "/v1/steerlab/compare", json=body, timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append("[DONE]" if data == "[DONE]" else json.loads(data))
        return 200, events


def test_a_row_of_multipliers_streams_as_one_batch_and_matches_single_requests(served):
    status, events = compare(
        served, steering={"vector": "joy", "layers": [1]}, multipliers=[-8, 0, 8]
    )
    assert status == 200 and events[-1] == "[DONE]"
    head = events[0]
    assert head["object"] == "steerlab.compare"
    assert [r["multiplier"] for r in head["rows"]] == [-8, 0, 8]
    texts = {
        r: "".join(e.get("delta", "") for e in events[1:-1] if e.get("row") == r) for r in range(3)
    }
    reasons = {e["row"]: e["finish_reason"] for e in events[1:-1] if "finish_reason" in e}
    assert set(reasons) == {0, 1, 2} and not any("explain" in e for e in events[1:-1])
    assert len(set(texts.values())) == 3  # the multiplier changes the text
    # each row is exactly what a lone request with that steering makes (greedy)
    for r, m in enumerate([-8, 0, 8]):
        steering = [] if m == 0 else [{"vector": "joy", "multiplier": m, "layers": [1]}]
        alone = httpx.post(
            served + "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 10, "steering": steering},
            timeout=60,
        ).json()
        assert alone["choices"][0]["message"]["content"] == texts[r], m


def test_explained_rows_carry_each_tokens_text_kl_and_changes(served):
    status, events = compare(
        served, steering={"vector": "joy"}, multipliers=[0, 6], explain=3, max_tokens=8
    )
    assert status == 200
    for r in (0, 1):
        row = [e for e in events[1:-1] if e.get("row") == r]
        kinds = [next(k for k in ("delta", "explain", "finish_reason") if k in e) for e in row]
        assert kinds[-1] == "finish_reason" and "explain" in kinds
        info = next(e["explain"] for e in row if "explain" in e)
        text = "".join(e.get("delta", "") for e in row)
        assert "".join(info["pieces"]) == text  # the pieces are the text, token by token
        assert len(info["pieces"]) == len(info["kl"]) == len(info["top"]) == 8
        assert all(len(t) == 3 for t in info["top"])
        assert all(set(c) == {"token", "steered", "unsteered"} for t in info["top"] for c in t)
        if r == 0:
            assert max(info["kl"]) == pytest.approx(0.0, abs=1e-6)
        else:
            assert max(info["kl"]) > 0.0
            # the first change of the first token: its probability moved, one way or the other
            first = info["top"][0][0]
            assert first["steered"] != pytest.approx(first["unsteered"])


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"steering": {"vector": "joy"}}, 400, "'multipliers' must be a list of 1 to 8"),
        ({"steering": {"vector": "joy"}, "multipliers": list(range(9))}, 400, "1 to 8"),
        ({"steering": {"vector": "joy"}, "multipliers": [1, "x"]}, 400, "'multipliers[1]'"),
        ({"steering": {"vector": "joy"}, "multipliers": [1e9]}, 400, "'multipliers[0]'"),
        ({"steering": [{"vector": "joy"}], "multipliers": [1]}, 400, "must be one object"),
        (
            {"steering": {"vector": "joy", "multiplier": 2}, "multipliers": [1]},
            400,
            "takes no multiplier",
        ),
        ({"steering": {"vector": "nope"}, "multipliers": [0]}, 404, "unknown vector 'nope'"),
        ({"steering": {"vector": "joy", "layers": [3]}, "multipliers": [0, 1]}, 400, "no layer 3"),
        ({"steering": {"vector": "joy"}, "multipliers": [1], "explain": 99}, 400, "'explain'"),
        ({"steering": {"vector": "joy"}, "multipliers": [1], "max_tokens": 10**6}, 400, "limit"),
        ({"steering": {"vector": "joy"}, "multipliers": [1], "messages": []}, 400, "'messages'"),
    ],
)
def test_bad_compare_requests_get_4xx_naming_the_field(served, body, status, message):
    got, answer = compare(served, **body)
    assert got == status, answer
    assert message in answer["error"]["message"], answer


def test_an_engine_without_the_unsteered_twin_refuses_explain(lm, monkeypatch):
    service = Service(lm, {"joy": random_vector(lm, [1])}, Limits())
    try:
        body = {"messages": MESSAGES, "steering": {"vector": "joy"}, "multipliers": [1]}
        assert service.compare({**body, "explain": 2}).explain == 2
        from steerlab.core.engine import Capabilities

        monkeypatch.setattr(type(lm), "capabilities", Capabilities(explain=False))
        with pytest.raises(ApiError, match="explain 0, or serve with the Hugging Face engine"):
            service.compare({**body, "explain": 2})
        assert service.compare(body).explain == 0  # unexplained rows still run
    finally:
        service.runner.close()


def test_the_sweep_endpoint_gives_the_recommendation_and_the_plots(served):
    sweep = httpx.get(served + "/v1/steerlab/sweep").json()
    best = sweep["recommendation"]
    # layer 2 x4 raises behaviour most (+0.4) within 2x the unsteered fluency; 1 x8 is too disfluent
    assert (best["layer"], best["multiplier"]) == (2, 4.0)
    assert best["shift"] == pytest.approx(0.4) and sweep["perplexity_bound"] == 2.0
    assert [p["name"] for p in sweep["plots"]] == list(SWEEP_PLOTS)
    assert all(p["src"].startswith("data:image/png;base64,") for p in sweep["plots"])
    assert any(r["behaviour"] is None for r in sweep["rows"])  # NaN is null, valid JSON
    assert sweep["vector"] is None


def test_without_a_sweep_the_endpoint_is_404(lm):
    app = create_app(lm, {}, Limits())
    base, stop = start_server(app)
    try:
        r = httpx.get(base + "/v1/steerlab/sweep")
        assert r.status_code == 404 and "--sweep-dir" in r.json()["error"]["message"]
    finally:
        stop()


def test_read_sweep_refuses_a_folder_without_a_finished_sweep(tmp_path):
    with pytest.raises(SteerlabError, match="holds no finished sweep"):
        read_sweep(tmp_path)
    (tmp_path / "results.json").write_text("[{}]")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(SteerlabError, match="unreadable sweep results"):
        read_sweep(tmp_path)


def test_read_sweep_recommendation_skips_nan_and_disfluent_cells(tmp_path):
    summary = read_sweep(write_sweep(tmp_path, bound=1.25))
    assert summary.recommendation is not None
    assert (summary.recommendation["layer"], summary.recommendation["multiplier"]) == (1, 4.0)
    assert not math.isnan(summary.recommendation["behaviour"])
    assert sorted(summary.plots) == sorted(SWEEP_PLOTS) and summary.vector is None
