"""Per-token projections, the contrast AUC, the HTML page, and explained decoding rows."""

from __future__ import annotations

import threading

import pytest
import tiny
import torch
from helpers import make_steering, random_vector

from steerlab.core.errors import SteerlabError
from steerlab.evaluation import pages
from steerlab.hf import projection
from steerlab.serving.batcher import Batcher, Job


@pytest.fixture(scope="module")
def lm():
    return tiny.model("llama")


def test_projection_is_the_block_output_on_the_unit_vector(lm):
    vec = random_vector(lm, [1, 2], seed=3)
    view = projection.token_projections(lm, "hello there, ocean", vec, 1)
    ids = lm.tokenizer("hello there, ocean")["input_ids"]
    out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    unit = vec.directions[1] / vec.directions[1].norm()
    want = (out.hidden_states[2][0] @ unit).tolist()
    assert len(view.values) == len(ids) == len(view.pieces)
    assert view.values == pytest.approx(want, abs=1e-5)
    assert "".join(view.pieces) == lm.tokenizer.decode(ids)
    page = pages.html_page(view)
    assert page.count('class="tok"') == len(ids)
    with pytest.raises(SteerlabError, match="no layer 0"):
        projection.token_projections(lm, "hi", vec, 0)


def test_auc_counts_ties_half():
    assert projection.auc([2.0, 3.0], [1.0, 0.0]) == 1.0
    assert projection.auc([0.0], [1.0]) == 0.0
    assert projection.auc([1.0], [1.0]) == 0.5


def test_explained_rows_get_kl_and_changes_before_done(lm):
    batcher = Batcher(lm, max_batch=4)
    events: list[list[tuple[str, object]]] = [[], []]
    done = threading.Event()
    finished = [0]

    def emitter(r):
        def emit(kind, value):
            events[r].append((kind, value))
            if kind in ("done", "error"):
                finished[0] += 1
                if finished[0] == 2:
                    done.set()

        return emit

    ids = lm.tokenizer("the sea is")["input_ids"]
    steering = [make_steering(lm, "after-prompt", 4.0)]
    jobs = [
        Job(ids, s, 6, 0.0, 1.0, None, emitter(r), explain=3) for r, s in enumerate([[], steering])
    ]
    batcher.submit(jobs)
    assert done.wait(60)
    batcher.close()
    for r in range(2):
        kinds = [k for k, _ in events[r]]
        assert kinds[-2:] == ["explain", "done"], kinds
        tokens = kinds.count("token")
        info = dict(events[r])["explain"]
        assert len(info["kl"]) == tokens and len(info["top"]) == tokens
        assert all(len(t) == 3 for t in info["top"])
    assert all(k == pytest.approx(0.0, abs=1e-6) for k in dict(events[0])["explain"]["kl"])
    assert max(dict(events[1])["explain"]["kl"]) > 0.0


def test_a_group_over_the_batch_or_mixing_settings_is_refused(lm):
    batcher = Batcher(lm, max_batch=2)
    try:
        ids = [1, 2]
        rows = [Job(ids, [], 2, 0.0, 1.0, None, lambda *a: None) for _ in range(3)]
        with pytest.raises(ValueError, match="group"):
            batcher.submit(rows)
        mixed = [rows[0], Job(ids, [], 2, 0.5, 1.0, None, lambda *a: None)]
        with pytest.raises(ValueError, match="group"):
            batcher.submit(mixed)
    finally:
        batcher.close()
