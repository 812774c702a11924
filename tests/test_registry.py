"""MLflow all the way: dataset inputs, the experiment's kind, the model registry and its aliases.

One tiny project (8 train / 4 test real photo crops at 32 px, width ×0.125) is trained and evaluated once for
the module; every check reads back through MlflowClient, from the default SQLite store and a real server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from chromalab.serve import pyfunc
from chromalab.track import registry
from chromalab.track import runs
from chromalab.cli import main
from chromalab.colorize import colorize_paths
from chromalab.config import parse_params
from chromalab.evaluate.stage import run_evaluate
from chromalab.train.models import build_baseline
from chromalab.bench.samples import real_crops, write_images_stage
from chromalab.data.dataset import read_dataset_info
from chromalab.data.tfrecords import run_tfrecords
from chromalab.train.stage import run_train

TINY = {
    "base": {"image_size": 32},
    "train": {"val_every": 1, "checkpoint_every": 1, "sample_every": 1, "n_samples": 2},
    "baseline": {"epochs": 1, "batch_size": 4, "width": 0.125},
    "gan": {"epochs": 1, "batch_size": 4, "width": 0.125},
    "evaluate": {"n_sheet": 2},
}
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


@pytest.fixture(scope="module", autouse=True)
def _start_server_early(mlflow_server_process):
    """Launch the shared MLflow server first, so its start overlaps the training below."""


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_db_template):
    """A git repo with data/tfrecords, the GAN trained (so registered) and evaluated, as the cwd.

    The baseline is saved untrained, as if trained before the registry existed (no run, no version): it
    costs no training time here and shows that evaluate passes over such a model.
    """
    root = tmp_path_factory.mktemp("project")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-q", "--allow-empty", "-m", "start"], cwd=root, check=True)
    shutil.copy(mlflow_db_template, root / "mlflow.db")  # the default store, its tables made already
    params = parse_params(TINY)
    write_images_stage(root / "images", n_train=8, n_test=4, size=32)
    run_tfrecords(params, images_dir=root / "images", out_dir=root / "data/tfrecords", workers=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
            patch.delenv(name, raising=False)
        trained = {"gan": run_train(params, "gan")}
        (root / "models/baseline").mkdir(parents=True)
        build_baseline(32, width=0.125).save(root / "models/baseline/model.keras")
        summary = run_evaluate(params)
        yield {"root": root, "trained": trained, "summary": summary,
               "info": read_dataset_info(root / "data/tfrecords"),
               "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                        text=True, check=True).stdout.strip(),
               "client": mlflow.MlflowClient(runs.tracking_uri())}


def test_training_runs_log_their_train_val_and_test_data_as_mlflow_datasets(project):
    client, info = project["client"], project["info"]
    for name, metrics in project["trained"].items():
        inputs = client.get_run(metrics["mlflow_run_id"]).inputs.dataset_inputs
        by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
        assert sorted(by_context) == ["testing", "training", "validation"], name
        for context, split in (("training", "train"), ("validation", "val"), ("testing", "test")):
            dataset = by_context[context]
            assert dataset.name == f"chromalab-{split}"
            assert dataset.digest == info["content_hash"][:16]  # same data → same digest: runs group together
            assert dataset.source_type == "dvc"
            assert json.loads(dataset.source) == {"path": "data/tfrecords", "md5": ""}
            profile = json.loads(dataset.profile)
            assert profile["photos"] == info["counts"][split] == {"train": 8, "val": 2, "test": 4}[split]
            assert profile["image_size"] == 32 and profile["content_hash"] == info["content_hash"]
            tensors = {spec["name"]: spec for spec in json.loads(dataset.schema)["mlflow_colspec"]}
            assert tensors["lab"]["tensor-spec"]["shape"] == [-1, 32, 32, 3]
            assert tensors["lab"]["tensor-spec"]["dtype"] == "float16"


def test_the_experiment_says_it_holds_model_training_runs(project):
    experiment = project["client"].get_experiment_by_name(runs.EXPERIMENT)
    # MLflow 3's record of an experiment's kind (model training, not GenAI); see the README for the UI.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_registers_a_version_tagged_with_its_origin_and_evaluate_crowns_it(project):
    client, summary = project["client"], project["summary"]
    for name, metrics in project["trained"].items():
        (version,) = client.search_model_versions(f"name = 'chromalab-{name}'")
        assert version.run_id == metrics["mlflow_run_id"]
        tags = version.tags
        assert tags["dvc_experiment"] == "workspace" and tags["git_commit"] == project["commit"]
        assert tags["dataset_digest"] == project["info"]["content_hash"]
        assert float(tags["test_delta_e00"]) == pytest.approx(summary[name]["delta_e00"])
        assert float(tags["test_ab_ssim"]) == pytest.approx(summary[name]["ab_ssim"])
        assert len(tags["test_set_digest"]) == 64
        model = client.get_registered_model(f"chromalab-{name}")
        assert model.aliases == {"champion": version.version, "challenger": version.version}
        flavour = mlflow.models.get_model_info(version.source).flavors["python_function"]
        assert "python_model" not in flavour and flavour["model_code_path"].endswith("colorizer_model.py")  # no pickle
    assert client.search_registered_models("name = 'chromalab-baseline'") == []  # evaluated, never registered


def test_a_run_that_finishes_again_after_a_kill_keeps_its_one_version(project):
    """Killed after registering but before DVC recorded the stage, training resumes its run and registers again:
    it gets the run's own version back, not a second one."""
    client, run_id = project["client"], project["trained"]["gan"]["mlflow_run_id"]
    before = client.search_model_versions("name = 'chromalab-gan'")
    (own,) = [v for v in before if v.run_id == run_id]
    runs.use_store()
    with mlflow.start_run(run_id=run_id):
        again = registry.register_trained_model("gan", mlflow.models.get_model_info(own.source), "digest")
    assert again.version == own.version
    assert len(client.search_model_versions("name = 'chromalab-gan'")) == len(before)


