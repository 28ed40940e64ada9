"""Command-line conventions shared by the tools: one-line errors, tracebacks only with --debug."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def one_line_errors(debug: bool, errors: tuple = (ValueError, OSError)) -> Iterator[None]:
    """Turn `errors` into `error: <first line>` on stderr and exit status 1 (re-raise on
    --debug)."""
    try:
        yield
    except errors as e:
        if debug:
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
