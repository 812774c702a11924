"""Training on real photo crops (8 train / 4 test / 2 val at 32 px) with tiny models, checked as a user would:
falling losses, what MLflow holds, a killed run that resumes, validation on val and the best epoch's export."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from chromalab.code import code_hash
from chromalab.config import parse_params
from chromalab.data.dataset import read_dataset_info
from chromalab.data.tfrecords import run_tfrecords
from chromalab.errors import ChromalabError
from chromalab.train.checkpoint import params_fingerprint, read_history
from chromalab.train.stage import run_train
from chromalab.bench.samples import write_images_stage
from repo import git_ignored

BIN = Path(sys.executable).parent
TINY = {
    "base": {"image_size": 32},
    "train": {"val_every": 10, "checkpoint_every": 10, "sample_every": 10, "n_samples": 2},
    "baseline": {"epochs": 30, "batch_size": 4, "width": 0.25},
    "gan": {"epochs": 30, "batch_size": 4, "width": 0.125},
}


def tiny_params(**overrides: dict):
    raw = {group: dict(values) for group, values in TINY.items()}
    for group, values in overrides.items():
        raw.setdefault(group, {}).update(values)
    return parse_params(raw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    write_images_stage(root / "images", n_train=8, n_test=4, size=32, n_val=2)
    run_tfrecords(tiny_params(), images_dir=root / "images", out_dir=root / "tfrecords", workers=1)
    return root / "tfrecords"


@pytest.fixture(scope="module", autouse=True)
def _tracking_server_boots_early(mlflow_server_process):
    """`mlflow server` takes 12-17 s to start: let it start while the first tests train."""


@pytest.fixture
def workdir(tmp_path, monkeypatch, dataset, mlflow_db_template) -> Path:
    """A git repo with data/tfrecords in place: the MLflow store lands here (its real root)."""
    _git_repo(tmp_path, dataset, mlflow_db_template)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _git_repo(path: Path, dataset: Path, mlflow_db: Path | None) -> Path:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], cwd=path, check=True)
    (path / "data").mkdir()
    (path / "data/tfrecords").symlink_to(dataset)
    if mlflow_db is not None:
        shutil.copy(mlflow_db, path / "mlflow.db")
    return path


def _client(workdir: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


@contextlib.contextmanager
def _fluent_store(uri: str):
    """MLflow's fluent API (runs:/ URIs) on `uri`, whichever store the last run_train in this process chose."""
    from chromalab.track.runs import store_override

    before = mlflow.get_tracking_uri()
    with store_override():  # set_tracking_uri exports MLFLOW_TRACKING_URI: put it back after
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)