def test_champion_is_the_lowest_delta_e00_on_the_same_test_set_and_challenger_the_newest(project, tmp_path):
    """New versions arrive with chosen scores; a version scored on another test set can't win."""
    client = project["client"]
    first = client.get_model_version("chromalab-gan", "1")
    digest = first.tags["test_set_digest"]
    best = float(first.tags["test_delta_e00"])

    def new_version(delta_e00: float, test_digest: str) -> str:
        with mlflow.start_run(experiment_id=client.get_experiment_by_name(runs.EXPERIMENT).experiment_id) as run:
            pass
        version = client.create_model_version("chromalab-gan", first.source, run_id=run.info.run_id)
        (tmp_path / "gan").mkdir(exist_ok=True)
        (tmp_path / "gan/train_metrics.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id}))
        aliases = registry.record_evaluation(tmp_path, {"gan": {"delta_e00": delta_e00, "count": 4}}, test_digest)
        return version.version, aliases["gan"]

    worse, aliases = new_version(best + 1.0, digest)
    assert aliases == {"champion": first.version, "challenger": worse}
    better, aliases = new_version(best - 1.0, digest)
    assert aliases == {"champion": better, "challenger": better}
    elsewhere, aliases = new_version(best + 5.0, "another test set")
    assert aliases == {"champion": elsewhere, "challenger": elsewhere}  # the only one scored on that set
    assert client.get_model_version("chromalab-gan", elsewhere).tags["test_set_digest"] == "another test set"
    # ...and it does not dethrone `better` for comparisons on the original test set:
    _, aliases = new_version(best + 2.0, digest)
    assert aliases["champion"] == better
    tied, aliases = new_version(best - 1.0, digest)  # as good as the champion, not better: the elder stays
    assert aliases == {"champion": better, "challenger": tied}
    client.set_registered_model_alias("chromalab-gan", "champion", first.version)  # leave the module's state


def _photo(path: Path) -> Path:
    Image.fromarray(real_crops(1, 80, seed=3)[0]).resize((96, 64)).save(path, quality=95)
    return path


def test_colorize_with_the_champion_alias_equals_the_trained_model_file(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project["root"])
    photo = _photo(tmp_path / "p.jpg")
    # the real CLI, as a user runs it (it exits only on failure)
    main(["colorize", str(photo), "-o", str(tmp_path / "alias"), "--model", "models:/chromalab-gan@champion"])
    colorize_paths([photo], out_dir=tmp_path / "file", model=str(project["root"] / "models/gan/model.keras"))
    from_alias = np.asarray(Image.open(tmp_path / "alias/p_color.jpg"))
    assert from_alias.shape == (64, 96, 3)
    np.testing.assert_array_equal(from_alias, np.asarray(Image.open(tmp_path / "file/p_color.jpg")))


def test_the_registry_works_on_a_remote_tracking_server(project, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(project["root"])
    keras_file = project["root"] / "models/gan/model.keras"
    params = parse_params(TINY)
    with runs.model_run("gan", params, dataset_hash="h", stage="train@gan") as run:
        version = registry.register_trained_model("gan", pyfunc.log_colorizer(keras_file), "h")
    (tmp_path / "gan").mkdir()
    (tmp_path / "gan/train_metrics.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id}))
    aliases = registry.record_evaluation(tmp_path, {"gan": {"delta_e00": 9.5}}, "remote test set")
    assert aliases["gan"]["champion"] == version.version
    remote = mlflow.MlflowClient(mlflow_server)
    assert remote.get_model_version_by_alias("chromalab-gan", "champion").run_id == run.info.run_id

    photo = _photo(tmp_path / "p.jpg")
    colorize_paths([photo], out_dir=tmp_path / "remote", model="models:/chromalab-gan@champion")
    colorize_paths([photo], out_dir=tmp_path / "file", model=str(keras_file))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "remote/p_color.jpg")),
                                  np.asarray(Image.open(tmp_path / "file/p_color.jpg")))
