from __future__ import annotations

import pytest
import tiny
import torch

from steerlab import SteerlabError, find_layers, resolve_layers
from steerlab.hf.layers import block_output


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_hook_point_is_output_hidden_states_l_plus_1(arch):
    lm = tiny.model(arch)
    layers = find_layers(lm.model)
    assert layers.num_layers == 4 and layers.hidden_size == 32
    ids = torch.tensor([lm.tokenizer("steer me")["input_ids"]])
    captured = {}
    handles = [
        b.register_forward_hook(
            lambda m, a, o, i=i: captured.__setitem__(i, block_output(o).clone())
        )
        for i, b in enumerate(layers.blocks)
    ]
    try:
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    assert len(hidden) == layers.num_layers + 1
    # The last entry of hidden_states has the final norm applied in most architectures,
    # so layer n-1 is compared to the block output only.
    for layer in range(layers.num_layers - 1):
        torch.testing.assert_close(captured[layer], hidden[layer + 1], atol=0, rtol=0)


def test_override_and_unknown_architecture_error():
    lm = tiny.model("llama")
    assert find_layers(lm.model, "model.layers").path == "model.layers"
    lm.model.config.model_type = "mystery"
    try:
        with pytest.raises(SteerlabError, match="--layers-path"):
            find_layers(lm.model)
        assert find_layers(lm.model, "model.layers").num_layers == 4
        with pytest.raises(SteerlabError, match="is not a list of decoder blocks"):
            find_layers(lm.model, "model.norm")
    finally:
        lm.model.config.model_type = "llama"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(10))),
        ("2-4", [2, 3, 4]),
        ("1,3,-1", [1, 3, 9]),
        ("-3--1", [7, 8, 9]),
        (5, [5]),
        ([0, 0, 2], [0, 2]),
    ],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 10) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("10", "layer 10 does not exist: this model has layers 0..9"),
        ("x", "cannot read layers"),
        ("5-2", "is empty"),
        ("-11", "layer -11 does not exist"),
    ],
)
def test_resolve_layers_errors(spec, message):
    with pytest.raises(SteerlabError, match=message):
        resolve_layers(spec, 10)
