"""Serving a trained colorizer: the MLflow pyfunc model (pyfunc.py) and the `chromalab serve` page (app.py)."""
