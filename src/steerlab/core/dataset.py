"""Contrastive datasets: reading, format detection and validation of every record."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from steerlab.core.errors import SteerlabError
from steerlab.core.files import check_file, read_text
from steerlab.core.vector import DatasetInfo

Format = Literal["ab", "yesno", "pairs", "unpaired", "actadd"]
FORMATS: tuple[str, ...] = get_args(Format)
_LETTER = re.compile(r"^\(?([A-Za-z])\)?$")
_TRUE_LABELS = {"1", "true", "positive", "pos", "yes"}
_FALSE_LABELS = {"0", "false", "negative", "neg", "no"}


SHOWN_PROBLEMS = 20  # a bad file lists its first problems and counts the rest


class DatasetError(SteerlabError):
    """Malformed records: one line per problem for the first :data:`SHOWN_PROBLEMS`, then a
    count of the rest (a file of a million bad lines gives a short message).

    Attributes:
        problems: the first problems (at most :data:`SHOWN_PROBLEMS`).
        total: how many problems there were in all.
    """

    def __init__(self, path: str, problems: list[str], total: int | None = None) -> None:
        self.problems = problems[:SHOWN_PROBLEMS]
        self.total = len(problems) if total is None else total
        head = (
            f"{self.total} problem{'s' if self.total != 1 else ''} in dataset '{path}' "
            "(fix them and run again):"
        )
        lines = [head, *(f"  {p}" for p in self.problems)]
        if self.total > len(self.problems):
            lines.append(f"  ... and {self.total - len(self.problems)} more")
        super().__init__("\n".join(lines))


class _Problems(list):  # type: ignore[type-arg]
    """A list of problems that keeps the first ones and counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def append(self, item: str) -> None:
        self.total += 1
        if len(self) < SHOWN_PROBLEMS:
            super().append(item)


@dataclass(frozen=True)
class Pair:
    """A contrastive pair: one prompt, a positive and a negative completion."""

    prompt: str | None
    positive: str
    negative: str
    line: int


@dataclass(frozen=True)
class Text:
    """One text of an unpaired set."""

    prompt: str | None
    text: str
    positive: bool
    line: int


@dataclass(frozen=True)
class Dataset:
    """A validated dataset.

    Attributes:
        format: ``ab``, ``yesno``, ``pairs``, ``unpaired`` or ``actadd``.
        pairs: the pairs (every format but ``unpaired``).
        texts: the texts (``unpaired`` only).
        info: path, content hash and size, recorded in vectors.
        warnings: non-fatal findings such as duplicate pairs.
    """

    format: Format
    pairs: tuple[Pair, ...] = ()
    texts: tuple[Text, ...] = ()
    info: DatasetInfo = field(default_factory=lambda: DatasetInfo("", "", 0, "pairs"))
    warnings: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs) if self.format != "unpaired" else len(self.texts)

    def subset(self, indices: list[int]) -> Dataset:
        """The records at ``indices`` (same info, for train/test splits)."""
        if self.format == "unpaired":
            return Dataset(self.format, texts=tuple(self.texts[i] for i in indices), info=self.info)
        return Dataset(self.format, pairs=tuple(self.pairs[i] for i in indices), info=self.info)


_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".txt", "")


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for JSONL, JSON arrays, CSV and plain text files."""
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise SteerlabError(
            f"'{path}' is a {suffix} file, which steerlab does not read as a dataset: "
            "use .jsonl, .json, .csv or .txt"
        )
    text = read_text(path, "dataset file")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SteerlabError(
                f"{path}:{exc.lineno}: invalid JSON ({exc.msg}): fix the file or use JSONL"
            ) from None
        if isinstance(data, dict):
            data = data.get("data", data.get("examples", [data]))
        if not isinstance(data, list):
            raise SteerlabError(f"{path}: a JSON dataset must be a list of objects")
        # JSON arrays have no line per record; report the 1-based record number.
        for i, item in enumerate(data, start=1):
            yield i, item
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}
    elif suffix == ".txt":
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield i, {"text": line.strip()}
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                yield i, _BadLine(exc.msg)


@dataclass(frozen=True)
class _BadLine:
    reason: str


def detect_format(record: dict[str, Any]) -> Format | None:
    """Guess a record's format from its keys and answers."""
    if "answer_matching_behavior" in record:
        answer = str(record.get("answer_matching_behavior", "")).strip().strip("()").lower()
        return "yesno" if answer in ("yes", "no") else "ab"
    if "positive" in record or "negative" in record:
        return "pairs"
    if "text" in record:
        return "unpaired"
    return None


