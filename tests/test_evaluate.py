"""Stage `evaluate` on real photo crops (8 train / 4 test at 32 px) with both models saved as training leaves them.

Evaluate needs from training only models/<m>/model.keras and the MLflow run id in reports/<m>/train_metrics.json
(test_pipeline.py checks that `dvc repro` hands real trained models over): here each is a tiny untrained model
whose last layer leans to a tint of its own, so the two model columns of every sheet are told apart, in a run
opened as training opens it (chromalab.track.runs.model_run). The numbers are checked against values computed
here independently (from the test split's arrays and the saved models), the pictures panel by panel against
the pictures they must show, the MLflow runs through a client on the store.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pytest
from skimage import color as skcolor

from chromalab.track import runs
from chromalab.color import AB_SCALE, L_SCALE
from chromalab.config import MODEL_NAMES, parse_params
from chromalab.errors import ChromalabError
from chromalab.evaluate.figures import COLOURS
from chromalab.evaluate.scoring import GRAY_FLOOR, paired_gap
from chromalab.evaluate.stage import run_evaluate
from chromalab.evaluate.metrics import METRIC_KEYS
from chromalab.train.models import build_model
from chromalab.data.dataset import load_split_arrays, read_dataset_info
from chromalab.data.tfrecords import run_tfrecords
from chromalab.bench.samples import write_images_stage
from sheets import (DPI, assert_charts_draw, assert_comparison_sheet, assert_shows, colour_picture, gray_picture,
                    mean_diff, panels, read_rgb)

N_TRAIN, N_TEST, SIZE = 8, 4, 32
N_SHEET = 3  # fewer than the test photos: the sheet must take n_sheet rows, not every photo
PREDICTORS = (GRAY_FLOOR, *MODEL_NAMES)
SHEET_COLUMNS = ("gray input", "baseline", "gan", "truth")
TINY = {
    "base": {"image_size": SIZE},
    "tfrecords": {"shard_size": 4},
    "baseline": {"width": 0.125},
    "gan": {"width": 0.125},
    "evaluate": {"n_sheet": N_SHEET, "batch_size": 4},
}
TFRECORDS = Path("data/tfrecords")
REPORTS = Path("reports/evaluate")
# ab and L are stored as float16 and the metrics run in float64: sums over a few thousand pixels agree to
# ~1e-7 relative; the model predictions are recomputed here, at another batch size, so allow a little more.
REL = 1e-5
FAILURE_KEYS = ("delta_e00_median", "delta_e00_p90", "beats_gray")


def tiny_params(**overrides: dict):
    raw = {group: dict(values) for group, values in TINY.items()}
    for group, values in overrides.items():
        raw[group].update(values)
    return parse_params(raw)


def train_run_id(model_name: str) -> str:
    return json.loads(Path(f"reports/{model_name}/train_metrics.json").read_text())["mlflow_run_id"]


# ab = tanh(bias) where the rest of the untrained net adds little: a reddish baseline, a yellow-green GAN.
TINTS = {"baseline": (0.3, 0.1), "gan": (-0.25, 0.3)}


def save_as_trained(params, model_name: str, tint: tuple[float, float], seed: int = 0) -> str:
    """What train@<model> leaves for evaluate, without the training: the model file and, in
    train_metrics.json, the id of the model's MLflow run. Returns that run id."""
    keras.utils.set_random_seed(seed)
    model = build_model(model_name, SIZE, width=params.model(model_name).width)
    model.layers[-1 if model_name == "gan" else -2].bias.assign(np.arctanh(tint))  # the tanh layer
    dataset_hash = read_dataset_info(TFRECORDS)["content_hash"]
    with runs.model_run(model_name, params, dataset_hash=dataset_hash, stage=f"train@{model_name}") as run:
        Path(f"models/{model_name}").mkdir(parents=True, exist_ok=True)
        model.save(f"models/{model_name}/model.keras")
    Path(f"reports/{model_name}").mkdir(parents=True, exist_ok=True)
    Path(f"reports/{model_name}/train_metrics.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id}))
    return run.info.run_id


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, mlflow_db_template):
    """A git repo (the MLflow store's root) with data, both models saved and `evaluate` run once."""
    root = tmp_path_factory.mktemp("evaluate")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q",
                    "--allow-empty", "-m", "start"], cwd=root, check=True)
    shutil.copy(mlflow_db_template, root / "mlflow.db")  # the default store, its tables made already
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
            mp.delenv(name, raising=False)
        mp.chdir(root)
        params = tiny_params()
        write_images_stage(root / "data/images", n_train=N_TRAIN, n_test=N_TEST, size=SIZE)
        run_tfrecords(params, workers=1)
        for name in MODEL_NAMES:
            save_as_trained(params, name, TINTS[name])
        summary = run_evaluate(params)
        yield SimpleNamespace(root=root, params=params, first_summary=summary,
                              first_run_ids={name: train_run_id(name) for name in MODEL_NAMES})


