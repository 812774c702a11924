"""Every stage's first import: this checkout's `src/` goes first on sys.path, so a stage runs the chromalab
beside it. DVC runs a queued or `--temp` experiment in a copy of the repository, while the venv's chromalab
(`pip install -e`) is the workspace's: without this, the copy's stages ran the workspace's code, edited after
the experiment was queued, and its dvc.lock recorded the copy's."""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path[:1]:
    sys.path.insert(0, SRC)
