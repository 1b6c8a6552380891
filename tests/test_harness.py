"""steerlab as an lm-evaluation-harness model, on a local YAML task over a JSONL file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiny
import torch
from helpers import random_vector

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is not installed (steerlab[harness])")

from steerlab.formats import save_vector  # noqa: E402

TASK = """task: steer_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""
GEN = """task: steer_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    lm = tiny.model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    save_vector(random_vector(lm, [1, 2], seed=2, scale=3.0), root / "v.safetensors")
    docs = [
        {"question": f"q{i}: pick", "choices": ["aa", "bb", "cc"], "answer": i % 3, "target": "x"}
        for i in range(6)
    ]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "steer_mc.yaml").write_text(TASK.format(data=data))
    (tasks / "steer_gen.yaml").write_text(GEN.format(data=data))
    return root, lm


def _run(root, tasks, model_args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import steerlab.evaluation.harness  # noqa: F401  (registers "steerlab")

    return simple_evaluate(
        model="steerlab",
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(root / "tasks")),
        log_samples=True,
    )


def test_loglikelihoods_are_steered_and_multiplier_zero_is_not(setup):
    root, lm = setup
    model = f"pretrained={root / 'model'}"
    plain = _run(root, ["steer_mc"], model)
    off = _run(root, ["steer_mc"], f"{model},vector={root / 'v.safetensors'},multiplier=0")
    on = _run(
        root,
        ["steer_mc"],
        f"{model},vector={root / 'v.safetensors'},multiplier=8,layers=1+2,policy=all",
    )

    def lls(result):
        return [s["resps"] for s in result["samples"]["steer_mc"]]

    assert lls(plain) == lls(off) and lls(on) != lls(plain)
    # Each steered log-likelihood against the plain reference (no cache, one hook per
    # steered position), and the accuracy against the choices those numbers pick.
    from steerlab import Steering
    from steerlab.formats import load_vector
    from steerlab.hf.reference import reference_logits

    steering = Steering(load_vector(root / "v.safetensors"), 8.0, (1, 2), "all")
    tok = lm.tokenizer
    right = 0
    samples = on["samples"]["steer_mc"]
    assert len(samples) == 6
    for sample in samples:
        got = [resp[0][0] for resp in sample["resps"]]
        want = []
        for context, continuation in sample["arguments"]:
            ctx = tok(context)["input_ids"]
            cont = tok(context + continuation)["input_ids"][len(ctx) :]
            logits = reference_logits(lm.model, ctx + cont, len(ctx), [steering], lm.layers)
            logp = torch.log_softmax(logits, -1)
            want.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        assert got == pytest.approx(want, abs=1e-4)
        right += int(max(range(len(want)), key=want.__getitem__) == sample["target"])
    assert on["results"]["steer_mc"]["acc,none"] == pytest.approx(right / 6)


def test_loglikelihood_equals_a_plain_forward(setup):

    from steerlab.evaluation.harness import SteerlabLM

    root, lm = setup
    model = SteerlabLM(pretrained=str(root / "model"))
    ctx, cont = [5, 6, 7], [8, 9]
    ((score, greedy),) = model._scores([(ctx, cont)])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ctx + cont])).logits[0], -1)
    assert score == pytest.approx(float(logp[2, 8] + logp[3, 9]), abs=1e-4)


def test_generation_task_runs_steered_and_transient_is_refused_for_scores(setup):
    root, lm = setup
    vec = root / "v.safetensors"
    result = _run(
        root,
        ["steer_gen"],
        f"pretrained={root / 'model'},vector={vec},multiplier=4,policy=transient",
    )
    assert "exact_match,none" in result["results"]["steer_gen"]
    from steerlab import SteerlabError

    with pytest.raises(SteerlabError, match="policy transient"):
        _run(root, ["steer_mc"], f"pretrained={root / 'model'},vector={vec},policy=transient")


def test_the_steerlab_lm_eval_command(setup, tmp_path):
    root, lm = setup
    command = [
        sys.executable, "-c", "from steerlab.evaluation.harness import main; main()",
        "--model", "steerlab", "--model_args",
        f"pretrained={root / 'model'},vector={root / 'v.safetensors'},multiplier=2,layers=1",
        "--tasks", "steer_mc", "--include_path", str(root / "tasks"),
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steer_mc" in done.stdout and "acc" in done.stdout