@pytest.fixture(scope="module")
def split_arrays(evaluated) -> SimpleNamespace:
    ids, L, ab = load_split_arrays(TFRECORDS, "test")
    return SimpleNamespace(ids=ids, L=L.astype(np.float64), ab=ab.astype(np.float64))


@pytest.fixture(scope="module")
def predicted(split_arrays) -> dict[str, np.ndarray]:
    """Each saved model's ab on the test split, computed here (before the last test replaces the GAN)."""
    return {name: predictions(name, split_arrays.L) for name in MODEL_NAMES}


def read_rows() -> list[dict[str, str]]:
    with (REPORTS / "per_photo.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def predictions(model_name: str, L: np.ndarray) -> np.ndarray:
    """The saved model's ab for L, computed here rather than taken from the stage."""
    model = keras.saving.load_model(Path(f"models/{model_name}/model.keras"), compile=False)
    return np.asarray(model.predict(L.astype(np.float32), batch_size=1, verbose=0), dtype=np.float64)


def strict_json(path: Path) -> dict:
    """JSON as DVC reads it: NaN or Infinity would be an error."""
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_per_photo_csv_has_one_labelled_row_per_photo_and_predictor(evaluated, split_arrays, predicted):
    rows = read_rows()
    header = list(rows[0])
    assert header == ["photo_id", "model", *METRIC_KEYS]
    labelled = {f"{space}_{name}" for space in ("ab", "rgb") for name in ("ssim", "mse", "mae")}
    assert labelled | {"rgb_psnr", "delta_e00", "colourfulness", "colourfulness_gap"} <= set(header)
    assert sorted((r["photo_id"], r["model"]) for r in rows) == sorted(
        (photo_id, name) for photo_id in split_arrays.ids for name in PREDICTORS)
    assert all(math.isfinite(float(r[key])) for r in rows for key in METRIC_KEYS)

    by_key = {(r["photo_id"], r["model"]): r for r in rows}
    for i, photo_id in enumerate(split_arrays.ids):
        true_ab = split_arrays.ab[i]
        gray = by_key[photo_id, GRAY_FLOOR]
        assert float(gray["ab_mse"]) == pytest.approx(np.mean(true_ab**2), rel=REL)
        assert float(gray["ab_mae"]) == pytest.approx(np.mean(np.abs(true_ab)), rel=REL)
        assert float(gray["colourfulness"]) == 0.0
        assert float(gray["colourfulness_gap"]) == -float(gray["colourfulness_true"])
        # The truth's colourfulness depends on the photo only.
        assert len({by_key[photo_id, name]["colourfulness_true"] for name in PREDICTORS}) == 1
        for name in MODEL_NAMES:
            error = predicted[name][i] - true_ab
            assert float(by_key[photo_id, name]["ab_mse"]) == pytest.approx(np.mean(error**2), rel=1e-4)
            assert float(by_key[photo_id, name]["ab_mae"]) == pytest.approx(np.mean(np.abs(error)), rel=1e-4)


def test_metrics_file_holds_each_predictors_means_and_the_gray_floor_is_exact(evaluated, split_arrays):
    summary = strict_json(REPORTS / "metrics.json")
    assert set(summary) == set(PREDICTORS)
    rows = read_rows()
    for name in PREDICTORS:
        assert summary[name]["count"] == N_TEST
        mine = [r for r in rows if r["model"] == name]
        for key in METRIC_KEYS:
            assert summary[name][key] == pytest.approx(np.mean([float(r[key]) for r in mine]), rel=1e-9)

    gray = summary[GRAY_FLOOR]
    L, ab = split_arrays.L, split_arrays.ab
    assert gray["colourfulness"] == 0.0
    assert gray["ab_mse"] == pytest.approx(np.mean(ab**2), rel=REL)  # equal-size photos: mean of means
    assert gray["ab_mae"] == pytest.approx(np.mean(np.abs(ab)), rel=REL)
    true_lab = np.concatenate([L * L_SCALE, ab * AB_SCALE], axis=-1)
    gray_lab = np.concatenate([L * L_SCALE, np.zeros_like(ab)], axis=-1)
    assert gray["delta_e00"] == pytest.approx(
        skcolor.deltaE_ciede2000(true_lab, gray_lab, channel_axis=-1).mean(), rel=REL)
    # Every predictor shares the photos' L, so the truth's colourfulness is the same for all.
    assert len({round(summary[name]["colourfulness_true"], 9) for name in PREDICTORS}) == 1


def assert_rows_show(grid: list[list[np.ndarray]], expected: list[list[np.ndarray]], names: list[str]) -> None:
    """Each panel shows its own picture, nearer to it than to any other picture of its row; and over the rows
    each column is far from every other column's pictures (a dark photo's colours alone are close to gray)."""
    far = np.zeros((len(names), len(names)))
    for r, (row, pictures) in enumerate(zip(grid, expected)):
        for c, panel in enumerate(row):
            assert_shows(panel, pictures[c], f"row {r}, {names[c]}")
            diffs = [mean_diff(panel, picture) for picture in pictures]
            assert int(np.argmin(diffs)) == c, f"row {r}, {names[c]}: nearer another column's picture {diffs}"
            far[c] += np.array(diffs) / len(grid)
    for c, name in enumerate(names):
        others = np.delete(far[c], c)
        assert others.min() > 2 * far[c, c] + 5, f"{name}: columns too alike on average {far[c]}"


def test_comparison_sheet_is_n_sheet_rows_of_gray_models_truth(evaluated, split_arrays, predicted):
    L, ab = split_arrays.L[:N_SHEET], split_arrays.ab[:N_SHEET]  # n_sheet rows, not every test photo
    grid, expected = assert_comparison_sheet(REPORTS / "comparison.png", L, ab,
                                             {name: predicted[name][:N_SHEET] for name in MODEL_NAMES}, SHEET_COLUMNS)
    assert_rows_show(grid, expected, list(SHEET_COLUMNS))  # and the columns are told apart


def test_worst_sheet_shows_each_models_worst_photos_beside_gray_and_truth(evaluated, split_arrays, predicted):
    sheet = read_rgb(REPORTS / "worst.png")
    n_rows = min(evaluated.params.evaluate.n_worst, N_TEST)
    columns = 3 * len(MODEL_NAMES)  # gray | model | truth for each model
    assert sheet.shape[:2] == (round(2.2 * DPI) * n_rows, round(2.0 * DPI) * columns)
    grid = panels(sheet)
    assert [len(row) for row in grid] == [columns] * n_rows

    rows = read_rows()
    L, ab = split_arrays.L, split_arrays.ab
    index = {photo_id: i for i, photo_id in enumerate(split_arrays.ids)}
    for b, name in enumerate(MODEL_NAMES):  # one block of three columns per model
        delta_e = {r["photo_id"]: float(r["delta_e00"]) for r in rows if r["model"] == name}
        worst_first = sorted(split_arrays.ids, key=lambda photo_id: -delta_e[photo_id])[:n_rows]
        expected = [[gray_picture(L[i]), colour_picture(L[i], predicted[name][i]), colour_picture(L[i], ab[i])]
                    for i in (index[photo_id] for photo_id in worst_first)]
        block = [row[3 * b: 3 * b + 3] for row in grid]
        assert_rows_show(block, expected, [f"{name}'s gray", name, f"{name}'s truth"])


def test_metrics_chart_and_histogram_draw_every_predictor(evaluated):
    assert_charts_draw(REPORTS, {name: COLOURS[name] for name in PREDICTORS})


def test_each_models_run_gets_its_test_metrics_the_gray_floors_and_the_pictures(evaluated):
    summary = strict_json(REPORTS / "metrics.json")
    client = mlflow.MlflowClient(runs.tracking_uri())
    assert runs.tracking_uri() == f"sqlite:///{evaluated.root.resolve() / 'mlflow.db'}"
    for name in MODEL_NAMES:
        run = client.get_run(train_run_id(name))
        assert run.info.status == "FINISHED"
        logged = run.data.metrics
        for key in (*METRIC_KEYS, *FAILURE_KEYS):
            assert logged[f"test_{key}"] == pytest.approx(summary[name][key])
            assert logged[f"test_gray_floor_{key}"] == pytest.approx(summary[GRAY_FLOOR][key])
        (other,) = set(MODEL_NAMES) - {name}  # the pictures show it too: they live beside its run's id
        folder = f"evaluate/beside-{other}-{train_run_id(other)[:8]}"
        assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluate")] == [folder]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, folder)}
        assert artifacts == {f"{folder}/{picture}" for picture in
                             ("comparison.png", "metrics_chart.png", "delta_e00_hist.png", "worst.png")}
    # Evaluating must not turn its choice of store into an override for everything after it.
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_stop_while_logging_to_mlflow_leaves_the_finished_training_runs_finished(evaluated, monkeypatch):
    """Ctrl-C or SIGTERM (a KeyboardInterrupt, chromalab.entry) while evaluate logs into the training runs: they
    ran to their end and must stay FINISHED, not turn FAILED or KILLED (or RUNNING, after a kill -9)."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", stop)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(evaluated.params)
    client = mlflow.MlflowClient(runs.tracking_uri())
    assert [client.get_run(train_run_id(name)).info.status for name in MODEL_NAMES] == ["FINISHED"] * 2


def test_a_tracking_server_failing_while_evaluate_logs_is_one_line(evaluated, faulty_proxy, monkeypatch):
    # MLflow's traceback once its retries ran out; the reports were written already
    uri, faults, _ = faulty_proxy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    faults["/api/2.0/mlflow/model-versions/search"] = 500
    with pytest.raises(ChromalabError) as err:
        run_evaluate(evaluated.params)
    assert str(err.value) == (f"MLflow tracking server {uri} answered HTTP 500 mid-stage; {REPORTS} is written: the "
                              "server failed: see its log, then re-run to log its scores")


def test_a_stop_signal_while_a_model_predicts_stops_between_batches_not_inside_tensorflow(tmp_path, monkeypatch):
    """Raised inside TensorFlow's loading or tracing, a Ctrl-C printed an ignored exception's traceback after the
    stop's one line: it now waits for the batches in hand, then stops."""
    import signal

    from chromalab import entry
    from chromalab.evaluate import scoring

    (tmp_path / "gan").mkdir()
    build_model("gan", 32, width=0.125).save(tmp_path / "gan" / "model.keras")
    L = np.random.default_rng(0).random((12, 32, 32, 1), dtype=np.float32)
    real_predict, calls = keras.Model.predict, []

    def predict_then_signal(model, batch, **kwargs):
        calls.append(len(batch))
        os.kill(os.getpid(), signal.SIGINT)  # arrives while TensorFlow predicts
        return real_predict(model, batch, **kwargs)

    monkeypatch.setattr(keras.Model, "predict", predict_then_signal)
    monkeypatch.setattr(entry, "_stops", [])
    previous = {signum: signal.getsignal(signum) for signum in entry.STOP_SIGNALS}
    entry.handle_stop_signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            scoring.predicted_ab(tmp_path, "gan", L, batch_size=2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert calls == [2 * scoring.BATCHES_PER_CHECK]  # the first batches predicted in full, then the stop
    assert not entry._deferring[0]


def test_a_missing_model_is_one_line_naming_the_stage_that_makes_it(evaluated, tmp_path):
    models = tmp_path / "models"
    shutil.copytree("models/baseline", models / "baseline")
    with pytest.raises(ChromalabError) as raised:
        run_evaluate(evaluated.params, models_root=models, reports_root=tmp_path / "reports", log_mlflow=False)
    message = str(raised.value)
    assert "\n" not in message and "dvc repro train@gan" in message
    assert not (tmp_path / "reports/evaluate/metrics.json").exists()


def test_runs_missing_from_the_store_are_skipped_and_a_killed_runs_temp_files_cleared(evaluated, tmp_path, capsys):
    """train_metrics.json naming runs this store lacks (another MLFLOW_TRACKING_URI, `mlflow gc`): the stage
    still writes its reports, says why nothing went to MLflow, and clears what a killed run's writes left."""
    reports = tmp_path / "reports"
    for name in MODEL_NAMES:
        (reports / name).mkdir(parents=True)
        (reports / name / "train_metrics.json").write_text(json.dumps({"mlflow_run_id": "0" * 32}))
    (reports / "evaluate").mkdir()
    stale = reports / "evaluate" / ".metrics.json.0123abcd.tmp"
    stale.write_text("half of a killed run's write")
    run_evaluate(evaluated.params, reports_root=reports)
    assert strict_json(reports / "evaluate" / "metrics.json")["gan"]["count"] == N_TEST
    assert not stale.exists()
    err = capsys.readouterr().err
    assert all(f"{name}'s training run {'0' * 32} is not in" in err for name in MODEL_NAMES), err


def test_failures_are_counted_per_photo_not_averaged_away(evaluated, split_arrays):
    summary = strict_json(REPORTS / "metrics.json")
    rows = read_rows()
    delta_e = {name: np.array([float(r["delta_e00"]) for r in rows if r["model"] == name]) for name in PREDICTORS}
    for name in PREDICTORS:
        assert summary[name]["delta_e00_median"] == pytest.approx(np.median(delta_e[name]))
        assert summary[name]["delta_e00_p90"] == pytest.approx(np.percentile(delta_e[name], 90))
        wins = sum(float(m) < float(g) for m, g in zip(delta_e[name], delta_e[GRAY_FLOOR]))
        assert summary[name]["beats_gray"] == pytest.approx(wins / N_TEST)
        assert 0.0 <= summary[name]["out_of_gamut"] <= 1.0
    assert summary[GRAY_FLOOR]["beats_gray"] == 0.0 and summary[GRAY_FLOOR]["out_of_gamut"] == 0.0
    assert summary[GRAY_FLOOR]["edge_chroma_gap"] == 0.0
    # The truth's own edge gap is the photos', the same whichever predictor it sits beside.
    assert len({round(summary[name]["edge_chroma_gap_true"], 9) for name in PREDICTORS}) == 1


def test_paired_gap_is_the_mean_per_photo_gap_with_the_photos_sampling_interval():
    better_everywhere = paired_gap(np.full(200, 9.0), np.full(200, 10.0))
    assert better_everywhere == {"delta_e00_gap": -1.0, "delta_e00_gap_low95": -1.0, "delta_e00_gap_high95": -1.0,
                                 "closer_share": 1.0}
    assert paired_gap(np.full(5, 3.0), np.full(5, 3.0))["closer_share"] == 0.0  # a tie is not closer

    rng = np.random.default_rng(1)
    theirs = rng.uniform(6, 14, 200)
    for shift, noise_could_explain_it in ((-0.5, False), (0.0, True)):
        gap_per_photo = shift + rng.normal(0, 1, 200)
        gap = paired_gap(theirs + gap_per_photo, theirs)
        assert gap["delta_e00_gap"] == pytest.approx(gap_per_photo.mean())
        assert gap["closer_share"] == pytest.approx(np.mean(gap_per_photo < 0))
        low, high = gap["delta_e00_gap_low95"], gap["delta_e00_gap_high95"]
        assert (low <= 0.0 <= high) == noise_could_explain_it
        # a bootstrap over the photos: about the normal interval of their mean, not of single photos or pixels
        half_width = 1.96 * gap_per_photo.std() / np.sqrt(200)
        assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
        assert paired_gap(theirs + gap_per_photo, theirs) == gap  # the same scores, the same interval


def test_paired_file_and_each_runs_gap_come_from_the_per_photo_scores(evaluated):
    rows = read_rows()
    delta_e = {name: {r["photo_id"]: float(r["delta_e00"]) for r in rows if r["model"] == name} for name in MODEL_NAMES}
    per_photo = np.array([delta_e["gan"][photo] - delta_e["baseline"][photo] for photo in delta_e["gan"]])
    paired = strict_json(REPORTS / "paired.json")
    assert set(paired) == {"gan_minus_baseline"}  # each pair once
    gap = paired["gan_minus_baseline"]
    assert gap["delta_e00_gap"] == pytest.approx(per_photo.mean())
    assert gap["closer_share"] == pytest.approx(np.mean(per_photo < 0))
    assert gap["delta_e00_gap_low95"] <= gap["delta_e00_gap"] <= gap["delta_e00_gap_high95"]

    client = mlflow.MlflowClient(runs.tracking_uri())
    logged = {name: client.get_run(train_run_id(name)).data.metrics for name in MODEL_NAMES}
    for key, value in gap.items():
        assert logged["gan"][f"test_gap_to_baseline_{key}"] == pytest.approx(value)
    # the baseline's run sees the same gap from its side
    assert logged["baseline"]["test_gap_to_gan_delta_e00_gap"] == pytest.approx(-gap["delta_e00_gap"])
    assert logged["baseline"]["test_gap_to_gan_delta_e00_gap_low95"] == pytest.approx(-gap["delta_e00_gap_high95"])
    assert logged["baseline"]["test_gap_to_gan_closer_share"] == pytest.approx(np.mean(per_photo > 0))


def test_re_evaluating_after_a_retrain_reports_the_new_model_into_its_new_run(evaluated, capsys):
    before, old_gan_run = evaluated.first_summary, evaluated.first_run_ids["gan"]
    params = tiny_params(gan={"epochs": 2})
    retrained_run = save_as_trained(params, "gan", (0.3, -0.3), seed=1)
    assert retrained_run != old_gan_run

    capsys.readouterr()
    run_evaluate(params)
    after = strict_json(REPORTS / "metrics.json")
    gap = strict_json(REPORTS / "paired.json")["gan_minus_baseline"]
    assert gap["delta_e00_gap"] == pytest.approx(after["gan"]["delta_e00"] - after["baseline"]["delta_e00"])
    noise = "within" if gap["delta_e00_gap_low95"] <= 0 <= gap["delta_e00_gap_high95"] else "beyond"
    assert (f"evaluate: gan - baseline mean ΔE00 {gap['delta_e00_gap']:+.2f} (95 % {gap['delta_e00_gap_low95']:+.2f}"
            f" … {gap['delta_e00_gap_high95']:+.2f} over these {N_TEST} test photos: {noise} their noise); gan closer"
            f" on {gap['closer_share']:.0%}") in capsys.readouterr().out
    assert after["gan"]["ab_mse"] != before["gan"]["ab_mse"]
    assert after["gan"]["delta_e00"] != before["gan"]["delta_e00"]
    for unchanged in (GRAY_FLOOR, "baseline"):
        assert after[unchanged] == pytest.approx(before[unchanged])
    gan_rows = [r for r in read_rows() if r["model"] == "gan"]
    assert np.mean([float(r["ab_mse"]) for r in gan_rows]) == pytest.approx(after["gan"]["ab_mse"])

    client = mlflow.MlflowClient(runs.tracking_uri())
    new_metrics = client.get_run(retrained_run).data.metrics
    old_metrics = client.get_run(old_gan_run).data.metrics
    for key in ("ab_mse", "delta_e00", "colourfulness"):
        assert new_metrics[f"test_{key}"] == pytest.approx(after["gan"][key])
        assert old_metrics[f"test_{key}"] == pytest.approx(before["gan"][key])  # the old run keeps its own
    # the baseline, evaluated again on the same photos, keeps one point per test metric, not one per evaluation
    baseline_run = evaluated.first_run_ids["baseline"]
    assert [len(client.get_metric_history(baseline_run, f"test_{key}")) for key in ("delta_e00", "ab_mse")] == [1, 1]
