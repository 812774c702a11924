"""End to end with real DVC: a temporary git repo, the project's dvc.yaml and stages, a fake Unsplash.

One module-scoped pipeline (tiny: 32 px, 16 train / 4 test photos, width-0.125 models, a few epochs) that
the tests below inspect in order: data stages, the DAG, training + evaluation (whose first `dvc repro` is
killed mid-way through train@gan and resumed), DVC's plan for a change of each model's params, then one
experiment run for real.
"""

from __future__ import annotations

import csv
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from chromalab.color import lab_norm_to_rgb
from conftest import TENSORFLOW_NOISE, stop_process_group
from repo import ROOT
from sheets import assert_charts_draw, assert_comparison_sheet, panels, read_rgb

pytestmark = pytest.mark.slow

N_TRAIN, N_TEST, N_VAL = 16, 4, 4

TINY_PARAMS = {
    "base": {"seed": 7, "image_size": 32},
    "split": {"n_train": N_TRAIN, "n_test": N_TEST, "n_val": N_VAL, "n_reserve": 8},
    "images": {"concurrency": 4, "timeout_s": 5.0, "retries": 2},
    "tfrecords": {"shard_size": 8},
    "train": {"val_every": 1, "checkpoint_every": 1, "sample_every": 3, "n_samples": 2},
    "baseline": {"epochs": 2, "batch_size": 4, "width": 0.125},
    # Enough epochs that a kill after the first checkpoint lands while epochs are left to train.
    "gan": {"epochs": 6, "batch_size": 4, "width": 0.125, "pretrain_epochs": 1, "warmup_epochs": 1},
    "evaluate": {"n_sheet": 2, "batch_size": 4},
}


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's python for stages
    env.pop("PYTHONPATH", None)  # the stages run the repo's own copy of the library by themselves
    env["DVC_SITE_CACHE_DIR"] = str(repo.parent / "dvc-site-cache")
    env["HOME"] = str(repo.parent)  # no global git/dvc config from the developer's home
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    for name in ("MLFLOW_TRACKING_URI", "TF_CPP_MIN_LOG_LEVEL"):  # as a user's shell has them: the stages are quiet
        env.pop(name, None)
    return env


def run(repo: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def server():
    from fake_unsplash import FakeUnsplash, lite_photos, make_lite_archive

    with FakeUnsplash() as srv:
        photos = lite_photos({"person": 30, "person_user": 2, "bw_keyword": 2, "other": 4}, seed=1)
        srv.archive = make_lite_archive(photos, image_base_url=srv.url, parts=2)
        people = [p.photo_id for p in photos if p.kind == "person"]
        srv.image_faults = {people[0]: "404", people[1]: "gray"}  # both must be replaced from the reserve
        yield srv


@pytest.fixture(scope="module")
def repo(tmp_path_factory, server) -> Path:
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in TINY_PARAMS.items():
        params[group].update(values)
    params["data"]["url"] = server.latest_url
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "init", "-q")
    # in the repo's own config: `dvc exp run` on a workspace an experiment has changed stashes it first
    run(repo, "git", "config", "user.name", "test")
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "dvc", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "tiny pipeline")
    return repo


@pytest.fixture(scope="module")
def data_stages(repo) -> str:
    return run(repo, "dvc", "repro", "tfrecords")


def test_dag_orders_the_stages(repo):
    edges = run(repo, "dvc", "dag", "--dot")
    for a, b in [("download", "split"), ("split", "images"), ("images", "tfrecords"),
                 ("tfrecords", "train@baseline"), ("tfrecords", "train@gan"),
                 ("train@gan", "evaluate"), ("train@baseline", "evaluate")]:
        assert f'"{a}" -> "{b}"' in edges, f"missing edge {a} -> {b} in:\n{edges}"


