"""Policies own their meaning: parsing, names and the span of every kind."""

from __future__ import annotations

import pytest

from steerlab import SteerlabError
from steerlab.core.policy import FAR, POLICY_HELP, POLICY_KINDS, Policy, Span, check_marker


def test_every_kind_has_a_span_and_a_help_entry():
    examples = {
        "all": "all",
        "after-prompt": "after-prompt",
        "from-marker": "from-marker:]",
        "prompt": "prompt",
        "actadd": "actadd",
        "transient": "transient",
        "window": "window:0-9",
    }
    assert set(examples) == set(POLICY_KINDS)
    for kind, text in examples.items():
        policy = Policy.parse(text)
        assert policy.kind == kind and str(policy) == text
        assert policy.span(5, marker_at=2, rows=3).lo >= 0
        assert kind in POLICY_HELP


@pytest.mark.parametrize(
    ("text", "prompt_len", "seq_len", "expected"),
    [
        ("all", 4, 7, [0, 1, 2, 3, 4, 5, 6]),
        ("after-prompt", 4, 7, [3, 4, 5, 6]),
        ("prompt", 4, 7, [0, 1, 2, 3]),
        ("prompt", 4, 3, [0, 1, 2]),
        ("transient", 4, 7, [6]),
        ("transient", 4, 4, [3]),
        ("window:0-1", 4, 9, [3, 4]),  # the forwards that produce generated tokens 0 and 1
        ("window:2-4", 4, 9, [5, 6, 7]),
        ("window:2-4", 4, 6, [5]),
        ("window:5-9", 4, 6, []),
        ("window:1-", 4, 8, [4, 5, 6, 7]),
    ],
)
def test_positions_of_a_whole_sequence(text, prompt_len, seq_len, expected):
    assert Policy.parse(text).span(prompt_len).positions(seq_len) == expected


def test_window_zero_open_equals_after_prompt():
    for p in (1, 2, 7):
        assert Policy.parse("window:0-").span(p) == Policy("after-prompt").span(p)


def test_marker_and_actadd_spans():
    assert Policy.parse("from-marker:X").span(6, marker_at=2) == Span(2)
    assert Policy("actadd").span(6, rows=3) == Span(0, 3)
    assert Policy("after-prompt").span(0) == Span(0)  # an empty prompt still starts at 0
    assert Span(0).hi == FAR
    with pytest.raises(SteerlabError, match="token ids"):
        Policy.parse("from-marker:X").span(6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sometimes", "unknown policy"),
        ("window", "window:A-B"),
        ("window:3", "window:A-B"),
        ("window:a-b", "window:A-B"),
        ("window:-3", "window:A-B"),
        ("window:5-2", "empty"),
        ("window:" + "9" * 400 + "-", "window:A-B"),
        ("from-marker", "needs a marker"),
    ],
)
def test_bad_policies_are_one_line_errors(text, message):
    with pytest.raises(SteerlabError, match=message) as info:
        Policy.parse(text)
    assert "\n" not in str(info.value)


def test_bounds_only_for_window():
    with pytest.raises(SteerlabError, match="no window bounds"):
        Policy("all", start=2)
    assert Policy.parse("window:3-3").persisting
    assert not Policy("transient").persisting


def test_check_marker():
    check_marker(Policy.parse("from-marker:[/INST]"), "a [/INST] b")
    check_marker(Policy("all"), "anything")
    with pytest.raises(SteerlabError, match="does not occur"):
        check_marker(Policy.parse("from-marker:ZZZ"), "a [/INST] b")
