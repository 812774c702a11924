"""The repository's root, for the tests that read its own files (params.yaml, dvc.yaml, the README, src/)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def git_ignored(relative: str) -> bool:
    """Whether the repository's .gitignore rules keep `relative` (which need not exist) out of a `git add -A`."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", relative]).returncode == 0
