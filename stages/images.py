"""DVC stage `images`: reads params.yaml, calls the library (same code as `chromalab images`)."""

from chromalab.cli import run

if __name__ == "__main__":
    run(["images"])
