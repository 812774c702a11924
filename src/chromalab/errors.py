"""User-facing errors: one line that says what was wrong and what to do."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator


class ChromalabError(Exception):
    """An error the CLI prints as one line (no traceback) and exits with status 1."""


def one_line(exc: BaseException) -> str:
    """`Type: first line of its message`: how a failure is named in a one-line report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def printable(text: str, limit: int | None = 120) -> str:
    """Text from outside (a server's reason phrase or header, a file's name) as a message may show it: control
    characters escaped, so that it cannot move the cursor, retitle the terminal or fake a line of its own; cut
    to `limit` (None: whole)."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if limit is None or len(shown) <= limit else shown[:limit] + "…"


def error_line(message: str) -> str:
    """The line a user's error ends a command with; the paths in it are printable (a photo's name may hold an
    escape sequence)."""
    return f"error: {printable(message, None)}"


# The machine failing under a run, not the run failing: the disk full or read-only, a file it may not write.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NO_WRITES_ERRNOS = DISK_FULL_ERRNOS | {errno.EROFS}  # no file can be written there: a run writing stops
_DISK_ERRNOS = {errno.ENOSPC: ("the disk is full", "free space there"),
                errno.EDQUOT: ("the disk quota is used up", "free space there"),
                errno.EROFS: ("the file system is read-only", "make it writable"),
                errno.EACCES: ("permission denied", "make it writable"),
                errno.EPERM: ("operation not permitted", "make it writable")}
# TensorFlow's out of memory (its class, not imported here: errors.py is imported before Keras chooses a backend)
_OUT_OF_MEMORY_NAMES = {"MemoryError", "ResourceExhaustedError"}
# What SQLite says when the MLflow store's disk or file fails it (sqlite3.OperationalError's messages).
_STORE_FAILURES = ("readonly database", "disk is full", "unable to open database file", "disk i/o error")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from, and a database driver's own (SQLAlchemy's `orig`). Not those
    it was raised while handling: a bug in an `except OSError:` block is a bug, not the machine's failure."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        behind = (current.__cause__, getattr(current, "orig", None))
        todo += [cause for cause in behind if isinstance(cause, BaseException)]


def machine_failure(exc: BaseException) -> str | None:
    """One line for a run stopped by the machine (out of memory, a full or read-only disk, a store it cannot
    write), saying what to do; None for any other failure. Stages and colorize keep what they finished, so the
    re-run resumes."""
    for cause in causes(exc):
        if type(cause).__name__ in _OUT_OF_MEMORY_NAMES:
            return ("out of memory: close other programs, or lower a batch size or images.concurrency, then re-run: "
                    "finished work is kept")
        if isinstance(cause, sqlite3.OperationalError) and any(m in str(cause).lower() for m in _STORE_FAILURES):
            return (f"the MLflow store cannot be written ({one_line(cause)}): free space or fix its permissions, then "
                    "re-run: finished work is kept")
        if isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS:
            reason, action = _DISK_ERRNOS[cause.errno]
            where = f" ({cause.filename})" if cause.filename else ""
            return f"{reason}{where}: {action}, then re-run: finished work is kept"
    return None
