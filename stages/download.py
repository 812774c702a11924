"""DVC stage `download`: reads params.yaml, calls the library (same code as `chromalab download`)."""

from chromalab.cli import run

if __name__ == "__main__":
    run(["download"])
