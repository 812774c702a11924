"""chromalab: learn to colour grayscale photos of people, reproducibly (DVC + MLflow)."""

__version__ = "0.1.0"
