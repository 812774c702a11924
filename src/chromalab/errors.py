"""User-facing errors: one line that says what was wrong and what to do."""


class ChromalabError(Exception):
    """An error the CLI prints as one line (no traceback) and exits with status 1."""


def one_line(exc: BaseException) -> str:
    """`Type: first line of its message`: how a failure is named in a one-line report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def printable(text: str, limit: int = 120) -> str:
    """Text from outside (a server's reason phrase or header) as a message may show it: control characters
    escaped, so that it cannot move the cursor, retitle the terminal or fake a line of its own; cut to `limit`."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[:limit] + "…"
