"""The `llmasos` command line (the shell of the OS)."""

from __future__ import annotations

import sys


def table_console():
    """A rich Console for tables on stdout; not a terminal (a pipe, a log): wide enough that rows never wrap."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 240, highlight=False)