def recording_make_dataset(real_make_dataset):
    """chromalab.train.input.make_dataset that also records what training is fed: epoch by epoch, a fingerprint of
    every (L, ab) sample of each training dataset it builds (the same deterministic pipeline, iterated once
    more here), one line per dataset in fed.jsonl in the cwd."""
    import hashlib

    from chromalab.train.epochs import steps_per_epoch

    def recording(data_dir, split, batch_size, **options):
        if options.get("training"):
            first, steps = options["initial_epoch"], steps_per_epoch(8, batch_size)
            fed = {}
            for i, (L, ab) in enumerate(real_make_dataset(data_dir, split, batch_size, **options)):
                for l_img, ab_img in zip(L.numpy(), ab.numpy()):
                    digest = hashlib.sha256(l_img.tobytes() + ab_img.tobytes()).hexdigest()[:12]
                    fed.setdefault(first + i // steps, []).append(digest)
            with open("fed.jsonl", "a") as f:  # one line per dataset: the GAN's phases build one each
                f.write(json.dumps({"pid": os.getpid(), "fed": fed}) + "\n")
        return real_make_dataset(data_dir, split, batch_size, **options)

    return recording


# Runs `chromalab train gan` in a process of its own (one that can be SIGKILLed) with TensorFlow's deterministic
# ops, recording what training is fed. It ends as `chromalab` does, without the interpreter's teardown (seconds,
# after TensorFlow).
RECORDING_TRAIN = textwrap.dedent(f"""
    import sys
    from chromalab.entry import skip_unused_extras; skip_unused_extras()  # first: TensorFlow then skips its unused imports
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from chromalab.entry import exit_without_teardown
    from chromalab.config import load_params
    from chromalab.train import input as training_input
    from chromalab.train.stage import run_train
    from test_training import recording_make_dataset

    training_input.make_dataset = recording_make_dataset(training_input.make_dataset)
    if len(sys.argv) > 1:  # SIGKILL this process once epoch N's weights are written, before the state naming them
        import json, os, signal
        from chromalab.train import checkpoint

        write, kill_epoch = checkpoint.write_text_atomic, int(sys.argv[1])

        def killed_before_the_state(path, text):
            if path.name == checkpoint.STATE_FILE and json.loads(text)["epoch"] == kill_epoch:
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, text)

        checkpoint.write_text_atomic = killed_before_the_state
    run_train(load_params(), "gan")
    exit_without_teardown()
""")


def _train_recorded(repo: Path, tracking_uri: str | None = None) -> tuple[dict, str]:
    """`chromalab train gan` in `repo`, in this process, as RECORDING_TRAIN runs it: TensorFlow's deterministic
    ops, what training is fed recorded. Returns its metrics and stderr."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    from chromalab.config import load_params
    from chromalab.train import input as training_input

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.chdir(repo)
        if tracking_uri is not None:
            patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        patch.setattr(training_input, "make_dataset", recording_make_dataset(training_input.make_dataset))
        tf.config.experimental.enable_op_determinism()
        try:
            metrics = run_train(load_params(), "gan")
        finally:
            tf_config.disable_op_determinism()  # the tests after this one run as they would alone
    return metrics, stderr.getvalue()


def _repo(path: Path, dataset: Path, params: dict, mlflow_db: Path | None) -> Path:
    _git_repo(path, dataset, mlflow_db)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return path


def _fed_epochs(repo: Path) -> list[dict[int, list[str]]]:
    """Per process, in order, the samples its training datasets feed, by epoch (0-based)."""
    by_process: dict[int, dict[int, list[str]]] = {}
    for line in (repo / "fed.jsonl").read_text().splitlines():
        record = json.loads(line)
        epochs = by_process.setdefault(record["pid"], {})
        for epoch, samples in record["fed"].items():
            assert int(epoch) not in epochs, f"epoch {epoch} fed twice by one process"
            epochs[int(epoch)] = samples
    return list(by_process.values())


def _mlflow_steps(client: mlflow.MlflowClient, run_id: str) -> dict[str, list[int]]:
    """Per metric of the run, the steps logged, with repeats (not a set)."""
    metrics = client.get_run(run_id).data.metrics
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in metrics}


def _final_weights(repo: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(repo / "models/gan/model.keras", compile=False).weights]


# The GAN's run: its checkpoints, validation and sample sheets often enough that a kill mid-run loses epochs
# and the resumed run must log some of each again; decay_epochs: half, so the schedule resumes too.
GAN_RUN = {**TINY, "train": {**TINY["train"], "checkpoint_every": 2, "val_every": 3, "sample_every": 4},
           # NoGAN's phases: epochs 1-4 pretrain G, 5-7 warm D up, 8-20 adversarial. The kill below lands in
           # the adversarial phase and the resume in the warm-up, so the resumed run crosses a phase boundary.
           "gan": {**TINY["gan"], "epochs": 20, "pretrain_epochs": 4, "warmup_epochs": 3, "norm": "group",
                   "recon_loss": "ssim_l1", "diffaug": True, "spectral_norm": True, "ema": 0.99,
                   "chroma_expand": 0.5, "chroma_pivot": 10.0}}


@pytest.fixture(scope="module")
def gan_run_on_server(tmp_path_factory, dataset, mlflow_server) -> tuple[Path, dict, str]:
    """The GAN's one in-process run serves four tests: it is the uninterrupted run a killed one must match
    (TensorFlow's deterministic ops, what it is fed recorded in fed.jsonl), it logs to the tracking server
    (MLFLOW_TRACKING_URI), and it finds the checkpoint of a run whose GAN params differ. Returns its repo,
    metrics and stderr."""
    repo = _repo(tmp_path_factory.mktemp("gan-on-server"), dataset, GAN_RUN, None)
    # The checkpoint of a run with one GAN param different, fingerprinted as run_train does it: if the
    # fingerprint ignored params, this run would try to resume from it (and fail on the weights).
    dataset_hash = str(read_dataset_info(dataset).get("content_hash", ""))
    params = parse_params(GAN_RUN)
    other = params_fingerprint(parse_params({**GAN_RUN, "gan": {**GAN_RUN["gan"], "l1_lambda": 50.0}}), "gan",
                               dataset_hash, training_code())
    assert other != params_fingerprint(params, "gan", dataset_hash, training_code())
    checkpoint = repo / "models/gan/checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "epoch-00001.weights.h5").write_bytes(b"not weights from these params")
    (checkpoint / "epoch-00001.history.csv").write_text("epoch\n1\n")
    (checkpoint / "state.json").write_text(json.dumps(
        {"status": "running", "epoch": 1, "fingerprint": other, "mlflow_run_id": "gone",
         "weights": "epoch-00001.weights.h5", "history": "epoch-00001.history.csv"}))
    metrics, stderr = _train_recorded(repo, mlflow_server)
    return repo, metrics, stderr


def test_a_killed_run_resumes_exactly_where_it_stopped(request, tmp_path, dataset, mlflow_db_template):
    """The GAN's uninterrupted run (gan_run_on_server) against the same run SIGKILLed at the most awkward moment
    of a checkpoint, epoch 8's weights written but not yet the state.json naming them, and started again: it
    resumes from epoch 6's checkpoint, which the kill left whole, and feeds the same photos in the same order
    each epoch, logs the same MLflow steps (each once) and ends with the same final weights."""
    epochs, kill_epoch = GAN_RUN["gan"]["epochs"], 8
    killed = _repo(tmp_path / "killed", dataset, GAN_RUN, mlflow_db_template)
    # The run to be killed trains in a process of its own (stderr to a file: a full pipe nobody reads would
    # stall it) while the uninterrupted run trains here, in this process (sparing a TensorFlow start-up), with
    # the same deterministic ops.
    proc = subprocess.Popen([sys.executable, "-c", RECORDING_TRAIN, str(kill_epoch)], cwd=killed,
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "killed.err").open("w"))
    try:
        straight, straight_metrics, _ = request.getfixturevalue("gan_run_on_server")
        proc.wait(timeout=600)
    finally:  # never leave the killed run behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run:\n{(tmp_path / 'killed.err').read_text()[-2000:]}"
    folder = killed / "models/gan/checkpoint"
    state = json.loads((folder / "state.json").read_text())
    assert state["epoch"] == kill_epoch - GAN_RUN["train"]["checkpoint_every"]
    assert (folder / f"epoch-{kill_epoch:05d}.weights.h5").is_file()  # written, but nothing names it
    # What a kill leaves stays out of a `git add -A` (weights, sample sheets of photos)
    assert [p.name for p in folder.iterdir() if not git_ignored(f"models/gan/checkpoint/{p.name}")] == []
    run_id = state["mlflow_run_id"]
    # Started again here, in this process (sparing a third TensorFlow start-up): all it can resume from is
    # what the killed process left on disk and in its MLflow store.
    _, stderr = _train_recorded(killed)
    resumed_at = int(stderr.split("resuming gan from its checkpoint at epoch ")[1].split("/")[0])
    assert resumed_at == state["epoch"]
    assert "train@gan: epochs 7-7: warmup" in stderr and "train@gan: epochs 8-20: adversarial" in stderr
    # complete: no checkpoint weights left behind, only copies of the outputs until DVC has recorded them
    assert sorted(p.name for p in folder.iterdir()) == ["delivered", "state.json"]
    assert sorted(p.name for p in (folder / "delivered").iterdir()) == ["history.csv", "model.keras",
                                                                        "train_metrics.json"]

    # The same samples (photo, flip, contrast variant) in the same order, epoch by epoch.
    (fed_straight,), (fed_first, fed_resumed) = _fed_epochs(straight), _fed_epochs(killed)
    assert sorted(fed_straight) == list(range(epochs)) and sorted(fed_resumed) == list(range(resumed_at, epochs))
    fed_killed = {e: fed_first[e] if e < resumed_at else fed_resumed[e] for e in range(epochs)}
    assert fed_killed == fed_straight
    assert fed_straight[0] != fed_straight[1]  # a new order each epoch, so the check above can fail

    # MLflow: one run, every per-epoch metric at steps 1..20 exactly once, as in the uninterrupted run.
    killed_client = _client(killed)
    runs = killed_client.search_runs([killed_client.get_experiment_by_name("chromalab").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    killed_steps = _mlflow_steps(killed_client, run_id)
    assert killed_steps == _mlflow_steps(mlflow.MlflowClient(request.getfixturevalue("mlflow_server")),
                                         straight_metrics["mlflow_run_id"])
    assert killed_steps["g_l1"] == killed_steps["epoch_seconds"] == list(range(1, epochs + 1))
    assert killed_steps["val_ssim"] == [3, 6, 9, 12, 15, 18]
    assert killed_steps["val_delta_e00"] == [3, 6, 9, 12, 15, 18, 20]  # ΔE00 also at the last epoch
    # The best validation survived the kill: both runs name the same epoch and score, and export it.
    killed_metrics = json.loads((killed / "reports/gan/train_metrics.json").read_text())
    for key in ("best_epoch", "best_val_delta_e00", "exported", "val_delta_e00"):
        assert killed_metrics[key] == straight_metrics[key], key
    history = read_history(killed / "reports/gan/history.csv")
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))

    # Weights, optimizer state (Adam's moments and step count, which the decaying rate follows) and dropout
    # RNG state were restored: with deterministic ops the resumed run ends with the uninterrupted run's weights.
    for a, b in zip(_final_weights(straight), _final_weights(killed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("model_name, loss_key", [("baseline", "loss"), ("gan", "g_l1")])
def test_tiny_model_overfits_with_finite_falling_loss_and_mlflow_holds_the_run(request, dataset, model_name,
                                                                              loss_key):
    if model_name == "gan":  # the run on the tracking server, read back from there
        workdir, metrics, _ = request.getfixturevalue("gan_run_on_server")
        p = parse_params(GAN_RUN)
        client = mlflow.MlflowClient(request.getfixturevalue("mlflow_server"))
    else:  # the default store: mlflow.db at the repo root
        workdir = request.getfixturevalue("workdir")
        # Without the seed's dropout: at width 0.25 it halves a few channels, and whether 30 epochs then move
        # the SSIM loss by 0.005 hung on the CPU's float order (it failed on one machine, passed on another).
        p = tiny_params(baseline={"dropout": 0.0})
        started = _a_start_killed_before_its_first_checkpoint(workdir, p, dataset)
        metrics = run_train(p, model_name)
        client = _client(workdir)
        # the start's own run goes on, rather than a second run beside one left RUNNING forever
        assert metrics["mlflow_run_id"] == started
        assert len(client.search_runs([client.get_experiment_by_name("chromalab").experiment_id])) == 1
    epochs, val_every, sample_every = p.model(model_name).epochs, p.train.val_every, p.train.sample_every

    history = read_history(workdir / f"reports/{model_name}/history.csv")
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    losses = np.array([row[loss_key] for row in history])
    assert np.isfinite(losses).all()
    # Means of five epochs, so one noisy epoch can't decide it (the baseline's dropout makes it noisy).
    assert losses[-5:].mean() < losses[:5].mean() - 0.005, losses
    assert (workdir / f"models/{model_name}/model.keras").is_file()
    assert json.loads((workdir / f"reports/{model_name}/train_metrics.json").read_text()) == metrics

    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params[f"{model_name}.epochs"] == str(epochs) and params["base.image_size"] == "32"
    assert "data.url" in params and "train.flip_lr" in params  # data params too, flattened
    other = "baseline" if model_name == "gan" else "gan"
    assert not any(key.startswith(f"{other}.") for key in params)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, loss_key)]
    assert steps == list(range(1, epochs + 1))
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_ssim")]
    assert val_steps == list(range(val_every, epochs + 1, val_every))
    tags = run.data.tags
    assert tags["model"] == model_name and tags["stage"] == f"train@{model_name}"
    assert tags["dataset_hash"] == read_dataset_info(dataset)["content_hash"]
    assert tags["device"] == "CPU" and "keras.version" in tags and "mlflow.source.git.dirty" in tags
    image_files = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    # A sample sheet every sample_every epochs and at the last, each once (images/samples+step+<epoch>+….png).
    sheet_steps = sorted(int(path.split("+step+")[1].split("+")[0]) for path in image_files if path.endswith(".png"))
    assert sheet_steps == sorted({*range(sample_every, epochs + 1, sample_every), epochs}), image_files
    with _fluent_store(client.tracking_uri):
        logged = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model",
                                         dst_path=str(request.getfixturevalue("tmp_path")))  # not MLflow's temp
    L = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    assert logged.predict(L, verbose=0).shape == (2, 32, 32, 2)


def _a_start_killed_before_its_first_checkpoint(repo: Path, params, dataset: Path) -> str:
    """What `train baseline` killed before its first checkpoint leaves: its MLflow run, and the state.json
    naming it. Returns the run's id."""
    from chromalab.track import runs
    from chromalab.train.checkpoint import Checkpoint

    dataset_hash = str(read_dataset_info(dataset).get("content_hash", ""))
    with runs.model_run("baseline", params, dataset_hash=dataset_hash, stage="train@baseline") as run:
        pass
    Checkpoint(repo / "models/baseline/checkpoint").write_state(
        {"fingerprint": params_fingerprint(params, "baseline", dataset_hash, training_code()), "status": "running",
         "epoch": 0, "mlflow_run_id": run.info.run_id})
    return run.info.run_id


def _killed_at_then_rerun(monkeypatch, module, function: str, params) -> dict:
    """`train baseline` stopped (Ctrl-C) at its first call of `module.function`, then run again in full;
    returns the second run's metrics."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(module, function, killed)
        with pytest.raises(KeyboardInterrupt):
            run_train(params, "baseline")
    return run_train(params, "baseline")


def test_a_run_killed_while_finishing_logs_and_registers_its_model_once(workdir, monkeypatch):
    """Killed after the final metrics and the model went to MLflow, before the registry: the rerun resumes
    the trained run and does only what is left, so nothing shows twice in the MLflow UI."""
    from chromalab.track import registry

    metrics = _killed_at_then_rerun(monkeypatch, registry, "register_trained_model", tiny_params(baseline={"epochs": 2}))

    client, run_id = _client(workdir), metrics["mlflow_run_id"]
    _assert_finished_once(client, run_id)
    assert [v.run_id for v in client.search_model_versions("name = 'chromalab-baseline'")] == [run_id]


def test_a_kill_just_after_an_mlflow_call_returns_logs_nothing_twice(workdir, monkeypatch):
    """Killed after MLflow took the model and the exported checkpoint's metrics, before state.json recorded
    either: the re-run finds them in the run instead of logging them again."""
    from chromalab.track import runs

    def then_killed(real):
        def call(*args, **kwargs):
            real(*args, **kwargs)
            raise KeyboardInterrupt
        return call

    params = tiny_params(baseline={"epochs": 2})
    for function in ("log_exported_checkpoint", "log_keras_model"):
        with monkeypatch.context() as patch:
            patch.setattr(runs, function, then_killed(getattr(runs, function)))
            with pytest.raises(KeyboardInterrupt):
                run_train(params, "baseline")
    metrics = run_train(params, "baseline")
    _assert_finished_once(_client(workdir), metrics["mlflow_run_id"])


def test_a_kill_just_after_the_mlflow_run_is_made_leaves_no_orphan_run(workdir, monkeypatch):
    """Killed after MLflow made the run, before its tags and params (and before state.json named it, as it
    did then): the re-run made a second run, and the first stayed RUNNING or FAILED, empty, for good."""
    import mlflow

    params = tiny_params(baseline={"epochs": 1})
    metrics = _killed_at_then_rerun(monkeypatch, mlflow, "set_tags", params)
    client = _client(workdir)
    (run,) = client.search_runs([client.get_experiment_by_name("chromalab").experiment_id])
    assert run.info.run_id == metrics["mlflow_run_id"] and run.info.status == "FINISHED"


def _assert_finished_once(client, run_id: str) -> None:
    """The 2-epoch run's final and exported-checkpoint metrics, one point each, and each model logged once."""
    assert [m.step for m in client.get_metric_history(run_id, "final_loss")] == [2]
    assert [m.step for m in client.get_metric_history(run_id, "best_epoch")] == [0]
    experiment = client.get_experiment_by_name("chromalab").experiment_id
    logged = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    assert sorted(m.name for m in logged) == ["colorizer", "model"]


def test_a_model_upload_cut_off_by_a_kill_leaves_no_unfinished_model_in_the_run(workdir, monkeypatch):
    """Killed while MLflow was storing the Keras model (its logged model created, its files not all there):
    the rerun logs it whole, and the run lists that one model, not a PENDING or FAILED one beside it."""
    import mlflow.keras
    from mlflow.entities import LoggedModelStatus

    metrics = _killed_at_then_rerun(monkeypatch, mlflow.keras, "save_model", tiny_params(baseline={"epochs": 2}))

    client, run_id = _client(workdir), metrics["mlflow_run_id"]
    experiment = client.get_experiment_by_name("chromalab").experiment_id
    logged = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    assert sorted((m.name, m.status) for m in logged) == [("colorizer", LoggedModelStatus.READY),
                                                         ("model", LoggedModelStatus.READY)]


def test_a_sample_sheet_cut_off_by_a_kill_reaches_mlflow_when_the_run_resumes(workdir, monkeypatch):
    """Killed after a checkpoint and its rows went to MLflow, before its sample sheet did: the checkpoint kept
    the sheet, and the resumed run logs it, once."""
    from chromalab.track import runs

    params = tiny_params(train={"val_every": 2, "checkpoint_every": 2, "sample_every": 2}, baseline={"epochs": 4})
    metrics = _killed_at_then_rerun(monkeypatch, runs, "log_sample_sheet", params)

    client = _client(workdir)
    paths = [a.path for a in client.list_artifacts(metrics["mlflow_run_id"], "images") if a.path.endswith(".png")]
    assert sorted(int(path.split("+step+")[1].split("+")[0]) for path in paths) == [2, 4], paths


def test_a_finished_run_dvc_never_recorded_is_put_back_and_one_it_recorded_is_trained_anew(workdir, capsys,
                                                                                             monkeypatch):
    """A kill after training, before DVC wrote dvc.lock: DVC deletes the outputs and runs the stage again, which
    must not cost the training. Once dvc.lock records the run, DVC runs the stage again only when forced."""
    params = tiny_params(baseline={"epochs": 2})
    monkeypatch.setenv("DVC_ROOT", str(workdir))  # as DVC runs a stage
    first = run_train(params, "baseline")
    outputs = [Path("models/baseline/model.keras"), Path("reports/baseline/history.csv"),
               Path("reports/baseline/train_metrics.json")]
    written = {path: path.read_bytes() for path in outputs}
    for path in outputs:  # as DVC does before it runs a stage
        path.unlink()

    assert run_train(params, "baseline") == first
    assert {path: path.read_bytes() for path in outputs} == written
    assert "DVC never recorded it" in capsys.readouterr().err
    experiment = _client(workdir).get_experiment_by_name("chromalab").experiment_id
    assert len(_client(workdir).search_runs([experiment])) == 1

    lock = {"schema": "2.0", "stages": {"train@baseline": {"cmd": "python stages/train.py baseline", "outs": [
        {"path": path.as_posix(), "hash": "md5", "md5": hashlib.md5(data).hexdigest(), "size": len(data)}
        for path, data in written.items()]}}}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))
    for path in outputs:
        path.unlink()
    forced = run_train(params, "baseline")
    assert forced["mlflow_run_id"] != first["mlflow_run_id"]
    assert len(_client(workdir).search_runs([experiment])) == 2

    # run by hand, not by DVC, the same training again means training again
    Path("dvc.lock").unlink()
    monkeypatch.delenv("DVC_ROOT")
    assert run_train(params, "baseline")["mlflow_run_id"] not in (first["mlflow_run_id"], forced["mlflow_run_id"])


