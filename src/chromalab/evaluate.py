"""Stage `evaluate`: both models and the gray floor on every test photo.

The gray floor (predict ab = 0) stands beside every model because RGB SSIM/MSE barely separate a good
colorizer from a gray one (see README); ΔE00, ab metrics and colourfulness do. Means hide failures, so
each model also gets the share of photos on which it beats the gray floor, its ΔE00 median and 90th
percentile, a ΔE00 histogram (delta_e00_hist.png) and its worst photos beside gray and truth (worst.png).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chromalab.color import lab_norm_to_rgb
from chromalab.config import MODEL_NAMES, Params
from chromalab.errors import ChromalabError
from chromalab.files import atomic_file, write_text_atomic
from chromalab.metrics import gray_floor, photo_metrics, summarise

GRAY_FLOOR = "gray_floor"
# Metrics where lower is better; the chart marks the direction so nobody reads a bar the wrong way.
LOWER_IS_BETTER = {"ab_mse", "ab_mae", "rgb_mse", "rgb_mae", "delta_e00", "delta_e00_median", "delta_e00_p90",
                   "out_of_gamut"}
CHART_NOTES = {
    "colourfulness_gap": "closer to 0 is better",
    "colourfulness_true": "the truth's, for scale",
    "colourfulness": "closer to the truth's is better",
    "edge_chroma_gap": "right - left edge; the truth's is about 0",
    "edge_chroma_gap_true": "the truth's, for scale",
    "beats_gray": "share of photos with lower ΔE00 than gray",
}
PICTURES = ("comparison.png", "metrics_chart.png", "delta_e00_hist.png", "worst.png")  # in reports/evaluate
COLOURS = {GRAY_FLOOR: "#999999", "baseline": "#4c72b0", "gan": "#dd8452"}


def predict_ab(model, L: np.ndarray, batch_size: int) -> np.ndarray:
    return np.asarray(model.predict(L, batch_size=batch_size, verbose=0), dtype=np.float32)


def load_trained(models_root: Path, name: str):
    import keras

    path = models_root / name / "model.keras"
    if not path.is_file():
        raise ChromalabError(f"{path} is missing: train it first (`dvc repro train@{name}`)")
    return keras.saving.load_model(path, compile=False)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    _pyplot().close(fig)


def failure_summary(delta_e: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per predictor, from its per-photo ΔE00 (all in the same photo order): median, 90th percentile and the
    share of photos on which it is strictly closer to the truth than the gray floor."""
    gray = delta_e[GRAY_FLOOR]
    return {name: {"delta_e00_median": float(np.median(values)),
                   "delta_e00_p90": float(np.percentile(values, 90)),
                   "beats_gray": float(np.mean(values < gray))}
            for name, values in delta_e.items()}


