"""DVC stage `split`: reads params.yaml, calls the library (same code as `chromalab split`)."""

from chromalab.cli import main

if __name__ == "__main__":
    main(["split"])
