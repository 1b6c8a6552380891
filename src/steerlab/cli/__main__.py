"""``python -m steerlab.cli``: the same as the ``steerlab`` command."""

from steerlab.cli import main

main()
