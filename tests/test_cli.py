"""The command line: real subprocesses, exit codes, one-line errors and no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiny


def run(*args: str, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "steerlab.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def assert_error(result, message: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr.replace("\n", " "), result.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    lm = tiny.model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    data = root / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}", "positive": "yes good", "negative": "no bad"}) + "\n"
            for i in range(8)
        )
    )
    return root


@pytest.fixture(scope="module")
def vector(workspace):
    out = workspace / "vec.safetensors"
    result = run(
        "extract",
        str(workspace / "pairs.jsonl"),
        "--model",
        str(workspace / "model"),
        "--layers",
        "1-3",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and out.is_file()
    return out


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("info", "extract", "generate", "vector"):
        assert command in result.stdout


def test_info_json(workspace):
    result = run("info", str(workspace / "model"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "llama" and info["num_layers"] == 4 and info["hidden_size"] == 32
    assert info["chat_template"] is True and info["dtype"] == "float32" and info["device"] == "cpu"


def test_vector_show_and_gguf_round_trip(workspace, vector):
    shown = run("vector", "show", str(vector), "--json")
    assert shown.returncode == 0, shown.stderr
    meta = json.loads(shown.stdout)
    assert (
        meta["layers"] == [1, 2, 3]
        and meta["method"] == "mean-diff"
        and set(meta["norms"]) == {"1", "2", "3"}
    )
    gguf = workspace / "vec.gguf"
    assert run("vector", "export-gguf", str(vector), "-o", str(gguf)).returncode == 0
    back = workspace / "back.safetensors"
    result = run("vector", "import-gguf", str(gguf), "-o", str(back))
    assert result.returncode == 0 and "layers 1,2,3" in result.stdout
    assert run("vector", "show", str(back)).returncode == 0


def test_generate_json_and_table(workspace, vector):
    result = run(
        "generate",
        "hello",
        "--model",
        str(workspace / "model"),
        "--vector",
        str(vector),
        "--layer",
        "2",
        "-x",
        "4",
        "-x",
        "-4",
        "-n",
        "6",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [c["multiplier"] for c in payload["completions"]] == [0.0, 4.0, -4.0]
    assert payload["layers"] == [2] and payload["policy"] == "after-prompt"
    table = run(
        "generate",
        "hello",
        "--model",
        str(workspace / "model"),
        "--vector",
        str(vector),
        "-n",
        "4",
        "--policy",
        "transient",
    )
    assert table.returncode == 0 and "unsteered" in table.stdout


def test_generate_with_ablate_and_clamp(workspace, vector):
    base = ["generate", "hello", "--model", str(workspace / "model"), "--vector", str(vector)]
    ablated = run(*base, "--layer", "2", "--operator", "ablate", "-n", "6", "--json")
    assert ablated.returncode == 0, ablated.stderr
    payload = json.loads(ablated.stdout)
    assert payload["operator"] == "ablate"
    assert [c["multiplier"] for c in payload["completions"]] == [0.0, 1.0]
    clamped = run(*base, "--operator", "clamp", "--clamp", "2,2", "-n", "4")
    assert clamped.returncode == 0 and "clamped" in clamped.stdout
    for extra, message in [
        (["--operator", "clamp", "--clamp", "3,1"], "lo > hi"),
        (["--operator", "clamp", "--clamp", "x"], "is not two numbers"),
        (["--operator", "clamp"], "needs clamp"),
        (["--operator", "spin"], "unknown operator 'spin'"),
        (["--operator", "ablate", "-x", "4"], "add only"),
    ]:
        bad = run(*base, *extra, "-n", "2")
        assert bad.returncode != 0 and message in bad.stderr, (extra, bad.stderr)
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_extract_and_generate_at_the_mlp_site(workspace, tmp_path):
    model = str(workspace / "model")
    mlp = tmp_path / "mlp.safetensors"
    made = run("extract", str(workspace / "pairs.jsonl"), "--model", model, "--layers", "1,2",
               "--site", "mlp", "-o", str(mlp))  # fmt: skip
    assert made.returncode == 0 and "(mlp output)" in made.stdout, made.stderr
    shown = json.loads(run("vector", "show", str(mlp), "--json").stdout)
    assert shown["layer_convention"] == "mlp-output"
    gen = run("generate", "hello", "--model", model, "--vector", str(mlp), "-n", "4", "--json")
    assert gen.returncode == 0, gen.stderr
    assert_error(run("extract", str(workspace / "pairs.jsonl"), "--model", model, "--site",
                     "ffn", "-o", str(tmp_path / "x.safetensors")), "unknown site 'ffn'")  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists()
    assert_error(run("vector", "export-gguf", str(mlp), "-o", str(tmp_path / "m.gguf")),
                 "extract it with --site block")  # fmt: skip
    assert_error(run("generate", "hi", "--model", model, "--vector", str(mlp), "--site", "x"),
                 "unknown site 'x'")  # fmt: skip


def test_sweep_with_axes_direction_and_prompts(workspace, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nhello there\n\nrain today\nok\n")
    out = tmp_path / "sweep"
    result = run(
        "sweep", str(workspace / "pairs.jsonl"), "--model", str(workspace / "model"),
        "--layers", "1,2", "--multipliers", "-2,0,2", "--policies", "after-prompt,all",
        "--contexts", "chat,raw", "--direction", "decrease", "--prompts", str(prompts),
        "--keywords", "e,a", "-n", "4", "--perplexity-bound", "1000000", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 * 3 * 2 * 2 and {r["n_test"] for r in rows} == {4}
    report = (out / "report.md").read_text()
    assert "the largest decrease in behaviour" in report and "[95% CI]" in report
    assert (out / "vector-raw.safetensors").is_file()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    model = ["--model", str(workspace / "model"), "--keywords", "e"]
    for extra, message in [
        (["--direction", "up"], "--direction must be increase or decrease"),
        (["--contexts", "html"], "--contexts takes chat, raw"),
        (["--prompts", str(empty)], "holds no prompts"),
        (["--policies", "sideways"], "unknown policy"),
    ]:
        assert_error(run("sweep", str(workspace / "pairs.jsonl"), *model, *extra), message)


def test_extract_bipo_writes_the_vector_and_its_curve(workspace, tmp_path):
    out = tmp_path / "bipo.safetensors"
    base = ["extract", str(workspace / "pairs.jsonl"), "--model", str(workspace / "model")]
    result = run(*base, "--method", "bipo", "--layers", "2", "--steps", "6", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "bipo, layer 2, 6 steps" in result.stdout
    curve = json.loads(out.with_suffix(".bipo.json").read_text())
    assert len(curve["loss"]) == 6 and curve["steps"] == 6 and curve["seed"] == 0
    assert out.with_suffix(".bipo.png").is_file()
    shown = json.loads(run("vector", "show", str(out), "--json").stdout)
    assert shown["method"] == "bipo" and shown["layers"] == [2]
    for extra, message in [
        (["--layers", "1,2"], "trains one layer"),
        (["--layers", "2", "--lr", "0"], "learning rate must be a positive"),
        (["--layers", "2", "--steps", "0"], "at least 1 step"),
    ]:
        target = tmp_path / "bad.safetensors"
        assert_error(run(*base, "--method", "bipo", *extra, "-o", str(target)), message)
        assert not target.exists()
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "Q", "positive": "yes", "negative": "no"}) + "\n")
    assert_error(
        run("extract", str(one), "--model", str(workspace / "model"), "--method", "bipo",
            "--layers", "2", "-o", str(tmp_path / "x.safetensors")),
        "at least 2 pairs",
    )  # fmt: skip


def test_condition_fit_and_generate_with_it(workspace, vector, tmp_path):
    labelled = tmp_path / "labelled.jsonl"
    lines = [{"text": f"yes good {i}", "label": 1} for i in range(6)]
    lines += [{"text": f"no bad {i}", "label": 0} for i in range(6)]
    labelled.write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = str(workspace / "model")
    cond = tmp_path / "cond.json"
    fitted = run(
        "condition", "fit", str(labelled), "-v", str(vector), "-l", "2", "--model", model,
        "-o", str(cond), "--json",
    )  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    payload = json.loads(fitted.stdout)
    assert payload["positives"] == 6 and payload["negatives"] == 6
    assert 0.5 <= payload["accuracy"] <= 1.0 and json.loads(cond.read_text()) == payload
    base = ["generate", "hello", "--model", model, "--vector", str(vector), "-n", "4", "--json"]
    gated = run(*base, "--condition", str(cond))
    assert gated.returncode == 0, gated.stderr
    assert [c["multiplier"] for c in json.loads(gated.stdout)["completions"]] == [0.0, 4.0]
    for args, message in [
        (["condition", "fit", str(labelled), "-v", str(vector), "-l", "7", "--model", model],
         "has no layer 7"),
        (["condition", "fit", str(workspace / "pairs.jsonl"), "-v", str(vector), "-l", "2",
          "--model", model, "--reduce", "max"], "--reduce 'max'"),
        ([*base, "--condition", str(tmp_path / "none.json")], "no such condition file"),
        ([*base, "--condition", str(labelled)], "not a condition file"),
    ]:  # fmt: skip
        assert_error(run(*args), message)


def test_bad_inputs_are_one_line_errors(workspace, vector, tmp_path):
    model = str(workspace / "model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a"}\n{oops\n')
    out = tmp_path / "v.safetensors"
    r = run("extract", str(bad), "--model", model, "-o", str(out))
    assert_error(r, "2 problems in dataset")
    assert (
        "bad.jsonl:1: field 'negative' is missing" in r.stderr
        and "bad.jsonl:2: invalid JSON" in r.stderr
    )
    assert not out.exists()
    assert_error(
        run(
            "extract",
            str(workspace / "pairs.jsonl"),
            "--model",
            model,
            "--layers",
            "9",
            "-o",
            str(out),
        ),
        "layer 9 does not exist",
    )
    assert not out.exists()
    assert_error(
        run("extract", str(tmp_path / "none.jsonl"), "--model", model, "-o", str(out)),
        "does not exist",
    )
    assert_error(
        run(
            "extract",
            str(workspace / "pairs.jsonl"),
            "--model",
            model,
            "--method",
            "svm",
            "-o",
            str(out),
        ),
        "unknown method 'svm'",
    )
    assert_error(run("info", "no-such-alias-dir/x/y"), "does not exist")
    pickle_file = tmp_path / "v.pt"
    pickle_file.write_bytes(b"\x80\x04junk")
    assert_error(run("vector", "show", str(pickle_file)), "never loads")
    assert_error(
        run("generate", "hi", "--model", model, "--vector", str(vector), "--layer", "0"),
        "has no layer 0",
    )
    assert_error(
        run("generate", "hi", "--model", model, "--vector", str(vector), "--policy", "actadd"),
        "position-wise",
    )
    assert_error(
        run(
            "generate",
            "hi",
            "--model",
            model,
            "--vector",
            str(vector),
            "--policy",
            "from-marker:ZZZ",
        ),
        "does not occur",
    )
    assert_error(
        run("generate", "hi", "--model", model, "--vector", str(vector), "-x", "nan"), "finite"
    )
    assert_error(
        run("vector", "export-gguf", str(vector), "-o", str(tmp_path / "x.gguf"), "--bogus"),
        "No such option",
    )
    other = tiny.model("llama", seed=5)
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    assert_error(
        run("generate", "hi", "--model", str(tmp_path / "other"), "--vector", str(vector)),
        "--allow-model-mismatch",
    )
    ok = run(
        "generate",
        "hi",
        "--model",
        str(tmp_path / "other"),
        "--vector",
        str(vector),
        "--allow-model-mismatch",
        "-n",
        "3",
    )
    assert ok.returncode == 0 and "transferring" in ok.stderr


def test_hardening_cases_are_one_line_errors_before_model_work(workspace, vector, tmp_path):
    """Outputs under a file, non-UTF-8 prompt files, directories as datasets, overflowing
    multipliers and an exposed bind address: a one-line error (or warning), no traceback."""
    model = str(workspace / "model")
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run(
        "extract",
        str(workspace / "pairs.jsonl"),
        "--model",
        "/no/such/model",
        "-o",
        str(afile / "x.safetensors"),
    )
    assert_error(r, "is a file, not a directory")  # refused before the (missing) model loads
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    r = run(
        "compare-policies",
        "--vector",
        str(vector),
        "--layer",
        "1",
        "--model",
        "/no/such/model",
        "--prompts",
        str(latin),
    )
    assert_error(r, "is not UTF-8")
    r = run("extract", str(tmp_path), "--model", model, "-o", str(tmp_path / "v.safetensors"))
    assert_error(r, "is a directory")
    r = run(
        "generate",
        "hi",
        "--model",
        model,
        "--vector",
        str(vector),
        "--layer",
        "1",
        "-x",
        "1e308",
        "--json",
    )
    assert_error(r, "overflows float32")
    vdir = tmp_path / "vectors"
    vdir.mkdir()
    r = run("serve", "--vectors", str(vdir), "--host", "0.0.0.0", "--model", "/no/such/model")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "warning: binding to 0.0.0.0 without an API key" in r.stderr


def test_extraction_refuses_examples_longer_than_the_context(workspace, tmp_path):
    import json as _json

    data = tmp_path / "long.jsonl"
    rows = [{"prompt": "Q", "positive": "yes", "negative": "no"}] * 3
    rows.append({"prompt": "Q", "positive": "y" * 400, "negative": "no"})  # tiny models: 256
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    r = run(
        "extract",
        str(data),
        "--model",
        str(workspace / "model"),
        "-o",
        str(tmp_path / "v.safetensors"),
    )
    assert_error(r, "long.jsonl:4: the example is")
    assert (
        "over the model's context of 256" in r.stderr and not (tmp_path / "v.safetensors").exists()
    )


def test_inspect_writes_the_page_and_the_contrast(workspace, vector, tmp_path):
    page, png = tmp_path / "page.html", tmp_path / "hist.png"
    args = ["inspect", "hello there, the sea", "--model", str(workspace / "model")]
    r = run(
        *args,
        "--vector",
        str(vector),
        "--layer",
        "2",
        "-o",
        str(page),
        "--json",
        "--contrast",
        str(workspace / "pairs.jsonl"),
        "--histogram",
        str(png),
    )
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["layer"] == 2 and payload["tokens"]
    assert page.read_text().count('class="tok"') == len(payload["tokens"])
    assert 0.0 <= payload["contrast"]["auc"] <= 1.0
    assert len(payload["contrast"]["positive"]) == len(payload["contrast"]["negative"]) == 8
    assert png.read_bytes().startswith(b"\x89PNG")
    r = run(*args, "--vector", str(vector))  # the terminal view, at the middle layer
    assert r.returncode == 0 and "hello" in r.stdout, r.stderr


def test_inspect_bad_inputs_are_one_line_errors_and_write_nothing(workspace, vector, tmp_path):
    model = str(workspace / "model")
    page = tmp_path / "page.html"
    base = ["--model", model, "--vector", str(vector), "-o", str(page)]
    assert_error(run("inspect", "hi", *base, "--layer", "7"), "the vector has no layer 7")
    assert_error(run("inspect", "   ", *base), "the text is empty")
    assert_error(run("inspect", "sea " * 400, *base), "over the model's context of 256")
    odd = tmp_path / "pairs.tsv"
    odd.write_text("positive\tnegative\na\tb\n")
    assert_error(run("inspect", "hi", *base, "--contrast", str(odd)), "use .jsonl, .json, .csv")
    assert_error(
        run("inspect", "hi", *base, "--histogram", str(tmp_path / "h.png")),
        "--histogram needs --contrast",
    )
    # a vector made on another model (another hidden size)
    from helpers import random_vector

    from steerlab.formats import save_vector

    other = tmp_path / "other.safetensors"
    save_vector(random_vector(tiny.model("llama", hidden=48), [1]), other)
    r = run("inspect", "hi", "--model", model, "--vector", str(other), "-o", str(page))
    assert_error(r, "hidden size")
    assert not page.exists() and not list(tmp_path.glob("*.tmp*"))
