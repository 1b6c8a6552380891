"""Reading the user's text files: one-line errors for missing, directory or non-UTF-8 files."""

from __future__ import annotations

from pathlib import Path

from steerlab.core.errors import SteerlabError


def check_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, when it names an existing file.

    Raises:
        SteerlabError: the file is missing or a directory.
    """
    source = Path(path)
    if source.is_dir():
        raise SteerlabError(f"{what} '{path}' is a directory: pass a file")
    if not source.is_file():
        raise SteerlabError(f"{what} '{path}' does not exist: check the path")
    return source


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``.

    Args:
        what: what the file is, for the message (e.g. ``dataset file``).

    Raises:
        SteerlabError: the file is missing, a directory, unreadable or not UTF-8.
    """
    source = check_file(path, what)
    try:
        return source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SteerlabError(
            f"{what} '{path}' is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise SteerlabError(f"cannot read {what} '{path}': {exc.strerror}") from None


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file.

    Raises:
        SteerlabError: an unreadable file, or one with no prompts.
    """
    prompts = [line.strip() for line in read_text(path, "prompts file").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise SteerlabError(f"'{path}' has no prompts: write one per line")
    return prompts


def sentiment_dataset_path() -> Path:
    """The shipped sentiment pairs (300 pairs written for steerlab); its siblings in the
    same folder are the other shipped data (``casual.jsonl``, ``weddings.jsonl``...)."""
    import importlib.resources

    return Path(str(importlib.resources.files("steerlab") / "data" / "sentiment.jsonl"))