def test_an_experiment_killed_in_a_dvc_temporary_copy_resumes_in_the_next_copy(tmp_path, monkeypatch, dataset,
                                                                               mlflow_db_template, capsys):
    """`dvc exp run --temp` and `--queue` train in a copy under .dvc/tmp/exps that a re-run never sees again: the
    checkpoint lives in the real repository, one per experiment; once trained it keeps copies of the outputs for a
    copy killed before DVC stored them, and goes once DVC's cache holds them."""
    from chromalab.track import runs
    from chromalab.train.stage import _remove_checkpoints_dvc_keeps

    root = _git_repo(tmp_path / "repo", dataset, mlflow_db_template)
    copies = [root / ".dvc/tmp/exps/standalone" / name for name in ("tmp1", "tmp2", "tmp3")]
    for copy in [root, *copies]:
        (copy / ".dvc").mkdir(parents=True, exist_ok=True)
    for copy in copies:
        (copy / "data").mkdir()
        (copy / "data/tfrecords").symlink_to(dataset)
    params = tiny_params(train={"val_every": 2, "checkpoint_every": 2, "sample_every": 2}, baseline={"epochs": 4})
    monkeypatch.chdir(copies[0])
    with monkeypatch.context() as patch:
        patch.setattr(runs, "log_sample_sheet", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):  # after the epoch-2 checkpoint
            run_train(params, "baseline")
    (kept,) = (root / "models/baseline").glob("checkpoint-*")
    assert json.loads((kept / "state.json").read_text())["epoch"] == 2

    monkeypatch.chdir(copies[1])
    metrics = run_train(params, "baseline")
    assert "resuming baseline from its checkpoint at epoch 2/4" in capsys.readouterr().err
    client = _client(root)
    (run,) = client.search_runs([client.get_experiment_by_name("chromalab").experiment_id])
    assert (run.info.run_id, run.info.status) == (metrics["mlflow_run_id"], "FINISHED")
    model = (copies[1] / "models/baseline/model.keras").read_bytes()

    # the second copy killed before DVC stored its outputs, and gone with them: the third puts them back
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(copies[2])
    assert run_train(params, "baseline")["mlflow_run_id"] == metrics["mlflow_run_id"]
    assert "its outputs are put back instead of training again" in capsys.readouterr().err
    assert (copies[2] / "models/baseline/model.keras").read_bytes() == model
    assert len(client.search_runs([client.get_experiment_by_name("chromalab").experiment_id])) == 1

    # once DVC's cache holds every output, the folder goes (at the next training of the model)
    *first, last = sorted(json.loads((kept / "state.json").read_text())["delivered"].items())
    for name, md5 in first:
        _put_in_dvc_cache(root, kept / "delivered" / Path(name).name, md5)
    _remove_checkpoints_dvc_keeps(root / "models/baseline")
    assert kept.is_dir()  # one output not cached yet
    _put_in_dvc_cache(root, kept / "delivered" / Path(last[0]).name, last[1])
    _remove_checkpoints_dvc_keeps(root / "models/baseline")
    assert sorted(p.name for p in (root / "models/baseline").iterdir()) == []