def delta_e_histogram(path: Path, delta_e: dict[str, np.ndarray]) -> None:
    """The distribution of per-photo ΔE00 of every predictor, medians dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(np.concatenate(list(delta_e.values())), bins=30)
    for name, values in delta_e.items():
        colour = COLOURS.get(name, "#55a868")
        ax.hist(values, bins=bins, histtype="step", linewidth=1.8, color=colour, label=name)
        ax.axvline(float(np.median(values)), color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel("mean ΔE00 of a test photo (lower is better; dashed: median)")
    ax.set_ylabel("photos")
    ax.legend()
    ax.set_title("Where the models fail: ΔE00 per test photo")
    fig.tight_layout()
    _save(fig, path)


def worst_sheet(path: Path, ids: list[str], L: np.ndarray, predictions: dict[str, np.ndarray],
                true_ab: np.ndarray, delta_e: dict[str, np.ndarray], n_worst: int) -> None:
    """For each model, its `n_worst` photos furthest from the truth (highest ΔE00), worst first, each as
    gray input | the model | truth; the gray floor's ΔE00 beside the model's for scale."""
    plt = _pyplot()
    models = [n for n in predictions if n != GRAY_FLOOR]
    n_rows = min(n_worst, len(ids))
    fig, axes = plt.subplots(n_rows, 3 * len(models), figsize=(2.0 * 3 * len(models), 2.2 * n_rows),
                             squeeze=False)
    for block, name in enumerate(models):
        worst = np.argsort(-delta_e[name], kind="stable")[:n_rows]
        for row, i in enumerate(worst):
            panels = [(np.repeat(np.clip(L[i], 0, 1), 3, axis=-1), f"gray: ΔE {delta_e[GRAY_FLOOR][i]:.1f}"),
                      (lab_norm_to_rgb(L[i], predictions[name][i]), f"{name}: ΔE {delta_e[name][i]:.1f}"),
                      (lab_norm_to_rgb(L[i], true_ab[i]), "truth")]
            for col, (img, title) in enumerate(panels):
                ax = axes[row, 3 * block + col]
                ax.imshow(img)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(title, fontsize=8)
                if col == 0:
                    ax.set_ylabel(ids[i], fontsize=7)
    fig.suptitle("Each model's worst test photos (highest ΔE00), worst first")
    fig.tight_layout()
    _save(fig, path)


def comparison_sheet(path: Path, ids: list[str], L: np.ndarray, predictions: dict[str, np.ndarray],
                     true_ab: np.ndarray) -> None:
    """Gray input | each model | truth, one row per photo."""
    plt = _pyplot()
    columns = ["gray input", *[n for n in predictions if n != GRAY_FLOOR], "truth"]
    fig, axes = plt.subplots(len(ids), len(columns), figsize=(2.2 * len(columns), 2.2 * len(ids)),
                             squeeze=False)
    for row, photo_id in enumerate(ids):
        images = [np.repeat(np.clip(L[row], 0, 1), 3, axis=-1)]
        images += [lab_norm_to_rgb(L[row], predictions[n][row]) for n in columns[1:-1]]
        images.append(lab_norm_to_rgb(L[row], true_ab[row]))
        for col, img in enumerate(images):
            ax = axes[row, col]
            ax.imshow(img)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
            if col == 0:
                ax.set_ylabel(photo_id, fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def metrics_chart(path: Path, summary: dict[str, dict[str, float]]) -> None:
    plt = _pyplot()
    predictors = list(summary)
    names = [k for k in summary[predictors[0]] if k != "count"]
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = [summary[p][name] for p in predictors]
        ax.bar(predictors, values, color=[COLOURS.get(p, "#55a868") for p in predictors])
        arrow = CHART_NOTES.get(name, "lower is better" if name in LOWER_IS_BETTER else "higher is better")
        ax.set_title(f"{name}\n({arrow})", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Test set: models against the gray floor (ab = 0); means unless named")
    fig.tight_layout()
    _save(fig, path)


def log_to_model_runs(reports_root: Path, summary: dict, pictures: list[Path]) -> list[str]:
    """Test metrics (and the gray floor's, for scale) into each model's own MLflow run."""
    import mlflow

    from chromalab import tracking

    tracking.use_store()
    logged = []
    for name in MODEL_NAMES:
        train_metrics = reports_root / name / "train_metrics.json"
        run_id = json.loads(train_metrics.read_text()).get("mlflow_run_id") if train_metrics.is_file() else None
        if not run_id:
            continue
        with mlflow.start_run(run_id=run_id):
            for prefix, scores in (("test_", summary[name]), ("test_gray_floor_", summary[GRAY_FLOOR])):
                mlflow.log_metrics({f"{prefix}{k}": v for k, v in scores.items() if k != "count"})
            for picture in pictures:
                mlflow.log_artifact(str(picture), artifact_path="evaluate")
        logged.append(run_id)
    return logged


def run_evaluate(params: Params, *, data_dir: Path = Path("data/tfrecords"), models_root: Path = Path("models"),
                 reports_root: Path = Path("reports"), log_mlflow: bool = True) -> dict:
    from chromalab import registry, tracking
    from chromalab.tfrecords import load_split_arrays

    if log_mlflow:
        tracking.check_tracking_server()
    out_dir = reports_root / "evaluate"
    out_dir.mkdir(parents=True, exist_ok=True)
    ids, L, true_ab = load_split_arrays(data_dir, "test")
    predictions = {GRAY_FLOOR: gray_floor(true_ab)}
    for name in MODEL_NAMES:
        predictions[name] = predict_ab(load_trained(models_root, name), L, params.evaluate.batch_size)

    rows = []
    for i in tqdm(range(len(ids)), desc="evaluate", unit="photo"):
        for name, pred in predictions.items():
            rows.append({"photo_id": ids[i], "model": name, **photo_metrics(L[i], true_ab[i], pred[i])})
    summary = {name: summarise([r for r in rows if r["model"] == name]) for name in predictions}
    delta_e = {name: np.array([r["delta_e00"] for r in rows if r["model"] == name]) for name in predictions}
    for name, extra in failure_summary(delta_e).items():
        summary[name].update(extra)

    with atomic_file(out_dir / "per_photo.csv", text=True) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    n_sheet = min(params.evaluate.n_sheet, len(ids))
    comparison_sheet(out_dir / "comparison.png", ids[:n_sheet], L[:n_sheet],
                     {k: v[:n_sheet] for k, v in predictions.items()}, true_ab[:n_sheet])
    metrics_chart(out_dir / "metrics_chart.png", summary)
    delta_e_histogram(out_dir / "delta_e00_hist.png", delta_e)
    worst_sheet(out_dir / "worst.png", ids, L, predictions, true_ab, delta_e, params.evaluate.n_worst)
    write_text_atomic(out_dir / "metrics.json", json.dumps(summary, indent=2))
    if log_mlflow:
        log_to_model_runs(reports_root, summary, [out_dir / name for name in PICTURES])
        registry.record_evaluation(reports_root, summary, registry.test_set_digest(ids, L, true_ab))
    return summary
