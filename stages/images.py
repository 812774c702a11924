"""DVC stage `images`: reads params.yaml, calls the library (same code as `chromalab images`)."""

from chromalab.cli import main

if __name__ == "__main__":
    main(["images"])
