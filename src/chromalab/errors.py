"""User-facing errors: one line that says what was wrong and what to do."""


class ChromalabError(Exception):
    """An error the CLI prints as one line (no traceback) and exits with status 1."""
