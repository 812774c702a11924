"""DVC stage `split`: reads params.yaml, calls the library (same code as `chromalab split`)."""

from chromalab.cli import run

if __name__ == "__main__":
    run(["split"])
