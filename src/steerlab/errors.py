"""The one exception type that reaches users as a one-line message."""

from __future__ import annotations


class SteerlabError(Exception):
    """A problem with the user's input, stated in one line with its fix.

    The CLI prints ``error: <message>`` and exits with status 2; no traceback.
    """