def _put_in_dvc_cache(root: Path, file: Path, md5: str) -> None:
    """`file` where DVC 3 stores a file it caches in `root`'s repository."""
    (root / ".dvc/cache/files/md5" / md5[:2]).mkdir(parents=True, exist_ok=True)
    shutil.copy(file, root / ".dvc/cache/files/md5" / md5[:2] / md5[2:])


def test_a_training_in_the_workspace_also_removes_the_temporary_copies_checkpoints_dvc_keeps(
        tmp_path, monkeypatch, dataset, mlflow_db_template):
    """The README: once DVC's cache holds a temporary copy's outputs, "the model's next training removes" its
    checkpoint-<fingerprint>: a training in the workspace (`dvc repro`, `dvc exp run`) is the model's next one too,
    where only another temporary copy's removed it, and the copies of the outputs (the model) stayed."""
    from chromalab.train.checkpoint import Checkpoint

    root = _git_repo(tmp_path / "repo", dataset, mlflow_db_template)
    (root / ".dvc").mkdir()
    monkeypatch.chdir(root)
    output = tmp_path / "model.keras"
    output.write_bytes(b"an earlier experiment's model")
    kept = root / "models/baseline/checkpoint-earlier"
    Checkpoint(kept).mark_complete("earlier", "run", [output])
    _put_in_dvc_cache(root, output, hashlib.md5(output.read_bytes()).hexdigest())
    run_train(tiny_params(baseline={"epochs": 1}), "baseline")
    assert not kept.exists()


