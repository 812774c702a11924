"""Stage `evaluate`: both models and the gray floor on every test photo.

The gray floor (predict ab = 0) stands beside every model because RGB SSIM/MSE barely separate a good
colorizer from a gray one (see README); ΔE00, ab metrics and colourfulness do. Means hide failures, so
each model also gets the share of photos on which it beats the gray floor, its ΔE00 median and 90th
percentile, a ΔE00 histogram (delta_e00_hist.png) and its worst photos beside gray and truth (worst.png).
Whether one model is better than the other, or only luckier on these photos, is paired.json: the mean
per-photo ΔE00 gap with its bootstrap interval.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from chromalab.config import MODEL_NAMES, Params
from chromalab.evaluate.figures import comparison_sheet, delta_e_histogram, metrics_chart, worst_sheet
from chromalab.evaluate.scoring import GRAY_FLOOR, model_gaps, score
from chromalab.files import atomic_file, clear_stale_temps, write_text_atomic

PICTURES = ("comparison.png", "metrics_chart.png", "delta_e00_hist.png", "worst.png")  # in reports/evaluate


def log_to_model_runs(reports_root: Path, summary: dict, gaps: dict, pictures: list[Path]) -> list[str]:
    """Test metrics (and the gray floor's, for scale, and the gaps to the other model) into each model's own
    MLflow run."""
    import mlflow

    from chromalab.track import runs

    client = mlflow.MlflowClient(runs.use_store())
    logged = []
    run_ids = {name: runs.training_run_id(reports_root, name) for name in MODEL_NAMES}
    for name, run_id in run_ids.items():
        if not run_id:
            continue
        if not runs.run_in_store(client, run_id):  # another MLFLOW_TRACKING_URI, or removed by `mlflow gc`
            print(f"evaluate: {name}'s training run {run_id} is not in {client.tracking_uri}; its test "
                  "metrics are not logged to MLflow (metrics.json has them)", file=sys.stderr)
            continue
        # Written by id, never reopened: a kill meanwhile would leave the finished training run FAILED or RUNNING.
        for prefix, scores in (("test_", summary[name]), ("test_gray_floor_", summary[GRAY_FLOOR])):
            # a re-run (after a kill, or with other evaluate params) must not add a second point
            runs.log_new_metrics({f"{prefix}{k}": v for k, v in scores.items() if k != "count"}, run_id=run_id)
        for (ours, theirs), gap in gaps.items():
            if ours == name:
                runs.log_new_metrics({f"test_gap_to_{theirs}_{k}": v for k, v in gap.items()}, run_id=run_id)
        for picture in pictures:
            client.log_artifact(run_id, str(picture), artifact_path=pictures_folder(name, run_ids))
        logged.append(run_id)
    return logged


def pictures_folder(name: str, run_ids: dict[str, str | None]) -> str:
    """Where model `name`'s run keeps this evaluation's pictures: evaluate/beside-<other model>-<its run>, since
    they show the other model too. An experiment that reuses this run (DVC's run cache) beside another model adds
    its own folder instead of replacing the pictures of the evaluations before it."""
    beside = [f"{other}-{run_id[:8]}" for other, run_id in run_ids.items() if other != name and run_id]
    return f"evaluate/beside-{'-'.join(beside)}" if beside else "evaluate"


def each_pair_once(gaps: dict) -> dict[tuple[str, str], dict[str, float]]:
    """The later model in MODEL_NAMES against the earlier (gan against baseline): the other order mirrors it."""
    return {pair: gap for pair, gap in gaps.items() if MODEL_NAMES.index(pair[0]) > MODEL_NAMES.index(pair[1])}


def gap_line(ours: str, theirs: str, gap: dict[str, float], photos: int) -> str:
    low, high = gap["delta_e00_gap_low95"], gap["delta_e00_gap_high95"]
    noise = "within" if low <= 0.0 <= high else "beyond"
    return (f"evaluate: {ours} - {theirs} mean ΔE00 {gap['delta_e00_gap']:+.2f} (95 % {low:+.2f} … {high:+.2f} "
            f"over these {photos} test photos: {noise} their noise); {ours} closer on {gap['closer_share']:.0%}")


def run_evaluate(params: Params, *, data_dir: Path = Path("data/tfrecords"), models_root: Path = Path("models"),
                 reports_root: Path = Path("reports"), log_mlflow: bool = True) -> dict:
    from chromalab.data.dataset import load_split_arrays
    from chromalab.track import registry, runs

    if log_mlflow:
        runs.check_tracking_server()
    out_dir = reports_root / "evaluate"
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_stale_temps(out_dir)  # what a killed run's writes left
    ids, L, true_ab = load_split_arrays(data_dir, "test")
    predictions, rows, summary, delta_e = score(L, true_ab, ids, models_root, params.evaluate.batch_size)
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
    gaps = model_gaps(delta_e)
    paired = each_pair_once(gaps)
    write_text_atomic(out_dir / "paired.json",
                      json.dumps({f"{ours}_minus_{theirs}": gap for (ours, theirs), gap in paired.items()}, indent=2))
    for (ours, theirs), gap in paired.items():
        print(gap_line(ours, theirs, gap, len(ids)))
    if log_mlflow:
        with runs.server_failures_in_one_line(runs.tracking_uri(), kept=f"{out_dir} is written",
                                              rerun="re-run to log its scores"):
            log_to_model_runs(reports_root, summary, gaps, [out_dir / name for name in PICTURES])
            registry.record_evaluation(reports_root, summary, registry.test_set_digest(ids, L, true_ab))
    return summary
