"""Vector files and datasets that must be refused, quickly and in one line, by the one reader
the CLI, the server and the vLLM plugin share (the second serving and files audit, #8-#9)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import random_vector

from steerlab import SteerlabError
from steerlab.core.dataset import SHOWN_PROBLEMS, DatasetError, load_dataset
from steerlab.formats import load_vector, vector_files
from steerlab.serving.bodies import load_vectors


def _gguf(path, tensors: dict[str, np.ndarray], kind=None, meta: str | None = None) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 4)
    if meta is not None:
        writer.add_string("steerlab.metadata", meta)
    for name, array in tensors.items():
        if kind is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("kind", "array", "message"),
    [
        ("I32", np.arange(32, dtype=np.int32), "holds I32 values"),
        ("I8", np.arange(32, dtype=np.int8), "holds I8 values"),
        ("Q8_0", np.zeros(34, dtype=np.uint8), "holds Q8_0 values"),
        (None, np.ones((3, 32), dtype=np.float32), "has shape [32, 3]"),
    ],
)
def test_gguf_directions_that_are_not_float_vectors_are_refused(tmp_path, kind, array, message):
    import gguf

    path = tmp_path / "v.gguf"
    raw = None if kind is None else gguf.GGMLQuantizationType[kind]
    _gguf(path, {"direction.1": array}, raw)
    with pytest.raises(SteerlabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_vector(path)


@pytest.mark.parametrize(
    ("dtype", "message"),
    [(torch.int8, "holds I8"), (torch.bool, "holds BOOL"), (torch.float64, "holds F64")],
)
def test_safetensors_of_other_kinds_are_refused(llama, tmp_path, dtype, message):
    from safetensors.torch import save_file

    v = random_vector(llama, [1])
    meta = {"steerlab": json.dumps(v.metadata(), sort_keys=True)}
    path = tmp_path / "v.safetensors"
    save_file({"layer.1": torch.ones(32).to(dtype)}, path, metadata=meta)
    with pytest.raises(SteerlabError, match=message):
        load_vector(path)


def test_an_empty_or_misshapen_direction_is_refused(llama, tmp_path):
    from safetensors.torch import save_file

    v = random_vector(llama, [1])
    meta = v.metadata()
    empty = tmp_path / "empty.safetensors"
    save_file(
        {"layer.1": torch.zeros(0, 32)},
        empty,
        metadata={"steerlab": json.dumps({**meta, "shape": [0, 32]})},
    )
    with pytest.raises(SteerlabError, match="empty"):
        load_vector(empty)
    wide = tmp_path / "wide.safetensors"
    save_file({"layer.1": torch.ones(3, 32)}, wide, metadata={"steerlab": json.dumps(meta)})
    with pytest.raises(SteerlabError, match=r"is \[3, 32\], but the vector declares \[32\]"):
        load_vector(wide)


def test_huge_metadata_is_refused_before_it_is_parsed(llama, tmp_path):
    from safetensors.torch import save_file

    v = random_vector(llama, [1])
    meta = {**v.metadata(), "notes": {"padding": "x" * (3 << 20)}}
    path = tmp_path / "big.safetensors"
    save_file({"layer.1": torch.ones(32)}, path, metadata={"steerlab": json.dumps(meta)})
    start = time.monotonic()
    with pytest.raises(SteerlabError, match="header, over the"):
        load_vector(path)
    assert time.monotonic() - start < 1.0
    gpath = tmp_path / "big.gguf"
    _gguf(gpath, {"direction.1": np.ones(32, dtype=np.float32)}, meta=json.dumps(meta))
    with pytest.raises(SteerlabError, match="over the 1,048,576-byte limit"):
        load_vector(gpath)


def test_a_string_hidden_size_names_the_field(llama, tmp_path):
    from safetensors.torch import save_file

    meta = random_vector(llama, [1]).metadata()
    meta["model"]["hidden_size"] = "32"
    path = tmp_path / "v.safetensors"
    save_file({"layer.1": torch.ones(32)}, path, metadata={"steerlab": json.dumps(meta)})
    with pytest.raises(SteerlabError, match="hidden_size must be a positive integer, got '32'"):
        load_vector(path)


def test_a_folder_that_is_a_loop_of_links_is_one_line_everywhere(llama, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(SteerlabError, match="cannot list the vector directory"):
        vector_files(loop)
    with pytest.raises(SteerlabError, match="cannot list the vector directory"):
        load_vectors(loop, llama)
    from steerlab.vllm.registry import load  # importable without vLLM

    with pytest.raises(SteerlabError, match="cannot list the vector directory"):
        load(str(loop))


def test_the_cli_refuses_a_bad_file_in_one_line_and_exit_2(tmp_path):
    path = tmp_path / "v.gguf"
    _gguf(
        path,
        {"direction.1": np.arange(32, dtype=np.int32)},
        __import__("gguf").GGMLQuantizationType.I32,
    )
    r = subprocess.run(
        [sys.executable, "-m", "steerlab.cli", "vector", "show", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "I32" in r.stderr, r.stderr


def test_a_million_bad_lines_list_twenty_problems_and_count_the_rest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"positive": 1, "negative": "b"}\n' * 100_000)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert info.value.total == 100_000 and len(info.value.problems) == SHOWN_PROBLEMS
    lines = str(info.value).splitlines()
    assert (
        len(lines) == SHOWN_PROBLEMS + 2
        and lines[-1] == f"  ... and {100_000 - SHOWN_PROBLEMS} more"
    )
    r = subprocess.run(
        [sys.executable, "-m", "steerlab.cli", "extract", str(path), "--model", "/no/such"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.splitlines()) <= SHOWN_PROBLEMS + 3, r.stderr[-500:]


def test_problems_past_the_shown_ones_are_counted_not_kept():
    """A million bad lines must not hold a million messages in memory while loading."""
    from steerlab.core.dataset import _Problems

    problems = _Problems()
    for i in range(1000):
        problems.append(f"line {i}: bad")
    assert problems.total == 1000 and list(problems) == [f"line {i}: bad" for i in range(20)]


def test_a_huge_line_is_refused_before_it_is_tokenized(llama, tmp_path, monkeypatch):
    from steerlab.hf.extraction import build_items

    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"positive": "a" * 5_000_000, "negative": "b"}) + "\n")
    data = load_dataset(path)
    calls = []
    original = type(llama.tokenizer).__call__
    monkeypatch.setattr(
        type(llama.tokenizer),
        "__call__",
        lambda self, *a, **k: calls.append(1) or original(self, *a, **k),
    )
    start = time.monotonic()
    with pytest.raises(SteerlabError, match="5000000 characters, more than the model's context"):
        build_items(llama, data, chat=False)
    assert time.monotonic() - start < 2.0 and not calls
