#!/usr/bin/env python3
"""The chroma curve's trade-off on runs you trained: test ΔE00 against colourfulness, both models.

    .venv/bin/python scripts/curve_frontier.py RUN [RUN ...] --out frontier.png

Each RUN is a workspace that `dvc repro` (or `dvc exp run`) filled: data/tfrecords and
models/{baseline,gan}/model.keras. For each model the curve comes off the exported model (the GAN's carries
it), then goes back on at strengths k = 0 … 1.2 around the recipe's pivot (`params.yaml`, `gan.chroma_pivot`);
each point is the test split scored as the evaluate stage scores it. One panel per run, the models' own
exports marked, the issue's colour target (within 15 % of the truth) shaded; the points go to a JSON file
beside the picture. It answers "which model is closer to the truth at the same colourfulness?", which the
evaluate stage's single point per model cannot: per run it also prints the exported GAN against the baseline
given the curve at the colourfulness nearest the GAN's (no more colourful), paired over the test photos.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chromalab.config import MODEL_NAMES, load_params
from chromalab.data.dataset import load_split_arrays
from chromalab.evaluate.metrics import photo_metrics, summarise
from chromalab.evaluate.scoring import load_trained, predict_ab
from chromalab.train.models import with_chroma_curve

STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0, 1.2)
COLOUR_TARGET_PCT = 15.0  # issue 24: colourfulness within 15 % of the truth's
BATCH = 16


def without_curve(model):
    """(the colorizer before its chroma curve, the curve's strength k): (model, 0.0) for a model without one."""
    import keras

    names = {layer.name for layer in model.layers}
    if "chroma_gain" not in names:
        return model, 0.0
    strength = 1.0 - float(model.get_layer("chroma_gain").get_config()["offset"])  # offset = 1 - k
    return keras.Model(model.inputs, model.get_layer("chroma_hue").input), strength


def frontier(raw, L: np.ndarray, true_ab: np.ndarray, pivot: float, strengths=STRENGTHS) -> list[dict]:
    """Mean ΔE00 and colourfulness (% against the truth's) of `raw` with the curve at each strength, with the
    per-photo ΔE00 behind the mean (`per_photo`, for paired comparisons)."""
    points = []
    for strength in strengths:
        pred = predict_ab(with_chroma_curve(raw, pivot, strength), L, BATCH)
        rows = [photo_metrics(L[i], true_ab[i], pred[i]) for i in range(len(L))]
        summary = summarise(rows)
        points.append({"k": strength, "delta_e00": summary["delta_e00"],
                       "colourfulness_pct": 100.0 * summary["colourfulness_gap"] / summary["colourfulness_true"],
                       "per_photo": np.array([row["delta_e00"] for row in rows])})
    return points


def exported_point(model: dict) -> dict:
    return min(model["points"], key=lambda p: abs(p["k"] - model["exported_k"]))


def like_for_like(gan: dict, baseline: dict, draws: int = 5000) -> dict | None:
    """The exported GAN against the baseline with the curve at the strength that brings it closest to the GAN's
    colourfulness without passing it: the mean per-photo ΔE00 gap, its bootstrap 95 % interval and the share of
    photos the GAN is closer on. None if no strength leaves the baseline as dull as the GAN or duller."""
    ours = exported_point(gan)
    duller = [p for p in baseline["points"] if p["colourfulness_pct"] <= ours["colourfulness_pct"]]
    if not duller:
        return None
    theirs = max(duller, key=lambda p: p["colourfulness_pct"])
    gap = ours["per_photo"] - theirs["per_photo"]
    rng = np.random.default_rng(0)
    means = gap[rng.integers(0, len(gap), (draws, len(gap)))].mean(axis=1)
    return {"baseline_k": theirs["k"], "baseline_delta_e00": theirs["delta_e00"],
            "baseline_colourfulness_pct": theirs["colourfulness_pct"], "gap": float(gap.mean()),
            "gap_95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "gan_closer_share": float(np.mean(gap < 0))}


def measure(run: Path, pivot: float) -> dict:
    _, L, true_ab = load_split_arrays(run / "data" / "tfrecords", "test")
    result = {}
    for name in MODEL_NAMES:
        raw, exported = without_curve(load_trained(run / "models", name))
        result[name] = {"exported_k": exported, "points": frontier(raw, L, true_ab, pivot)}
        print(f"{run.name} {name}: " + "  ".join(
            f"k {p['k']:g}: {p['delta_e00']:.2f} ({p['colourfulness_pct']:+.0f} %)" for p in result[name]["points"]),
            flush=True)
    result["like_for_like"] = matched = like_for_like(result["gan"], result["baseline"])
    if matched:
        print(f"{run.name}: the GAN against the baseline at curve k {matched['baseline_k']:g}: gap "
              f"{matched['gap']:+.2f} (95 % {matched['gap_95'][0]:+.2f} … {matched['gap_95'][1]:+.2f}), "
              f"closer on {matched['gan_closer_share']:.0%}", flush=True)
    return result


def without_per_photo(results: dict) -> dict:
    """`results` for the JSON file: the points' means only."""
    return {run: {name: ({**model, "points": [{k: v for k, v in p.items() if k != "per_photo"} for p in model["points"]]}
                         if name in MODEL_NAMES else model) for name, model in result.items()}
            for run, result in results.items()}


def plot(path: Path, results: dict[str, dict], pivot: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.6), squeeze=False)
    for ax, (label, result) in zip(axes[0], results.items()):
        ax.axvspan(-COLOUR_TARGET_PCT, COLOUR_TARGET_PCT, color="0.92", label="colour target")
        for name, style in zip(MODEL_NAMES, ("C0", "C1")):  # baseline blue, GAN orange
            points = result[name]["points"]
            ax.plot([p["colourfulness_pct"] for p in points], [p["delta_e00"] for p in points], "-o",
                    color=style, ms=3, label=f"{name}, curve k 0 … {points[-1]['k']:g}")
            own = exported_point(result[name])
            ax.plot(own["colourfulness_pct"], own["delta_e00"], "*", color=style, ms=14, mec="k",
                    label=f"{name} as exported (k {result[name]['exported_k']:g})")
        ax.set_title(label)
        ax.set_xlabel("colourfulness against the truth (%)")
    axes[0][0].set_ylabel(f"test ΔE00 (lower is better); pivot {pivot:g}")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="workspaces with data/tfrecords and models/")
    parser.add_argument("--out", type=Path, required=True, help="the picture (.png); the points go beside it (.json)")
    parser.add_argument("--pivot", type=float, default=None, help="default: params.yaml's gan.chroma_pivot")
    args = parser.parse_args()
    pivot = args.pivot if args.pivot is not None else load_params().gan.chroma_pivot
    results = {run.resolve().name: measure(run, pivot) for run in args.runs}
    plot(args.out, results, pivot)
    args.out.with_suffix(".json").write_text(json.dumps({"pivot": pivot, "runs": without_per_photo(results)}, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
