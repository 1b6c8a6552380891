from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
from helpers import random_vector

from steerlab import SteeringVector, SteerlabError
from steerlab.core.vector import ModelIdentity
from steerlab.formats import load_vector, save_vector
from steerlab.formats.gguf import export_gguf, import_gguf


def test_immutable_and_arithmetic(llama):
    a = random_vector(llama, [1, 2], seed=1)
    b = random_vector(llama, [2, 3], seed=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.method = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.directions[1] = torch.zeros(32)  # type: ignore[index]
    assert torch.equal((a * 2).directions[1], a.directions[1] * 2)
    assert torch.equal((-a).directions[2], -a.directions[2])
    s = a + b
    assert s.layers == [1, 2, 3] and torch.equal(s.directions[2], a.directions[2] + b.directions[2])
    d = a - b
    assert torch.equal(d.directions[3], -b.directions[3]) and d.method == "(random - random)"
    n = a.normalize()
    assert all(abs(v - 1) < 1e-6 for v in n.norms().values())
    sel = a.select([2])
    assert sel.layers == [2] and list(sel.residual_norms) == [2]
    with pytest.raises(SteerlabError, match="has no layer 7"):
        a.select([7])
    assert a.directions[1].dtype == torch.float32  # the original is untouched


def test_validation_rejects_nan_and_wrong_width(llama):
    ident = llama.identity
    with pytest.raises(SteerlabError, match="NaN"):
        SteeringVector({1: torch.tensor([float("nan")] * 32)}, ident)
    with pytest.raises(SteerlabError, match="width 31"):
        SteeringVector({1: torch.zeros(31)}, ident)
    with pytest.raises(SteerlabError, match="outside 0..3"):
        SteeringVector({4: torch.zeros(32)}, ident)


def test_safetensors_round_trip_keeps_everything(llama, tmp_path):
    v = random_vector(llama, [0, 2])
    path = save_vector(v, tmp_path / "v.safetensors")
    w = load_vector(path)
    assert w.metadata() == v.metadata()
    for layer in v.layers:
        assert torch.equal(v.directions[layer], w.directions[layer])
    assert not list(tmp_path.glob(".v.safetensors.*"))  # no temp file left


def test_save_is_atomic(llama, tmp_path, monkeypatch):
    import os

    target = tmp_path / "v.safetensors"
    save_vector(random_vector(llama, [1]), target)
    before = target.read_bytes()
    assert target.stat().st_mode & 0o777 == 0o644 & ~_umask()  # not mkstemp's 0600

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_vector(random_vector(llama, [1], seed=9), target)
    assert target.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_killed_save_leaves_no_temporary(tmp_path):
    """SIGKILL in the middle of a save (after the bytes, before the rename): nothing litters."""
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "marker"
    folder = tmp_path / "out"
    folder.mkdir()
    code = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import tiny
from helpers import random_vector
from steerlab.formats import save_vector
vec = random_vector(tiny.model("llama"), [1])
def stall(fd):
    open({str(marker)!r}, "w").close()
    time.sleep(60)
os.fsync = stall
save_vector(vec, {str(folder / "v.safetensors")!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "the save never reached its fsync"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert list(folder.iterdir()) == []


def test_pickles_and_foreign_files_are_refused(llama, tmp_path):
    pt = tmp_path / "v.pt"
    torch.save({"x": torch.zeros(3)}, pt)
    with pytest.raises(SteerlabError, match="pickle/torch file, which steerlab never loads"):
        load_vector(pt)
    disguised = tmp_path / "v.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(SteerlabError, match="never loads"):
        load_vector(disguised)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(SteerlabError, match="not a readable safetensors file"):
        load_vector(junk)
    with pytest.raises(SteerlabError, match="does not exist"):
        load_vector(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(SteerlabError, match="no steerlab metadata"):
        load_vector(plain)


def test_model_checks(llama):
    v = random_vector(llama, [1])
    me = llama.identity
    assert v.check_model(me) == []
    with pytest.raises(SteerlabError, match="hidden size 32"):
        v.check_model(dataclasses.replace(me, hidden_size=64))
    with pytest.raises(SteerlabError, match="4-layer model"):
        v.check_model(dataclasses.replace(me, num_layers=6))
    other = dataclasses.replace(me, name="other", fingerprint="feedbeef")
    with pytest.raises(SteerlabError, match="--allow-model-mismatch"):
        v.check_model(other)
    assert v.check_model(other, allow_mismatch=True) == [
        "transferring a vector made on tiny-llama to other"
    ]


def test_gguf_round_trip_and_refusals(llama, tmp_path):
    v = random_vector(llama, [1, 3])
    path = export_gguf(v, tmp_path / "v.gguf")
    w = load_vector(path)  # dispatches on the GGUF magic
    assert w.metadata() == v.metadata()
    with pytest.raises(SteerlabError, match="cannot steer layer 0"):
        export_gguf(random_vector(llama, [0, 1]), tmp_path / "z.gguf")
    with pytest.raises(SteerlabError, match="position-wise"):
        export_gguf(random_vector(llama, [1], rows=3), tmp_path / "a.gguf")
    assert not (tmp_path / "z.gguf").exists() and not (tmp_path / "a.gguf").exists()


def test_import_repeng_style_gguf(tmp_path):
    """A file as repeng's export_gguf writes it: model_hint, layer_count = #directions."""
    import gguf
    import numpy as np

    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    writer.add_tensor("direction.1", np.arange(32, dtype=np.float32))
    writer.add_tensor("direction.3", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    v = import_gguf(path)
    assert v.layers == [1, 3] and v.method == "imported" and v.model.fingerprint is None
    assert torch.equal(v.directions[1], torch.arange(32, dtype=torch.float32))
    warnings = v.check_model(ModelIdentity("tiny", "llama", 32, 4, "abc"))
    assert warnings and "does not record" in warnings[0]
    with pytest.raises(SteerlabError, match="hidden size"):
        v.check_model(ModelIdentity("tiny", "llama", 64, 4, "abc"))


def test_nan_in_a_vector_file_is_a_clear_error(llama, tmp_path):
    import json

    from safetensors.torch import save_file

    good = random_vector(llama, [1])
    path = tmp_path / "nan.safetensors"
    save_file(
        {"layer.1": torch.full((32,), float("nan"))},
        str(path),
        metadata={"steerlab": json.dumps(good.metadata(), sort_keys=True)},
    )
    with pytest.raises(
        SteerlabError, match="holds an invalid vector: direction for layer 1 contains NaN"
    ):
        load_vector(path)


def test_corrupt_files_are_one_line_errors(llama, tmp_path):
    """A tensor named foo, null or wrong metadata fields, a GGUF with broken or partial JSON."""
    import json as _json

    from safetensors.torch import save_file

    from steerlab.formats.gguf import export_gguf

    good = random_vector(llama, [1])
    meta = good.metadata()
    cases = {
        "foo.safetensors": ({"foo": torch.zeros(32)}, {"steerlab": _json.dumps(meta)}),
        "broken.safetensors": ({"layer.1": torch.zeros(32)}, {"steerlab": "{not json"}),
        "nokeys.safetensors": ({"layer.1": torch.zeros(32)}, {"steerlab": "{}"}),
        "badmodel.safetensors": (
            {"layer.1": torch.zeros(32)},
            {"steerlab": _json.dumps({**meta, "model": "x"})},
        ),
    }
    for name, (tensors, header) in cases.items():
        save_file(tensors, str(tmp_path / name), metadata=header)
        with pytest.raises(SteerlabError) as info:
            load_vector(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    nulls = tmp_path / "nulls.safetensors"
    save_file(
        {"layer.1": torch.zeros(32)},
        str(nulls),
        metadata={"steerlab": _json.dumps({**meta, "residual_norms": None, "notes": None})},
    )
    assert load_vector(nulls).residual_norms == {}  # null means none recorded
    path = export_gguf(good, tmp_path / "v.gguf")
    raw = path.read_bytes()
    text = _json.dumps(meta, sort_keys=True).encode()
    for replacement, message in (
        (b"{" + b" " * (len(text) - 2) + b"}", "broken steerlab metadata"),
        (b"[" + b" " * (len(text) - 2) + b"]", "broken steerlab metadata"),
        (b"{oops" + b" " * (len(text) - 5), "not JSON"),
    ):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(raw.replace(text, replacement))
        with pytest.raises(SteerlabError, match=message) as info:
            load_vector(bad)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", ["absolute", "relative"])
def test_overflow_check_equals_every_entry_checked(dtype, scale):
    """A steering overflows a dtype exactly where some entry of its added tensor does: the
    one-operation check (each layer's largest entry) against every entry of every layer, at
    the boundaries where rounding decides (float16's 65504 and 65520, the largest float32
    and bfloat16 values)."""
    from steerlab import Steering

    identity = ModelIdentity("m", "llama", 4, 6)
    top = float(torch.finfo(dtype).max)
    gen = torch.Generator().manual_seed(0)
    directions = {}
    for layer, peak in enumerate((0.9, 0.9999, 0.99999997, 1.0, 1.0000001, 1.01)):
        d = torch.rand(4, generator=gen) - 0.5
        d[layer % 4] = -peak  # the largest entry, negative on purpose
        directions[layer] = d
    vector = SteeringVector(directions, identity, residual_norms={k: 3.0 for k in range(6)})
    outcomes = set()
    for multiplier in (1.0, 65519.0, 65520.0, top * 0.5, top, -top):
        expected: dict[torch.dtype, int | None] = {}
        for target in {dtype, torch.float32}:  # the reference: every entry, as it is added
            expected[target] = None
            for layer in range(6):
                d = directions[layer]
                factor = multiplier if scale == "absolute" else multiplier * 3.0 / float(d.norm())
                if not bool(torch.isfinite((d * factor).to(target)).all()):
                    expected[target] = layer
                    break
        if expected[torch.float32] is not None:  # refused when made
            with pytest.raises(
                SteerlabError, match=f"overflows float32 at layer {expected[torch.float32]}"
            ):
                Steering(vector, multiplier, scale=scale)
            outcomes.add("refused")
            continue
        assert Steering(vector, multiplier, scale=scale).overflowing_layer(dtype) == expected[dtype]
        outcomes.add(expected[dtype] is None)
    assert outcomes >= {True, False} or outcomes >= {True, "refused"}
