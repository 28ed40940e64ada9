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


def check_device(device: str, flag: str = "--device") -> None:
    """Refuse a device string torch cannot parse, or a CUDA device on a machine without one."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: no CUDA device is available here (use {flag} cpu)")


def check_output_file(path: str, flag: str) -> None:
    """A file to be written at the end of a long job: checked before the work starts."""
    import os

    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory (give a file name)")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable")
