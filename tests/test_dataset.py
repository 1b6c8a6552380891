from __future__ import annotations

import json

import pytest
from helpers import SHARED

from steerlab import SteerlabError
from steerlab.core.dataset import DatasetError, load_dataset

AB = {
    "question": "Do it?\n\nChoices:\n (A) Yes\n (B) No",
    "answer_matching_behavior": " (A)",
    "answer_not_matching_behavior": " (B)",
}
YN = {
    "question": 'Is the following statement something you would say?\n"x"',
    "statement": "x",
    "answer_matching_behavior": " Yes",
    "answer_not_matching_behavior": " No",
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_ab_format_strips_spaces_and_parentheses(tmp_path):
    d = load_dataset(
        write_jsonl(
            tmp_path / "a.jsonl",
            [AB, {**AB, "answer_matching_behavior": "B", "answer_not_matching_behavior": "(A)"}],
        )
    )
    assert d.format == "ab" and [(p.positive, p.negative) for p in d.pairs] == [
        ("(A)", "(B)"),
        ("(B)", "(A)"),
    ]
    assert d.info.size == 2 and len(d.info.sha256) == 64


def test_yesno_pairs_unpaired_csv_json(tmp_path):
    assert load_dataset(write_jsonl(tmp_path / "y.jsonl", [YN])).pairs[0].positive == "Yes"
    pairs = load_dataset(
        write_jsonl(
            tmp_path / "p.jsonl",
            [
                {"prompt": "Hi", "positive": "good", "negative": "bad"},
                {"positive": "x", "negative": "y"},
            ],
        )
    )
    assert pairs.format == "pairs" and pairs.pairs[1].prompt is None
    csv = tmp_path / "u.csv"
    csv.write_text("text,label\nlovely,positive\nawful,0\nnice,1\n")
    u = load_dataset(csv)
    assert u.format == "unpaired" and [t.positive for t in u.texts] == [True, False, True]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"positive": "a", "negative": "b"}]))
    assert load_dataset(js).format == "pairs"
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("happy words\nsunny day\n")
    neg.write_text("sad words\n")
    two = load_dataset(pos, negatives=neg)
    assert two.format == "unpaired" and len(two.texts) == 3
    act = load_dataset(
        write_jsonl(tmp_path / "act.jsonl", [{"positive": "Love", "negative": "Hate"}]),
        format="actadd",
    )
    assert act.format == "actadd"


def test_every_malformed_record_is_reported_at_once(tmp_path):
    rows = [
        AB,
        "{not json",
        {**AB, "question": 5},
        {k: v for k, v in AB.items() if k != "answer_not_matching_behavior"},
        {**AB, "answer_matching_behavior": " (C)"},
        {**AB, "answer_matching_behavior": "maybe"},
        {**AB, "answer_not_matching_behavior": " (A)"},
        [1, 2],
    ]
    with pytest.raises(DatasetError) as info:
        load_dataset(write_jsonl(tmp_path / "bad.jsonl", rows))
    problems = info.value.problems
    assert problems == [
        "bad.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes)",
        "bad.jsonl:3: field 'question' must be a string, got int",
        "bad.jsonl:4: field 'answer_not_matching_behavior' is missing",
        "bad.jsonl:5: field 'answer_matching_behavior' answers (C), which is not among the question's choices",
        "bad.jsonl:6: field 'answer_matching_behavior' must be a choice like ' (A)', got 'maybe'",
        "bad.jsonl:7: both answers are (A): the pair has no contrast",
        "bad.jsonl:8: a record must be a JSON object, got list",
    ]
    assert str(info.value).startswith("7 problems in dataset")


def test_pairs_and_unpaired_validation(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset(
            write_jsonl(
                tmp_path / "p.jsonl",
                [
                    {"positive": "same", "negative": "same"},
                    {"positive": "", "negative": "x"},
                    {"positive": "a", "negative": "b", "prompt": 3},
                ],
            )
        )
    assert info.value.problems == [
        "p.jsonl:1: 'positive' and 'negative' are identical: the pair has no contrast",
        "p.jsonl:2: field 'positive' is empty",
        "p.jsonl:3: field 'prompt' must be a string, got int",
    ]
    with pytest.raises(
        DatasetError, match="field 'label' must be positive/negative or 1/0, got 'meh'"
    ):
        load_dataset(write_jsonl(tmp_path / "u.jsonl", [{"text": "a", "label": "meh"}]))
    with pytest.raises(SteerlabError, match="has no negative texts"):
        load_dataset(write_jsonl(tmp_path / "u2.jsonl", [{"text": "a", "label": 1}]))
    with pytest.raises(DatasetError, match="answers must be Yes or No"):
        load_dataset(
            write_jsonl(tmp_path / "y.jsonl", [{**YN, "answer_matching_behavior": " Perhaps"}]),
            format="yesno",
        )


def test_empty_unknown_duplicates_missing(tmp_path):
    with pytest.raises(SteerlabError, match="has no records"):
        load_dataset(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(DatasetError, match="cannot tell the format"):
        load_dataset(write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}]))
    with pytest.raises(SteerlabError, match="unknown dataset format 'xml'"):
        load_dataset(write_jsonl(tmp_path / "x2.jsonl", [AB]), format="xml")  # type: ignore[arg-type]
    with pytest.raises(SteerlabError, match="does not exist"):
        load_dataset(tmp_path / "absent.jsonl")
    d = load_dataset(write_jsonl(tmp_path / "d.jsonl", [AB, AB]))
    assert d.warnings == ("d.jsonl:2: duplicate of the pair on line 1",)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is absent")
def test_shared_datasets_all_load():
    files = sorted((SHARED / "datasets" / "model-written-evals").glob("*/*.jsonl"))
    assert files
    for f in files:
        d = load_dataset(f)
        assert d.format == ("ab" if "advanced-ai-risk" in str(f) else "yesno")
        assert len(d) >= 300
