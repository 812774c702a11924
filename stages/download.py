"""DVC stage `download`: reads params.yaml and downloads the Unsplash Lite archive and extracts its tables (as `chromalab download` does)."""

import this_checkout  # noqa: F401  first: the chromalab beside this file, not the installed one
from chromalab.entry import run_stage


def main() -> None:
    # Imported once run_stage has set up the process (chromalab.entry), before Keras is.
    from chromalab.config import load_params
    from chromalab.data.download import run_download

    run_download(load_params())


if __name__ == "__main__":
    run_stage(main)