def test_data_stages_end_with_records_that_decode_to_the_fetched_photos(repo, server, data_stages):
    from chromalab.data.dataset import load_split_arrays, read_dataset_info

    info = read_dataset_info(repo / "data/tfrecords")
    assert info["counts"] == {"train": N_TRAIN, "test": N_TEST, "val": N_VAL}
    manifest = (repo / "data/images/manifest.csv").read_text().splitlines()[1:]
    assert len(manifest) == N_TRAIN + N_TEST + N_VAL
    faulty = set(server.image_faults)
    assert not any(line.split(",")[0] in faulty for line in manifest), "gone/gray photos must be replaced"
    for split in ("train", "test", "val"):
        ids, L, ab = load_split_arrays(repo / "data/tfrecords", split)
        for i, photo_id in enumerate(ids):
            fetched = np.asarray(Image.open(repo / "data/images" / split / f"{photo_id}.jpg").convert("RGB"))
            decoded = lab_norm_to_rgb(L[i], ab[i]) * 255
            # float16 storage of Lab: worst case 1.67/255 over all sRGB colours (test_tfrecords.py).
            assert np.abs(decoded - fetched).max() <= 2.0


def stages_run(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


GAN_CHECKPOINT = Path("models/gan/checkpoint")  # not a DVC output: DVC leaves it in place


@pytest.fixture(scope="module")
def interrupted(repo, data_stages) -> dict:
    """`dvc repro` killed (its whole process group) once train@gan has written its first checkpoint; what the
    checkpoint held then, and the stages that had started."""
    state_file = repo / GAN_CHECKPOINT / "state.json"
    log_path = repo.parent / "interrupted.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env={**_env(repo), "PYTHONUNBUFFERED": "1"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, state = time.monotonic() + 600, {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            if state.get("status") == "running" and state.get("epoch", 0) >= 1:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            stop_process_group(proc)  # SIGTERM, then SIGKILL
    out = log_path.read_text()
    assert state.get("epoch", 0) >= 1, f"no checkpoint before dvc repro ended ({proc.returncode}):\n{out[-3000:]}"
    state = json.loads(state_file.read_text())  # as the kill left it: a later checkpoint may have been written
    with (repo / GAN_CHECKPOINT / state["history"]).open(newline="") as f:
        history = list(csv.DictReader(f))
    return {"state": state, "history": history, "started": stages_run(out), "output": out}


@pytest.fixture(scope="module")
def full_pipeline(repo, interrupted) -> str:
    return run(repo, "dvc", "repro")


def test_an_interrupted_repro_resumes_train_at_gan_from_its_persisted_checkpoint(repo, interrupted, full_pipeline):
    import mlflow

    epochs, done = TINY_PARAMS["gan"]["epochs"], interrupted["state"]["epoch"]
    assert "train@gan" in interrupted["started"] and "evaluate" not in interrupted["started"], interrupted["output"]
    assert 1 <= done < epochs, f"the kill landed after the last epoch: nothing left to resume ({done}/{epochs})"
    # What had finished before the kill is not run again; the killed stage is, and what follows it.
    assert stages_run(full_pipeline) == {"train@gan", "evaluate"} | ({"train@baseline"} - interrupted["started"])
    assert f"resuming gan from its checkpoint at epoch {done}/{epochs}" in full_pipeline

    # The epochs before the kill were not trained again: their rows (and timings) are the killed run's.
    with (repo / "reports/gan/history.csv").open(newline="") as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == list(range(1, epochs + 1))
    assert history[:done] == interrupted["history"][:done]
    # ...and they went on in the same MLflow run, each epoch logged once.
    run_id = interrupted["state"]["mlflow_run_id"]
    assert json.loads((repo / "reports/gan/train_metrics.json").read_text())["mlflow_run_id"] == run_id
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    gan_runs = client.search_runs([client.get_experiment_by_name("chromalab").experiment_id], "tags.model = 'gan'")
    assert [r.info.run_id for r in gan_runs] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, "g_loss")] == list(range(1, epochs + 1))
    # Complete: the model, and a checkpoint folder that says so, with the MD5s of its outputs as dvc.lock records
    # them: so the next forced run starts afresh, and one after a kill before dvc.lock puts them back.
    assert (repo / "models/gan/model.keras").is_file()
    state = json.loads((repo / GAN_CHECKPOINT / "state.json").read_text())
    assert state["status"] == "complete"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    recorded = {out["path"]: out["md5"] for out in lock["stages"]["train@gan"]["outs"]}
    assert state["delivered"] == recorded and len(recorded) == 3


