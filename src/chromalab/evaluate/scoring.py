"""Scoring the test photos: each model's and the gray floor's predictions, per-photo metrics and their summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from chromalab.config import MODEL_NAMES, trained_model_path
from chromalab.evaluate.metrics import gray_floor, photo_metrics, summarise

GRAY_FLOOR = "gray_floor"


def load_trained(models_root: Path, name: str):
    import keras

    return keras.saving.load_model(trained_model_path(name, models_root), compile=False)


def failure_summary(delta_e: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per predictor, from its per-photo ΔE00 (all in the same photo order): median, 90th percentile and the
    share of photos on which it is strictly closer to the truth than the gray floor."""
    gray = delta_e[GRAY_FLOOR]
    return {name: {"delta_e00_median": float(np.median(values)),
                   "delta_e00_p90": float(np.percentile(values, 90)),
                   "beats_gray": float(np.mean(values < gray))}
            for name, values in delta_e.items()}


def score(L: np.ndarray, true_ab: np.ndarray, ids: list[str], models_root: Path, batch_size: int):
    """(predictions, per-photo rows, summary, per-photo ΔE00) for the gray floor and every trained model."""
    predictions = {GRAY_FLOOR: gray_floor(true_ab)}
    for name in MODEL_NAMES:
        predicted = load_trained(models_root, name).predict(L, batch_size=batch_size, verbose=0)
        predictions[name] = np.asarray(predicted, dtype=np.float32)
    rows = []
    for i in tqdm(range(len(ids)), desc="evaluate", unit="photo"):
        for name, pred in predictions.items():
            rows.append({"photo_id": ids[i], "model": name, **photo_metrics(L[i], true_ab[i], pred[i])})
    summary = {name: summarise([r for r in rows if r["model"] == name]) for name in predictions}
    delta_e = {name: np.array([r["delta_e00"] for r in rows if r["model"] == name]) for name in predictions}
    for name, extra in failure_summary(delta_e).items():
        summary[name].update(extra)
    return predictions, rows, summary, delta_e