def _str_field(
    record: dict[str, Any], name: str, where: str, problems: list[str], optional: bool = False
) -> str | None:
    value = record.get(name)
    if value is None:
        if not optional:
            problems.append(f"{where}: field '{name}' is missing")
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        return None
    if not value.strip() and not optional:
        problems.append(f"{where}: field '{name}' is empty")
        return None
    return value


def _label(value: Any) -> bool | None:
    text = str(value).strip().lower()
    if text in _TRUE_LABELS:
        return True
    if text in _FALSE_LABELS:
        return False
    return None


def _parse(
    path: Path, fmt: Format | None, problems: list[str], forced_label: bool | None = None
) -> tuple[Format | None, list[Pair], list[Text]]:
    pairs: list[Pair] = []
    texts: list[Text] = []
    try:
        records = list(_records(path))
    except UnicodeDecodeError:
        raise SteerlabError(
            f"'{path}' is not UTF-8 text: pass a JSON, JSONL or CSV dataset"
        ) from None
    for line, record in records:
        where = f"{path.name}:{line}"
        if isinstance(record, _BadLine):
            problems.append(f"{where}: invalid JSON ({record.reason})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: a record must be a JSON object, got {type(record).__name__}")
            continue
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                problems.append(
                    f"{where}: cannot tell the format from fields {sorted(record)}: pass --format "
                    f"({', '.join(FORMATS)})"
                )
                continue
        if fmt == "ab":
            question = _str_field(record, "question", where, problems)
            pos = _str_field(record, "answer_matching_behavior", where, problems)
            neg = _str_field(record, "answer_not_matching_behavior", where, problems)
            if question is None or pos is None or neg is None:
                continue
            letters = []
            for name, answer in (
                ("answer_matching_behavior", pos),
                ("answer_not_matching_behavior", neg),
            ):
                match = _LETTER.match(answer.strip())
                if not match:
                    problems.append(
                        f"{where}: field '{name}' must be a choice like ' (A)', got {answer!r}"
                    )
                    continue
                letter = match.group(1).upper()
                if f"({letter})" not in question:
                    problems.append(
                        f"{where}: field '{name}' answers ({letter}), which is not among the question's choices"
                    )
                    continue
                letters.append(letter)
            if len(letters) == 2:
                if letters[0] == letters[1]:
                    problems.append(
                        f"{where}: both answers are ({letters[0]}): the pair has no contrast"
                    )
                    continue
                pairs.append(Pair(question, f"({letters[0]})", f"({letters[1]})", line))
        elif fmt == "yesno":
            question = _str_field(record, "question", where, problems)
            pos = _str_field(record, "answer_matching_behavior", where, problems)
            neg = _str_field(record, "answer_not_matching_behavior", where, problems)
            if question is None or pos is None or neg is None:
                continue
            answers = [pos.strip().strip("()"), neg.strip().strip("()")]
            bad = [a for a in answers if a.lower() not in ("yes", "no")]
            if bad:
                problems.append(f"{where}: answers must be Yes or No, got {bad[0]!r}")
                continue
            if answers[0].lower() == answers[1].lower():
                problems.append(
                    f"{where}: both answers are {answers[0]!r}: the pair has no contrast"
                )
                continue
            pairs.append(Pair(question, answers[0].capitalize(), answers[1].capitalize(), line))
        elif fmt in ("pairs", "actadd"):
            prompt = _str_field(record, "prompt", where, problems, optional=True)
            pos = _str_field(record, "positive", where, problems)
            neg = _str_field(record, "negative", where, problems)
            if pos is None or neg is None:
                continue
            if pos == neg:
                problems.append(
                    f"{where}: 'positive' and 'negative' are identical: the pair has no contrast"
                )
                continue
            pairs.append(Pair(prompt or None, pos, neg, line))
        else:  # unpaired
            prompt = _str_field(record, "prompt", where, problems, optional=True)
            text = _str_field(record, "text", where, problems)
            if forced_label is not None:
                label: bool | None = forced_label
            elif "label" not in record:
                problems.append(
                    f"{where}: field 'label' is missing (or pass the negatives as a second file)"
                )
                continue
            else:
                label = _label(record["label"])
                if label is None:
                    problems.append(
                        f"{where}: field 'label' must be positive/negative or 1/0, got {record['label']!r}"
                    )
                    continue
            if text is not None:
                texts.append(Text(prompt or None, text, bool(label), line))
    return fmt, pairs, texts


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.read_bytes())
    return digest.hexdigest()


