"""DVC stage `train@<model>`: reads params.yaml, calls the library (same code as `chromalab train`)."""

import sys

from chromalab.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
