"""User-facing errors: one line that says what was wrong and what to do."""


class ChromalabError(Exception):
    """An error the CLI prints as one line (no traceback) and exits with status 1."""


def one_line(exc: BaseException) -> str:
    """`Type: first line of its message`: how a failure is named in a one-line report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
