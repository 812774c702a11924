"""Scoring the test photos: each model's and the gray floor's predictions, per-photo metrics and their summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from chromalab.config import MODEL_NAMES, trained_model_path
from chromalab.entry import raise_if_stopped, stops_deferred
from chromalab.evaluate.metrics import gray_floor, photo_metrics, summarise

GRAY_FLOOR = "gray_floor"
BATCHES_PER_CHECK = 4  # a Ctrl-C waits at most this many batches
# Resampled means of the per-photo gaps: enough that the interval's ends vary from one set of draws to
# another far less than the gaps worth telling apart (README, "Reading the evaluation").
BOOTSTRAP_DRAWS = 5000


def predicted_ab(models_root: Path, name: str, L: np.ndarray, batch_size: int) -> np.ndarray:
    """The trained model's ab for L. A Ctrl-C or SIGTERM stops between a few batches: raised inside
    TensorFlow's loading or tracing, it printed an ignored exception's traceback after the stop's line."""
    parts = []
    with stops_deferred():
        model = load_trained(models_root, name)
        raise_if_stopped()
        for start in range(0, len(L), batch_size * BATCHES_PER_CHECK):
            part = L[start:start + batch_size * BATCHES_PER_CHECK]
            parts.append(np.asarray(model.predict(part, batch_size=batch_size, verbose=0), dtype=np.float32))
            raise_if_stopped()
    return np.concatenate(parts)


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


def paired_gap(ours: np.ndarray, theirs: np.ndarray, draws: int = BOOTSTRAP_DRAWS) -> dict[str, float]:
    """`ours` against `theirs`, from their per-photo ΔE00 on the same photos: the mean gap (< 0: ours is closer
    to the truth), its 95 % bootstrap interval over the photos, and the share of photos ours is strictly
    closer on. The interval is the test photos' sampling noise only: a retrained model moves too."""
    gap = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    rng = np.random.default_rng(0)  # fixed, so that the same scores always give the same interval
    means = gap[rng.integers(0, len(gap), (draws, len(gap)))].mean(axis=1)
    return {"delta_e00_gap": float(gap.mean()), "delta_e00_gap_low95": float(np.percentile(means, 2.5)),
            "delta_e00_gap_high95": float(np.percentile(means, 97.5)), "closer_share": float(np.mean(gap < 0))}


def model_gaps(delta_e: dict[str, np.ndarray]) -> dict[tuple[str, str], dict[str, float]]:
    """`paired_gap` of every trained model against every other, keyed (model, the other)."""
    return {(ours, theirs): paired_gap(delta_e[ours], delta_e[theirs])
            for ours in MODEL_NAMES for theirs in MODEL_NAMES if ours != theirs}


def score(L: np.ndarray, true_ab: np.ndarray, ids: list[str], models_root: Path, batch_size: int):
    """(predictions, per-photo rows, summary, per-photo ΔE00) for the gray floor and every trained model."""
    predictions = {GRAY_FLOOR: gray_floor(true_ab)}
    for name in MODEL_NAMES:
        predictions[name] = predicted_ab(models_root, name, L, batch_size)
    rows = []
    for i in tqdm(range(len(ids)), desc="evaluate", unit="photo"):
        for name, pred in predictions.items():
            rows.append({"photo_id": ids[i], "model": name, **photo_metrics(L[i], true_ab[i], pred[i])})
    summary = {name: summarise([r for r in rows if r["model"] == name]) for name in predictions}
    delta_e = {name: np.array([r["delta_e00"] for r in rows if r["model"] == name]) for name in predictions}
    for name, extra in failure_summary(delta_e).items():
        summary[name].update(extra)
    return predictions, rows, summary, delta_e
