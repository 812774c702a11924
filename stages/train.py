"""DVC stage `train@<model>`: reads params.yaml and trains one model (as `chromalab train <model>` does)."""

import sys

import this_checkout  # noqa: F401  first: the chromalab beside this file, not the installed one
from chromalab.entry import run_stage


def main() -> None:
    # Imported once run_stage has set up the process (chromalab.entry), before Keras is.
    from chromalab.config import load_params
    from chromalab.train.stage import run_train

    run_train(load_params(), " ".join(sys.argv[1:]))  # anything but one model name is refused by run_train


if __name__ == "__main__":
    run_stage(main)