def test_changed_params_start_afresh_instead_of_resuming(gan_run_on_server):
    repo, metrics, stderr = gan_run_on_server
    assert "starting afresh" in stderr
    assert metrics["epochs"] == GAN_RUN["gan"]["epochs"]
    assert len(read_history(repo / "reports/gan/history.csv")) == GAN_RUN["gan"]["epochs"]


def test_training_logs_to_a_real_tracking_server(gan_run_on_server, mlflow_server):
    repo, metrics, _ = gan_run_on_server
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(metrics["mlflow_run_id"])
    epochs = GAN_RUN["gan"]["epochs"]
    assert run.data.params["gan.epochs"] == str(epochs)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "g_loss")] == list(range(1, epochs + 1))
    assert not (repo / "mlflow.db").exists()  # the env var overrides the default store


def test_the_gan_exports_its_generator_with_the_chroma_curve(gan_run_on_server, dataset):
    """model.keras is the best generator followed by its chroma curve, and the final val ΔE00 is that curved
    model's, so it differs from the best checkpoint's."""
    import keras

    from chromalab.data.dataset import load_split_arrays
    from chromalab.train.validation import mean_delta_e00

    repo, metrics, _ = gan_run_on_server
    exported = keras.saving.load_model(repo / "models/gan/model.keras", compile=False)
    generator = keras.Model(exported.inputs, exported.get_layer("ab").output)
    _, val_L, val_ab = load_split_arrays(dataset, "val")
    curved, raw = exported.predict(val_L, verbose=0), generator.predict(val_L, verbose=0)
    k, pivot = GAN_RUN["gan"]["chroma_expand"], GAN_RUN["gan"]["chroma_pivot"]
    chroma = np.hypot(raw[..., 0], raw[..., 1])[..., None] * 128
    np.testing.assert_allclose(curved, raw * (1 - k + k * chroma / pivot), atol=1e-5)
    assert metrics["val_delta_e00"] == pytest.approx(mean_delta_e00(val_L, val_ab, curved), rel=1e-4)
    assert metrics["val_delta_e00"] != pytest.approx(metrics["best_val_delta_e00"], rel=1e-4)


