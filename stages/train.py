"""DVC stage `train@<model>`: reads params.yaml, calls the library (same code as `chromalab train`)."""

import sys

from chromalab.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
