"""DVC stage `tfrecords`: reads params.yaml, calls the library (same code as `chromalab tfrecords`)."""

from chromalab.cli import run

if __name__ == "__main__":
    run(["tfrecords"])
