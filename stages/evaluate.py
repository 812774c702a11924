"""DVC stage `evaluate`: reads params.yaml, calls the library (same code as `chromalab evaluate`)."""

from chromalab.cli import main

if __name__ == "__main__":
    main(["evaluate"])
