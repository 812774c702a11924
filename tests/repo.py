"""The repository's root, for the tests that read its own files (params.yaml, dvc.yaml, the README, src/)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
