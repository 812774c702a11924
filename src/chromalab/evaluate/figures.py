"""The evaluate stage's pictures: the comparison sheet, the metrics chart, the ΔE00 histogram, the worst photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chromalab.color import gray_rgb, lab_norm_to_rgb
from chromalab.evaluate.scoring import GRAY_FLOOR
from chromalab.files import atomic_file

# Metrics where lower is better; the chart marks the direction so nobody reads a bar the wrong way.
LOWER_IS_BETTER = {"ab_mse", "ab_mae", "rgb_mse", "rgb_mae", "delta_e00", "delta_e00_median", "delta_e00_p90",
                   "out_of_gamut", "face_cool_cast"}
CHART_NOTES = {
    "colourfulness_gap": "closer to 0 is better",
    "colourfulness_true": "the truth's, for scale",
    "colourfulness": "closer to the truth's is better",
    "edge_chroma_gap": "right - left edge; the truth's is about 0",
    "edge_chroma_gap_true": "the truth's, for scale",
    "beats_gray": "share of photos with lower ΔE00 than gray",
    "face_cool_cast": "share of warm face pixels painted green or blue",
}
COLOURS = {GRAY_FLOOR: "#999999", "baseline": "#4c72b0", "gan": "#dd8452"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)
    _pyplot().close(fig)


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
            panels = [(gray_rgb(L[i]), f"gray: ΔE {delta_e[GRAY_FLOOR][i]:.1f}"),
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
        images = [gray_rgb(L[row])]
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
