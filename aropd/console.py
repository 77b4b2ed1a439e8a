"""The ``aropd`` console script: the options checked in a second, then the CLI, and any error as one line."""

from __future__ import annotations

import os
import sys


def entry(argv: list[str] | None = None) -> None:
    """``aropd fit|validate ...``: like ``aropd.cli.main``, but a bad config, path or record ends in
    one line, ``aropd: error: <message>``, and exit status 2 (``AROPD_DEBUG=1``: the traceback)."""
    try:
        # Before Lightning is imported (~5 s): an unknown option or an unreadable config fails at once.
        from aropd.precheck import check_argv

        check_argv(sys.argv[1:] if argv is None else argv)
        from aropd.cli import main

        main(argv)
    except (ValueError, OSError, ImportError) as e:  # FileNotFoundError is an OSError
        if os.environ.get("AROPD_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(e).split("\n")) or type(e).__name__
        print("aropd: (AROPD_DEBUG=1 shows the traceback)", file=sys.stderr)
        print(f"aropd: error: {message}", file=sys.stderr)
        sys.exit(2)
