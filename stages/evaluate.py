"""DVC stage `evaluate`: reads params.yaml, calls the library (same code as `chromalab evaluate`)."""

from chromalab.cli import run

if __name__ == "__main__":
    run(["evaluate"])
