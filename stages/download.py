"""DVC stage `download`: reads params.yaml, calls the library (same code as `chromalab download`)."""

from chromalab.cli import main

if __name__ == "__main__":
    main(["download"])