def load_dataset(
    path: str | Path,
    format: Format | None = None,
    negatives: str | Path | None = None,
) -> Dataset:
    """Read and validate a dataset; every problem is reported at once.

    Args:
        path: a JSONL, JSON or CSV file (or text file of positives with ``negatives``).
        format: ``ab``, ``yesno``, ``pairs``, ``unpaired`` or ``actadd``; detected when omitted.
        negatives: a second file of negative texts, for unpaired sets.

    Raises:
        DatasetError: malformed records (all of them, with file, line and field), an empty
            dataset or pairs without contrast.
        SteerlabError: a missing file or an unknown format.
    """
    if format is not None and format not in FORMATS:
        raise SteerlabError(f"unknown dataset format '{format}': use one of {', '.join(FORMATS)}")
    files = [Path(path)] + ([Path(negatives)] if negatives is not None else [])
    for f in files:
        check_file(f, "dataset file")
    problems = _Problems()
    if negatives is not None:
        if format not in (None, "unpaired"):
            raise SteerlabError(
                "a negatives file goes with unpaired sets: drop --format or use unpaired"
            )
        _, _, pos_texts = _parse(files[0], "unpaired", problems, forced_label=True)
        _, _, neg_texts = _parse(files[1], "unpaired", problems, forced_label=False)
        fmt: Format | None = "unpaired"
        pairs: list[Pair] = []
        texts = pos_texts + neg_texts
    else:
        fmt, pairs, texts = _parse(files[0], format, problems)
    if problems.total:
        raise DatasetError(str(path), list(problems), problems.total)
    if fmt is None or (not pairs and not texts):
        raise SteerlabError(f"dataset '{path}' has no records: add contrastive examples")
    if fmt == "unpaired":
        n_pos = sum(t.positive for t in texts)
        if n_pos == 0 or n_pos == len(texts):
            side = "negative" if n_pos else "positive"
            raise SteerlabError(f"dataset '{path}' has no {side} texts: an unpaired set needs both")
    warnings: list[str] = []
    seen: dict[tuple[str | None, str, str], int] = {}
    for p in pairs:
        key = (p.prompt, p.positive, p.negative)
        if key in seen:
            warnings.append(f"{files[0].name}:{p.line}: duplicate of the pair on line {seen[key]}")
        else:
            seen[key] = p.line
    info = DatasetInfo(
        path=str(path), sha256=_sha256(files), size=len(pairs) or len(texts), format=fmt
    )
    return Dataset(
        format=fmt, pairs=tuple(pairs), texts=tuple(texts), info=info, warnings=tuple(warnings)
    )
