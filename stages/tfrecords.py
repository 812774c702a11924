"""DVC stage `tfrecords`: reads params.yaml and converts the photos to Lab TFRecords (as `chromalab tfrecords` does)."""

import this_checkout  # noqa: F401  first: the chromalab beside this file, not the installed one
from chromalab.entry import run_stage


def main() -> None:
    # Imported once run_stage has set up the process (chromalab.entry), before Keras is.
    from chromalab.config import load_params
    from chromalab.data.tfrecords import run_tfrecords

    run_tfrecords(load_params())


if __name__ == "__main__":
    run_stage(main)