# --- validation on val, and the export of its best epoch -------------------------------------------------------


def _dataset_without_test_records(dataset: Path, folder: Path) -> Path:
    """The records without the test split's shards (dataset.json still lists them): a training run that read
    test would fail on the missing file."""
    info = read_dataset_info(dataset)
    folder.mkdir()
    for path in dataset.iterdir():
        if path.name not in info["shards"]["test"]:
            shutil.copy(path, folder / path.name)
    return folder


def test_training_validates_on_val_never_test_and_exports_the_best_epoch(tmp_path, dataset, mlflow_db_template,
                                                                         monkeypatch):
    """The validations' ΔE00 scripted so that the best (epoch 4 of 6) is not the last: model.keras holds the
    weights the colorizer had at epoch 4, train_metrics.json and MLflow name it, and the scored photos are the
    val split's (the test records are absent: reading them would fail)."""
    from chromalab.data.dataset import load_split_arrays
    from chromalab.train import callbacks

    records = _dataset_without_test_records(dataset, tmp_path / "records")
    repo = _git_repo(tmp_path / "repo", records, mlflow_db_template)
    monkeypatch.chdir(repo)
    scripted, seen = {2: 5.0, 4: 3.0, 6: 4.0}, {}
    _, val_L, val_ab = load_split_arrays(records, "val")

    def scripted_delta_e00(net, L, true_ab, batch_size):
        np.testing.assert_array_equal(L, val_L)  # scored on val
        np.testing.assert_array_equal(true_ab, val_ab)
        epoch = 2 * (len(seen) + 1)
        seen[epoch] = [np.array(w) for w in net.weights]
        return scripted[epoch]

    monkeypatch.setattr(callbacks, "val_delta_e00", scripted_delta_e00)
    params = tiny_params(train={"val_every": 2, "checkpoint_every": 3, "sample_every": 6},
                         baseline={"epochs": 6})
    metrics = run_train(params, "baseline")

    assert sorted(seen) == [2, 4, 6]
    assert metrics["best_epoch"] == 4 and metrics["best_val_delta_e00"] == 3.0
    assert metrics["exported"] == "best validation ΔE00 (epoch 4)"
    assert not any(key.startswith("test_") for key in metrics)  # test is the evaluate stage's
    assert json.loads((repo / "reports/baseline/train_metrics.json").read_text()) == metrics
    import keras

    exported = keras.saving.load_model(repo / "models/baseline/model.keras", compile=False)
    for got, best, last in zip(exported.weights, seen[4], seen[6], strict=True):
        np.testing.assert_array_equal(np.asarray(got), best)
    assert any(not np.array_equal(b, l) for b, l in zip(seen[4], seen[6]))  # so the check above can fail
    # The final val_* scores are the exported net's, on val: its ΔE00 recomputed directly agrees.
    from chromalab.train.validation import mean_delta_e00

    pred = exported.predict(val_L, verbose=0)
    assert metrics["val_delta_e00"] == pytest.approx(mean_delta_e00(val_L, val_ab, pred), rel=1e-4)
    history = read_history(repo / "reports/baseline/history.csv")
    assert [row.get("val_delta_e00") for row in history] == [None, 5.0, None, 3.0, None, 4.0]
    run = _client(repo).get_run(metrics["mlflow_run_id"])
    assert run.data.tags["exported"] == "best validation ΔE00 (epoch 4)"
    assert run.data.metrics["best_epoch"] == 4 and run.data.metrics["best_val_delta_e00"] == 3.0


