"""The one exception type that reaches users as a one-line message."""

from __future__ import annotations


class SteerlabError(ValueError):
    """A problem with the user's input, stated in one line with its fix.

    The CLI prints ``error: <message>`` and exits with status 2; no traceback. It is a
    ``ValueError``, so validating dataclasses raise it from ``__post_init__``.
    """
