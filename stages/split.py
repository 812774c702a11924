"""DVC stage `split`: reads params.yaml and selects the people subset into train / test / val / reserve (as `chromalab split` does)."""

import this_checkout  # noqa: F401  first: the chromalab beside this file, not the installed one
from chromalab.entry import run_stage


def main() -> None:
    # Imported once run_stage has set up the process (chromalab.entry), before Keras is.
    from chromalab.config import load_params
    from chromalab.data.split import run_split

    run_split(load_params())


if __name__ == "__main__":
    run_stage(main)
