"""DVC stage `images`: reads params.yaml and fetches the selected photos (resumable) (as `chromalab images` does)."""

import this_checkout  # noqa: F401  first: the chromalab beside this file, not the installed one
from chromalab.entry import run_stage


def main() -> None:
    # Imported once run_stage has set up the process (chromalab.entry), before Keras is.
    from chromalab.config import load_params
    from chromalab.data.images import run_images

    run_images(load_params())


if __name__ == "__main__":
    run_stage(main)