# What MLflow printed in every training stage: its pickled-model warning, its bar over a local file copy.
MLFLOW_NOISE = ("CloudPickle", "Downloading artifacts")


def test_stages_print_their_own_lines_not_tensorflows_or_mlflows_notices(data_stages, interrupted, full_pipeline):
    for out in (data_stages, interrupted["output"], full_pipeline):
        noise = [line for line in out.splitlines() if any(tag in line for tag in TENSORFLOW_NOISE + MLFLOW_NOISE)]
        assert not noise, out[-3000:]
    assert "Epoch 1/" in interrupted["output"] and "evaluate:" in full_pipeline  # ...while their own progress shows
    # Each epoch's line under Keras' own says where the run stands (tests/test_progress.py: its projection).
    assert re.search(r"train@baseline: epoch 1/\d+, \S+ elapsed, ~\S+ left", interrupted["output"])
    assert re.search(r"train@gan: epoch \d+/\d+, \S+ elapsed, ~\S+ left", full_pipeline)


def _drawn_points(chart: dict) -> list[tuple[str, str]]:
    """(column, epoch) of each value a `dvc plots show` chart draws: several y columns are DVC's "field" rows,
    one is the chart's y encoding."""
    rows = chart["data"]["values"]
    if "field" in rows[0]:
        return sorted({(row["field"], row["epoch"]) for row in rows if row["dvc_inferred_y_value"] != ""})
    column = chart["layer"][0]["encoding"]["y"]["field"]
    return sorted((column, row["epoch"]) for row in rows if row[column] != "")


def test_training_and_evaluation_outputs(repo, full_pipeline):
    import keras
    from chromalab.data.dataset import load_split_arrays

    for model in ("baseline", "gan"):
        assert (repo / f"models/{model}/model.keras").is_file()
        history = (repo / f"reports/{model}/history.csv").read_text().splitlines()
        assert len(history) == 1 + TINY_PARAMS[model]["epochs"]
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert set(metrics) == {"gray_floor", "baseline", "gan"}
    assert metrics["gray_floor"]["colourfulness"] == 0.0
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    assert "reports/evaluate/metrics.json" in json.dumps(shown)
    assert "reports/evaluate/paired.json" in json.dumps(shown) and "delta_e00_gap" in json.dumps(shown)
    # `dvc plots show`: the training losses, each a curve with a value every epoch (a blank would be drawn as 0)
    plots = json.loads(run(repo, "dvc", "plots", "show", "--json"))["data"]
    drawn = {name: _drawn_points(plot[0]["content"]) for name, plot in plots.items()}
    epochs = {model: [str(e) for e in range(1, TINY_PARAMS[model]["epochs"] + 1)] for model in ("baseline", "gan")}
    assert drawn == {"GAN losses": sorted((f, e) for f in ("g_l1", "g_gan", "d_loss") for e in epochs["gan"]),
                     "baseline loss (1 - SSIM)": sorted(("loss", e) for e in epochs["baseline"])}

    # The pictures show the trained models' colours: every panel is the picture it must be.
    n_sheet = TINY_PARAMS["evaluate"]["n_sheet"]
    _, L, ab = load_split_arrays(repo / "data/tfrecords", "test")
    L, ab = L[:n_sheet].astype(np.float64), ab[:n_sheet].astype(np.float64)
    predicted = {}
    for model in ("baseline", "gan"):
        saved = keras.saving.load_model(repo / f"models/{model}/model.keras", compile=False)
        predicted[model] = np.asarray(saved.predict(L.astype(np.float32), verbose=0), dtype=np.float64)
    reports = repo / "reports/evaluate"
    assert_comparison_sheet(reports / "comparison.png", L, ab, predicted, ("gray input", "baseline", "gan", "truth"))
    assert_charts_draw(reports, {"gray_floor": "#999999", "baseline": "#4c72b0", "gan": "#dd8452"})
    worst = panels(read_rgb(reports / "worst.png"))  # test_evaluate.py checks what each panel shows
    assert [len(row) for row in worst] == [6] * min(N_TEST, 6)


