"""The ``steerlab`` command: thin wrappers that parse, call one library function, and print.

Each submodule registers its commands on :data:`steerlab.cli.common.app`.
"""

from __future__ import annotations

import sys

import typer

from steerlab.cli import conditions, evaluate, policies, steering, vectors, views  # noqa: F401  (register the commands)
from steerlab.cli.common import app, fail
from steerlab.core.errors import SteerlabError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: one-line errors with exit status 2, never a traceback for bad input."""
    command = typer.main.get_command(app)
    try:
        result = command.main(standalone_mode=False)
    except SteerlabError as exc:
        fail(str(exc))
    except (KeyboardInterrupt, EOFError):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        fail(f"{exc.strerror}: '{exc.filename}': check the path")
    except Exception as exc:
        # Click's own exceptions (typer may vendor click, so match by shape, not class).
        name = type(exc).__name__
        if name == "Exit":
            sys.exit(int(getattr(exc, "exit_code", 0)))
        if name == "Abort":
            sys.stderr.write("interrupted\n")
            sys.exit(130)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(int(exc.exit_code))
        raise
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