def test_the_checkpoint_keeps_the_best_weights_it_names(tmp_path):
    """Checkpoint.save_best writes the best validation's weights at once; state.json names them from the next
    save on, that save keeps them (and removes an older best), and a state naming a missing one won't resume."""
    import keras

    from chromalab.train.checkpoint import Checkpoint

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    checkpoint = Checkpoint(tmp_path / "checkpoint")
    state = {"fingerprint": "f", "status": "running", "epoch": 0}
    checkpoint.save_best(net, state, 3, 7.5)
    state["epoch"] = 4
    checkpoint.save(net, state, [{"epoch": 4}])
    checkpoint.save_best(net, state, 6, 6.5)  # a new best before the next checkpoint: the old file stays named
    assert json.loads(checkpoint.state_file.read_text())["best_weights"] == "best-epoch-00003.weights.h5"
    assert (checkpoint.folder / "best-epoch-00003.weights.h5").is_file()
    state["epoch"] = 8
    checkpoint.save(net, state, [{"epoch": 8}])
    saved = json.loads(checkpoint.state_file.read_text())
    assert (saved["best_epoch"], saved["best_val_delta_e00"], saved["best_weights"]) == (
        6, 6.5, "best-epoch-00006.weights.h5")
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == [
        "best-epoch-00006.weights.h5", "epoch-00008.history.csv", "epoch-00008.weights.h5", "state.json"]
    assert checkpoint.resumable(saved, "f")
    (checkpoint.folder / "best-epoch-00006.weights.h5").unlink()
    assert not checkpoint.resumable(saved, "f")



def training_code() -> str:
    """The code hash run_train fingerprints its checkpoints with."""
    return code_hash("chromalab.train.stage")