def test_mlflow_holds_one_run_per_model_in_the_repo_store(repo, full_pipeline):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chromalab").experiment_id])
    by_model = {r.data.tags["model"]: r for r in runs}
    assert set(by_model) == {"baseline", "gan"} and len(runs) == 2
    gan = by_model["gan"]
    assert gan.data.params["gan.epochs"] == str(TINY_PARAMS["gan"]["epochs"])
    assert gan.data.params["base.image_size"] == "32"
    assert "test_delta_e00" in gan.data.metrics  # evaluate logged into the model's own run
    # the data it trained on, as DVC pinned it: the records' hash in dvc.lock, written before training started
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["tfrecords"]["outs"]
    (source,) = {dataset_input.dataset.source for dataset_input in gan.inputs.dataset_inputs}
    assert json.loads(source)["md5"] == next(out["md5"] for out in lock if out["path"] == "data/tfrecords")


@pytest.mark.parametrize(("model", "param", "value"), [("gan", "epochs", 3), ("baseline", "learning_rate", 0.002)])
def test_dvc_plans_to_rerun_only_what_a_model_param_touches(repo, full_pipeline, model, param, value):
    """DVC's own plan (`dvc repro --dry`) for each model's param: seconds, where a real experiment trains a
    model; the experiment below runs one of them for real."""
    path = repo / "params.yaml"
    before = path.read_text()
    params = yaml.safe_load(before)
    assert params[model][param] != value, f"params.yaml already holds {model}.{param}={value}: nothing to plan"
    params[model][param] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        # A dry run changes no output, so without --force-downstream DVC could not know that evaluate's
        # input (the retrained model) changes; with it, DVC plans what `dvc exp run` then does.
        out = run(repo, "dvc", "repro", "--dry", "--force-downstream")
    finally:
        path.write_text(before)
    assert stages_run(out) == {f"train@{model}", "evaluate"}, out


def test_exp_run_reruns_only_what_the_param_touches(repo, full_pipeline):
    model, param, value = "gan", "epochs", 3  # the README's example: `dvc exp run -S gan.epochs=1500`
    name = f"{model}-{param}"
    out = run(repo, "dvc", "exp", "run", "-S", f"{model}.{param}={value}", "-n", name)
    assert stages_run(out) == {f"train@{model}", "evaluate"}, out
    experiment = _find_experiment(json.loads(run(repo, "dvc", "exp", "show", "--json")), name)
    assert experiment["params"]["params.yaml"]["data"][model][param] == value
    scores = experiment["metrics"]["reports/evaluate/metrics.json"]["data"]
    assert {"gray_floor", "baseline", "gan"} <= set(scores) and "delta_e00" in scores[model]

    # Back at the params of an earlier run, DVC's run cache restores that run's model and scores: nothing trains.
    out = run(repo, "dvc", "exp", "run", "-S", f"{model}.{param}={TINY_PARAMS[model][param]}", "-n", f"{name}-back")
    assert stages_run(out) == set() and f"Stage 'train@{model}' is cached" in out, out


def _find_experiment(node, name: str) -> dict:
    """The `data` of the experiment called `name`, wherever `dvc exp show --json` nests it."""
    if isinstance(node, dict):
        if node.get("name") == name and isinstance(node.get("data"), dict):
            return node["data"]
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            if isinstance(child, (dict, list)) and (found := _find_experiment(child, name)):
                return found
    return {}
