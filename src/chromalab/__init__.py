"""chromalab: learn to colour grayscale photos of people, reproducibly (DVC + MLflow).

Importing chromalab changes nothing global: the `chromalab` command and the DVC stages' entry points set up
their process themselves (chromalab.entry).
"""

__version__ = "0.1.0"
