"""DVC stage `evaluate`: reads params.yaml and scores both models and the gray floor (as `chromalab evaluate` does)."""

import this_checkout  # noqa: F401  first: the chromalab beside this file, not the installed one
from chromalab.entry import run_stage


def main() -> None:
    # Imported once run_stage has set up the process (chromalab.entry), before Keras is.
    from chromalab.config import load_params
    from chromalab.evaluate.stage import run_evaluate

    run_evaluate(load_params())


if __name__ == "__main__":
    run_stage(main)
