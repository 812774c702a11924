#!/usr/bin/env python3
"""The chroma curve's trade-off on runs you trained: test ΔE00 against colourfulness, both models.

    .venv/bin/python scripts/curve_frontier.py RUN [RUN ...] --out frontier.png

Each RUN is a workspace that `dvc repro` (or `dvc exp run`) filled: data/tfrecords and
models/{baseline,gan}/model.keras; its folder's name labels its panel. For each model the curve comes off the
exported model (the GAN's carries it), then goes back on at strengths k = 0 … 1.2 (and at the GAN's exported
k) around the GAN's own pivot; each point is the test split scored as the evaluate stage scores it. The grid
passes `chroma_expand`'s bound of 1 so that a dull model can reach the colour target; above 1 the curve
turns the hue of the nearly gray pixels (C < pivot (k - 1) / k, under 3 Lab units at k 1.2) round.

It answers "which model is closer to the truth at the same colourfulness?", which the evaluate stage's one
point per model cannot. Per run it draws a panel (the exports starred, the issue's colour target shaded) and
prints the exported GAN against the baseline with the curve at the strength that brings it nearest the GAN's
colourfulness without passing it (so that any colour advantage is the baseline's), paired over the test
photos; no match where that is more than MATCH_PCT away. The points go to a JSON file beside the picture.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chromalab.color import AB_SCALE
from chromalab.config import MODEL_NAMES, load_params
from chromalab.data.dataset import load_split_arrays
from chromalab.evaluate.metrics import photo_metrics, summarise
from chromalab.evaluate.scoring import BOOTSTRAP_DRAWS, load_trained, paired_gap
from chromalab.train.models import with_chroma_curve
from chromalab.train.validation import predict_ab

STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0, 1.2)
COLOUR_TARGET_PCT = 15.0  # issue 24: colourfulness within 15 % of the truth's
MATCH_PCT = 5.0  # about two grid steps of colourfulness: further apart, the two models are not alike
BATCH = 16
LABELS = {"baseline": "CNN (baseline)", "gan": "GAN (recipe)"}


def without_curve(model):
    """(the colorizer before its chroma curve, the curve's strength k, its pivot): (model, 0.0, None) for a
    model without one. The curve's gain layer holds scale = k · AB_SCALE / pivot and offset = 1 - k."""
    import keras

    if "chroma_gain" not in {layer.name for layer in model.layers}:
        return model, 0.0, None
    gain = model.get_layer("chroma_gain").get_config()
    strength = 1.0 - float(gain["offset"])
    pivot = strength * AB_SCALE / float(gain["scale"])
    return keras.Model(model.input, model.get_layer("chroma_hue").input), strength, pivot


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
    """The point scored at the model's own exported strength (the grid always holds it)."""
    return next(p for p in model["points"] if p["k"] == model["exported_k"])


def like_for_like(gan: dict, baseline: dict, draws: int = BOOTSTRAP_DRAWS) -> dict | None:
    """The exported GAN against the baseline with the curve at the strength that brings it nearest the GAN's
    colourfulness without passing it: the mean per-photo ΔE00 gap, its bootstrap 95 % interval and the share
    of photos the GAN is closer on. None if no strength leaves the baseline within MATCH_PCT below the GAN."""
    ours = exported_point(gan)
    duller = [p for p in baseline["points"]
              if ours["colourfulness_pct"] - MATCH_PCT <= p["colourfulness_pct"] <= ours["colourfulness_pct"]]
    if not duller:
        return None
    theirs = max(duller, key=lambda p: p["colourfulness_pct"])
    gap = paired_gap(ours["per_photo"], theirs["per_photo"], draws)
    return {"baseline_k": theirs["k"], "baseline_delta_e00": theirs["delta_e00"],
            "baseline_colourfulness_pct": theirs["colourfulness_pct"], "gap": gap["delta_e00_gap"],
            "gap_95": [gap["delta_e00_gap_low95"], gap["delta_e00_gap_high95"]],
            "gan_closer_share": gap["closer_share"]}


def measure(run: Path, pivot: float | None) -> dict:
    """Both models' frontiers on `run`'s test split, around `pivot` (None: the GAN's own), and the match."""
    _, L, true_ab = load_split_arrays(run / "data" / "tfrecords", "test")
    unwrapped = {name: without_curve(load_trained(run / "models", name)) for name in MODEL_NAMES}
    pivot = pivot or unwrapped["gan"][2] or load_params().gan.chroma_pivot
    result = {"pivot": pivot, "photos": len(L)}
    for name, (raw, exported, _) in unwrapped.items():
        grid = sorted({*STRENGTHS, exported})
        result[name] = {"exported_k": exported, "points": frontier(raw, L, true_ab, pivot, grid)}
        print(f"{run.name} {name}: " + "  ".join(f"k {p['k']:g}: {p['delta_e00']:.2f} "
                                                 f"({p['colourfulness_pct']:+.0f} %)" for p in result[name]["points"]),
              flush=True)
    result["like_for_like"] = matched = like_for_like(result["gan"], result["baseline"])
    if matched:
        print(f"{run.name}: the GAN against the baseline at curve k {matched['baseline_k']:g}: gap "
              f"{matched['gap']:+.2f} (95 % {matched['gap_95'][0]:+.2f} … {matched['gap_95'][1]:+.2f}), "
              f"closer on {matched['gan_closer_share']:.0%}", flush=True)
    return result


def for_json(results: dict) -> dict:
    """`results` without the per-photo arrays, with what the numbers mean."""
    runs = {run: {key: ({**value, "points": [{k: v for k, v in p.items() if k != "per_photo"}
                                             for p in value["points"]]} if key in MODEL_NAMES else value)
                  for key, value in result.items()} for run, result in results.items()}
    return {"split": "test", "strengths": list(STRENGTHS), "match_within_pct": MATCH_PCT,
            "bootstrap_draws": BOOTSTRAP_DRAWS, "runs": runs}


def plot(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 4.2), squeeze=False)
    for ax, (label, result) in zip(axes[0], results.items()):
        ax.axvspan(-COLOUR_TARGET_PCT, COLOUR_TARGET_PCT, color="0.92", label="colour target")
        for name, colour in zip(MODEL_NAMES, ("C0", "C1")):
            points, own = result[name]["points"], exported_point(result[name])
            ax.plot([p["colourfulness_pct"] for p in points], [p["delta_e00"] for p in points], "-o",
                    color=colour, ms=3, label=f"{LABELS[name]}, curve k 0 … {points[-1]['k']:g}")
            ax.plot(own["colourfulness_pct"], own["delta_e00"], "*", color=colour, ms=14, mec="k",
                    label=f"{LABELS[name]} as exported (k {own['k']:g})")
        ax.set_title(f"{label} (pivot {result['pivot']:g})")
        ax.set_xlabel("colourfulness against the truth (%)")
    axes[0][0].set_ylabel("test ΔE00 (lower is better)")
    # one legend under the panels: inside any panel it hides some run's curve
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="workspaces with data/tfrecords and models/")
    parser.add_argument("--out", type=Path, required=True, help="the picture (.png); the points go beside it")
    parser.add_argument("--pivot", type=float, default=None,
                        help="default: the GAN's exported pivot, else params.yaml's gan.chroma_pivot")
    args = parser.parse_args()
    labels = [run.resolve().name for run in args.runs]
    if len(set(labels)) != len(labels):
        parser.error(f"the runs' folder names label the panels and must differ: {', '.join(labels)}")
    results = {label: measure(run, args.pivot) for label, run in zip(labels, args.runs)}
    plot(args.out, results)
    args.out.with_suffix(".json").write_text(json.dumps(for_json(results), indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
