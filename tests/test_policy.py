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


class _Pieces:
    """A tokenizer whose token i decodes to ``pieces[i]``: markers pinned by hand."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize(
    ("pieces", "marker", "index"),
    [
        # a multi-token marker ends at its last token (CAA's "]" of "[/INST]")
        (["<s>", "User", ":", " hi", " [/", "INST", "]", " ok"], "[/INST]", 6),
        # a repeated marker: the last occurrence
        (["<s>", "[/", "INST", "]", " a", " [/", "INST", "]", " b"], "[/INST]", 7),
        # the BOS token itself
        (["<s>", "x", "y"], "<s>", 0),
        # split across token boundaries: it ends inside a token
        (["ab", "cd", "ef"], "bc", 1),
        (["ab", "cd", "ef"], "bcde", 2),
        # occurrences that straddle tokens, twice
        (["xa", "bxa", "b"], "ab", 2),
        # overlapping occurrences: the last one ends at the last token
        (["a", "a", "a"], "aa", 2),
        (["\n", "\n", "\n", "x"], "\n\n", 2),
        # one character marker at the very end
        (["q", "u", "?"], "?", 2),
    ],
)
def test_marker_end_hand_computed(pieces, marker, index):
    from steerlab.core.policy import marker_end

    assert marker_end(_Pieces(pieces), list(range(len(pieces))), marker) == index


def test_marker_end_on_a_real_tokenizer_with_bos_and_chat_template():
    import tiny

    from steerlab.core.policy import marker_end
    from steerlab.core.prompts import prompt_ids

    tok = tiny.tokenizer()
    ids = prompt_ids(tok, "say [/INST] twice [/INST] ok", chat=True)
    text = tok.decode(ids)
    assert text.startswith("<s>user: say")
    # counted by hand on the rendered text: the character tokenizer has one token per
    # character after the BOS token, whose text "<s>" is one token
    last = text.rindex("[/INST]") + len("[/INST]") - 1  # the "]" of the last marker
    assert marker_end(tok, ids, "[/INST]") == last - len("<s>") + 1
    bos = [i for i, t in enumerate(ids) if t == tok.bos_token_id]
    assert len(bos) == 2 and marker_end(tok, ids, "<s>") == bos[-1]  # the assistant turn's
