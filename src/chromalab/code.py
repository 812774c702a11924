"""Which of chromalab's modules a piece of code runs, read from the sources' imports (at the top of a file or
inside a function): what dvc.yaml's deps must cover (tests/test_layout.py) and what a training checkpoint's
fingerprint hashes, so that the two agree on what "the code changed" means."""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

import chromalab


def source_root() -> Path:
    """The folder that holds the chromalab package (`src/`), read at each call so that a test can point it at a
    copy."""
    return Path(chromalab.__file__).resolve().parent.parent


def module_file(name: str) -> Path | None:
    """The file of chromalab module `name` (a package's __init__.py), or None if it is no module of ours."""
    base = source_root().joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Every chromalab module `path` imports, with the packages above each (Python runs a package's __init__
    before any module in it)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from chromalab.train import losses` imports the module chromalab.train.losses
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "chromalab":
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                             if module_file(".".join(parts[:i])))
    return found


def import_closure(path: Path) -> set[str]:
    """The chromalab modules that running `path` can import, directly or through each other."""
    seen: set[str] = set()
    todo = list(imported_modules(path))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(module_file(name)) - seen)
    return seen


@functools.lru_cache(maxsize=None)
def code_hash(module: str) -> str:
    """SHA-256 of `module` and every chromalab module it can import (each file's path and bytes): an edit to
    any other module (serve's page, colorize) leaves it alone, as it leaves DVC's deps alone."""
    root = source_root()
    files = {module_file(module)} | {module_file(name) for name in import_closure(module_file(module))}
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