def test_a_change_to_the_training_code_is_a_new_fingerprint_and_no_other_change_is(tmp_path, monkeypatch):
    """A run killed, then resumed after an edit to the code it runs would be half old code's, recorded by DVC as
    today's: the checkpoint's fingerprint holds that code. An edit to code training never runs (serve's page,
    evaluate's sheets, the download) leaves DVC's deps alone, so it leaves the checkpoint resumable too."""
    import chromalab
    from chromalab import code

    package = tmp_path / "src" / "chromalab"
    shutil.copytree(Path(chromalab.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(chromalab, "__file__", str(package / "__init__.py"))
    params = parse_params(GAN_RUN)

    def fingerprint() -> str:
        code.code_hash.cache_clear()
        return params_fingerprint(params, "gan", "data", training_code())

    before = fingerprint()
    assert fingerprint() == before
    for untouched_by_training in ("serve/app.py", "evaluate/figures.py", "data/download.py"):
        edited = package / untouched_by_training
        edited.write_text(edited.read_text() + "\n# an edit\n")
    assert fingerprint() == before
    losses = package / "train" / "losses.py"
    losses.write_text(losses.read_text().replace("SSIM_FILTER_SIZE = 11", "SSIM_FILTER_SIZE = 7"))
    assert fingerprint() != before
    code.code_hash.cache_clear()


def test_a_stop_signal_during_training_stops_at_the_next_batch_and_the_run_ends_killed(workdir, monkeypatch):
    """A Ctrl-C or SIGTERM that chromalab.entry held back (stops_deferred) stops training between batches; the
    MLflow run ends KILLED, and the re-run resumes it."""
    import signal

    from chromalab import entry

    monkeypatch.setattr(entry, "_stops", [signal.SIGTERM])  # as if received while fit ran
    params = tiny_params(baseline={"epochs": 2})
    with pytest.raises(KeyboardInterrupt):
        run_train(params, "baseline")
    client = _client(workdir)
    (stopped,) = client.search_runs([client.get_experiment_by_name("chromalab").experiment_id])
    assert stopped.info.status == "KILLED"
    assert "epoch" not in stopped.data.metrics  # it stopped within the first epoch, before recording one
    monkeypatch.setattr(entry, "_stops", [])
    assert run_train(params, "baseline")["mlflow_run_id"] == stopped.info.run_id


def test_a_fresh_run_has_its_optimizer_built_before_fit(workdir, monkeypatch):
    """TensorFlow traces a first step that creates variables (the optimizer's slots) a second time, seconds per
    model on a CPU: a fresh run builds them before `fit`, as a resumed run's restore does."""
    import keras

    fit, built = keras.Model.fit, []
    monkeypatch.setattr(keras.Model, "fit",
                        lambda self, *a, **k: built.append(self.optimizer.built) or fit(self, *a, **k))
    run_train(tiny_params(baseline={"epochs": 1}), "baseline")
    assert built == [True]


def test_a_killed_run_whose_checkpoint_is_given_up_ends_killed_not_running_for_ever(workdir):
    from chromalab.train.checkpoint import Checkpoint

    client = _client(workdir)
    experiment = client.create_experiment("chromalab")
    abandoned = client.create_run(experiment, run_name="workspace-baseline").info.run_id  # killed with -9: RUNNING
    Checkpoint(workdir / "models/baseline/checkpoint").write_state(
        {"fingerprint": "of other params", "status": "running", "epoch": 1, "mlflow_run_id": abandoned})
    metrics = run_train(tiny_params(baseline={"epochs": 1}), "baseline")
    assert metrics["mlflow_run_id"] != abandoned
    assert client.get_run(abandoned).info.status == "KILLED"


def test_a_second_training_of_the_same_model_waits_then_says_so_instead_of_sharing_the_checkpoint(
        workdir, monkeypatch):
    """A re-run started beside a stage that is still stopping would resume the checkpoint the first is replacing."""
    from chromalab.files import held_exclusively
    from chromalab.train import stage

    monkeypatch.setattr(stage, "TRAINING_LOCK_WAIT_S", 0.3)
    with held_exclusively(workdir / "models" / "baseline", 0) as held:  # the other training, in effect
        assert held
        with pytest.raises(ChromalabError, match=r"models/baseline is being trained by another process; wait"):
            run_train(tiny_params(baseline={"epochs": 1}), "baseline")
    assert run_train(tiny_params(baseline={"epochs": 1}), "baseline")["epochs"] == 1  # once it has ended


def test_the_sample_sheets_gray_panel_is_the_gray_the_photo_is_shown_as():
    """MLflow's sample sheets draw the gray input as evaluate's sheets do: Lab (L, 0, 0), not L/100 as sRGB."""
    from chromalab.train.callbacks import sample_sheet
    from sheets import gray_picture

    L = np.linspace(0.0, 1.0, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    ab = np.random.default_rng(0).uniform(-0.3, 0.3, (2, 8, 8, 2)).astype(np.float32)
    sheet = sample_sheet(L, ab, ab)
    for row in range(2):
        gray_panel = sheet[8 * row:8 * (row + 1), :8].astype(int)
        assert np.abs(gray_panel - gray_picture(L[row])).max() <= 1
