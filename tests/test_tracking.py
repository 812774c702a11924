"""chromalab.track.runs against real stores: the default SQLite file and a real `mlflow server`.

Every check reads back through MlflowClient. One server serves the whole file; it is launched by the
first test so its ~15 s start overlaps the SQLite tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chromalab.track import runs
from chromalab.config import flatten, parse_params
from chromalab.errors import ChromalabError
from conftest import _free_port, launch_mlflow_server, stop_process_group, wait_until_up

BIN = Path(sys.executable).parent
# A git identity that doesn't depend on the machine's global config, for git and for `dvc exp run`.
GIT_ENV = {"GIT_AUTHOR_NAME": "chromalab-test", "GIT_AUTHOR_EMAIL": "test@chromalab.invalid",
           "GIT_COMMITTER_NAME": "chromalab-test", "GIT_COMMITTER_EMAIL": "test@chromalab.invalid"}
DVC_ENV_VARS = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def _start_server_early(mlflow_server_process):
    """Launch the shared server with the first test, so its ~15 s start overlaps the SQLite tests."""


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A committed git + DVC repository as the working directory, with no DVC/MLflow variables set."""
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / ".dvc").mkdir()  # what DVC's Repo.find_root looks for
    (root / "params.yaml").write_text("gan: {epochs: 3}\n")
    _git(root, "add", "params.yaml")
    _git(root, "commit", "-q", "-m", "init")
    monkeypatch.chdir(root)
    for name in (*DVC_ENV_VARS, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.fixture(params=["sqlite", "server"])
def store(request, repo, monkeypatch) -> str:
    """The tracking URI the code under test will pick: its SQLite default, or a real server via the env."""
    if request.param == "server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue("mlflow_server"))
    return runs.tracking_uri()


def _tiny_model():
    import keras

    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(2, 1),
    ])


def test_model_run_logs_params_metrics_images_model_and_tags(store, repo, monkeypatch, tmp_path):
    import keras
    import mlflow
    import tensorflow as tf

    runs.check_tracking_server()
    commit = _git(repo, "rev-parse", "HEAD")
    (repo / "params.yaml").write_text("gan: {epochs: 4}\n")  # uncommitted change: dirty
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lynx")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", commit)
    params = parse_params({"gan": {"epochs": 3}, "baseline": {"epochs": 7}, "evaluate": {"n_sheet": 2}})
    model = _tiny_model()
    x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    sheets = {step: np.full((16, 24, 3), 40 * step, dtype=np.uint8) for step in (1, 3)}

    with runs.model_run("gan", params, dataset_hash="sha256:abc", stage="train@gan") as run:
        for epoch in (1, 2, 3):
            runs.log_epoch({"g_loss": 1.0 / epoch, "d_loss": 0.5}, epoch)
            if epoch in sheets:
                runs.log_sample_sheet(sheets[epoch], epoch)
        runs.log_keras_model(model, x[:1])
    run_id = run.info.run_id

    client = mlflow.MlflowClient(store)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "brisk-lynx-gan"
    assert client.get_experiment(logged.info.experiment_id).name == runs.EXPERIMENT

    # params: every key of the shared groups and the run's own model, nothing of the other model or evaluate
    expected = {k: str(v) for k, v in flatten(params).items()
                if k.split(".")[0] in (*runs.SHARED_PARAM_GROUPS, "gan")}
    assert logged.data.params == expected
    assert logged.data.params["gan.epochs"] == "3"
    assert not any(k.startswith(("baseline.", "evaluate.")) for k in logged.data.params)

    history = client.get_metric_history(run_id, "g_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]

    # the image series: one full PNG per logged step under images/, pixels intact
    pngs = {int(a.path.split("+step+")[1].split("+")[0]): a.path
            for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")}
    assert sorted(pngs) == [1, 3]
    for step, path in pngs.items():
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=store,
                                                    dst_path=str(tmp_path))  # MLflow's own temp folder stays
        np.testing.assert_array_equal(np.asarray(Image.open(local)), sheets[step])

    # the model: loadable from the run, same predictions, a signature with a free batch dimension
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path))
    loaded = mlflow.keras.load_model(local)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    signature = mlflow.models.Model.load(local).signature
    assert signature.inputs.inputs[0].shape == (-1, 8, 8, 1)
    assert signature.outputs.inputs[0].shape == (-1, 8, 8, 2)

    tags = logged.data.tags
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["mlflow.source.git.dirty"] == "true"
    assert tags["dvc.exp_name"] == "brisk-lynx"
    assert tags["dvc.baseline_rev"] == commit
    assert tags["dvc.rev"] == f"refs/exps/{commit[:2]}/{commit[2:]}/brisk-lynx"  # where its dvc.lock is committed
    assert tags["stage"] == "train@gan" and tags["model"] == "gan" and tags["dataset_hash"] == "sha256:abc"
    assert (tags["device"] == "CPU") == (not tf.config.list_physical_devices("GPU"))
    assert tags["keras.version"] == keras.__version__ and tags["keras.backend"] == keras.backend.backend()
    assert tags["tensorflow.version"] == tf.__version__

    if store.startswith("sqlite"):
        # the default store and its artifacts sit at the repo root, not in a temp folder
        assert store == f"sqlite:///{repo.resolve() / 'mlflow.db'}"
        assert logged.info.artifact_uri.startswith((repo.resolve() / "mlruns").as_uri() + "/")
        assert (repo / "mlruns" / runs.EXPERIMENT / run_id / "artifacts" / pngs[3]).is_file()


def test_killed_run_resumes_by_id_and_a_missing_one_starts_afresh(store, repo, capsys):
    import mlflow

    params = parse_params({})
    with pytest.raises(KeyboardInterrupt):
        with runs.model_run("baseline", params, dataset_hash="h", stage="train@baseline") as first:
            runs.log_epoch({"loss": 0.9}, 1)
            raise KeyboardInterrupt  # the training process is stopped mid-run
    client = mlflow.MlflowClient(store)
    assert client.get_run(first.info.run_id).info.status == "KILLED"

    # resumed with a param changed that does not change what trains (the checkpoint's fingerprint leaves it out)
    changed = parse_params({"images": {"concurrency": 4}})
    with runs.model_run("baseline", changed, dataset_hash="h", stage="train@baseline",
                            run_id=first.info.run_id) as resumed:
        assert client.get_run(resumed.info.run_id).info.status == "RUNNING"
        runs.log_epoch({"loss": 0.7}, 2)
    assert resumed.info.run_id == first.info.run_id
    run = client.get_run(first.info.run_id)
    assert run.data.params["images.concurrency"] == str(params.images.concurrency)  # MLflow keeps the first
    assert "keeps its first values of images.concurrency" in capsys.readouterr().err
    assert run.info.status == "FINISHED" and run.info.run_name == "workspace-baseline"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 0.9), (2, 0.7)]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id], "tags.model = 'baseline'")] \
        == [first.info.run_id]

    gone = "0" * 32
    with runs.model_run("baseline", params, dataset_hash="h", stage="train@baseline", run_id=gone) as fresh:
        pass
    assert fresh.info.run_id not in (gone, first.info.run_id)
    assert f"MLflow run {gone}" in capsys.readouterr().err


def test_a_stop_while_another_process_holds_the_store_locked_is_one_line_and_still_stops(repo, capsys):
    import sqlite3

    import mlflow

    params = parse_params({})
    with pytest.raises(KeyboardInterrupt):
        with runs.model_run("baseline", params, dataset_hash="h", stage="train@baseline") as stopped:
            locker = sqlite3.connect(repo / "mlflow.db", isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")  # e.g. `mlflow ui` writing, or another stage logging
            raise KeyboardInterrupt
    said = capsys.readouterr().err
    assert "could not record the stopped run as KILLED" in said and "Traceback" not in said
    assert len([line for line in said.splitlines() if "KILLED" in line]) == 1
    locker.execute("ROLLBACK")
    locker.close()
    assert mlflow.active_run() is None  # the next run of this process starts clean
    status = mlflow.MlflowClient(runs.tracking_uri()).get_run(stopped.info.run_id).info.status
    assert status == "RUNNING"  # as the message says: the re-run resumes it


def test_a_stage_in_a_dvc_temp_copy_logs_to_the_real_root(repo, monkeypatch):
    import mlflow

    # where `dvc exp run --temp` runs a stage (DVC_ROOT unset, to test the path logic on its own)
    copy = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpq8v1"
    (copy / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(copy)
    with runs.model_run("gan", parse_params({}), dataset_hash="h", stage="train@gan") as run:
        runs.log_sample_sheet(np.zeros((8, 8, 3), dtype=np.uint8), 1)
    assert (repo / "mlflow.db").is_file() and not (copy / "mlflow.db").exists()
    artifacts = mlflow.MlflowClient(runs.tracking_uri()).get_run(run.info.run_id).info.artifact_uri
    assert artifacts == (repo.resolve() / "mlruns" / runs.EXPERIMENT / run.info.run_id / "artifacts").as_uri()
    assert list((repo / "mlruns").rglob("samples+step+1+*.png")) and not (copy / "mlruns").exists()


@pytest.mark.parametrize("relative", ["sqlite:///mlflow.db", "sqlite:///stores/mlflow.db"])
def test_a_relative_store_in_a_dvc_temp_copy_is_the_real_roots(repo, monkeypatch, relative, mlflow_db_template):
    # as `mlflow ui --backend-store-uri sqlite:///mlflow.db` is given it: MLflow made the database in the copy,
    # which `dvc exp run --temp` / `--queue` delete, and the runs were lost (their artifacts orphaned at the root)
    import shutil

    import mlflow

    copy = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpq8v1"
    (copy / ".dvc").mkdir(parents=True)
    (repo / "stores").mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", relative)
    real = f"sqlite:///{(repo.resolve() / relative.removeprefix('sqlite:///')).as_posix()}"
    shutil.copy(mlflow_db_template, real.removeprefix("sqlite:///"))  # its tables made: MLflow's migrations take 4 s
    assert runs.tracking_uri() == real
    with runs.model_run("gan", parse_params({}), dataset_hash="h", stage="train@gan") as run:
        pass
    assert mlflow.MlflowClient(real).get_run(run.info.run_id).info.status == "FINISHED"
    assert not list(copy.rglob("*.db"))
    monkeypatch.chdir(repo)  # outside a copy, MLflow's own reading: relative to the current folder
    assert runs.tracking_uri() == relative


@pytest.mark.parametrize("uri", ["databricks", "databricks://profile", "http://127.0.0.1:5000",
                                 "sqlite:////abs/mlflow.db", "postgresql://user@127.0.0.1/db"])
def test_a_store_elsewhere_is_left_as_it_is_in_a_dvc_temp_copy(repo, monkeypatch, uri):
    # `databricks`, having no scheme, was taken for a relative file store: <root>/databricks, refused
    copy = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpq8v1"
    (copy / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert runs.tracking_uri() == uri


def test_each_run_names_the_git_revision_of_its_own_data_and_the_shared_source_its_dvc_hash(store, repo,
                                                                                              monkeypatch):
    """`dvc get <repo> data/tfrecords --rev <dvc.rev>` fetches a run's data: a `dvc exp run`'s own ref (its
    dvc.lock is committed there; its name alone may be reused), else the commit it ran on. MLflow keeps one
    dataset per name and digest, so the rev is each run's tag, not the source every run on that data shares,
    which holds the path (the copy's own, for a queued run) and dvc.lock's hash."""
    import mlflow

    from chromalab.track.datasets import log_dataset_inputs

    runs.check_tracking_server()
    commit = _git(repo, "rev-parse", "HEAD").strip()
    copy = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpq8v1"  # where a queued experiment runs
    (copy / ".dvc").mkdir(parents=True)
    (copy / "dvc.lock").write_text("schema: '2.0'\nstages:\n  tfrecords:\n    cmd: python stages/tfrecords.py\n"
                                  "    outs:\n    - path: data/tfrecords\n      md5: 0123abcd.dir\n")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", commit)
    info = {"image_size": 8, "counts": {"train": 2, "val": 1, "test": 1}, "shards": {"train": [], "val": [], "test": []},
            "content_hash": "c" * 64}
    params = parse_params({})
    logged = {}
    for name in ("brisk-lynx", "calm-heron", None):  # two experiments on the same data, then `dvc repro`
        if name:
            monkeypatch.setenv("DVC_EXP_NAME", name)
        else:
            monkeypatch.delenv("DVC_EXP_NAME")
        with runs.model_run("gan", params, dataset_hash="sha256:c", stage="train@gan") as run:
            log_dataset_inputs(info, Path("data/tfrecords"))
        logged[name] = mlflow.MlflowClient(store).get_run(run.info.run_id)
    for name, run in logged.items():
        assert run.data.tags["dvc.rev"] == (f"refs/exps/{commit[:2]}/{commit[2:]}/{name}" if name else commit)
        sources = {json.dumps(json.loads(i.dataset.source), sort_keys=True) for i in run.inputs.dataset_inputs}
        assert sources == {json.dumps({"md5": "0123abcd.dir", "path": "data/tfrecords"})}


def test_a_model_whose_upload_failed_leaves_no_files_behind_once_logged_again(repo, monkeypatch):
    """A disk that filled while MLflow copied the model in: the re-run's model replaces the FAILED one, and the
    part that was written goes too (MLflow deletes the record only), or the disk stays full of it."""
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    runs.check_tracking_server()
    model, x = _tiny_model(), np.zeros((1, 8, 8, 1), np.float32)
    copy = LocalArtifactRepository.log_artifacts

    def disk_fills(self, local_dir, artifact_path=None):
        copy(self, local_dir, artifact_path)
        raise OSError(28, "No space left on device")
    with runs.model_run("gan", parse_params({}), dataset_hash="sha256:abc", stage="train@gan") as run:
        with monkeypatch.context() as patch, pytest.raises(OSError):
            patch.setattr(LocalArtifactRepository, "log_artifacts", disk_fills)
            runs.log_keras_model(model, x)
        runs.log_keras_model(model, x)
    client = mlflow.MlflowClient(runs.tracking_uri())
    logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.status for m in logged] == [LoggedModelStatus.READY]
    assert {path.parent.parent.name for path in (repo / "mlruns").rglob("MLmodel")} == {logged[0].model_id}


def test_logging_outside_a_model_run_is_refused(repo):
    import mlflow

    with pytest.raises(RuntimeError, match="model_run"):
        runs.log_epoch({"loss": 1.0}, 1)
    assert mlflow.active_run() is None


def test_a_server_that_dies_mid_run_ends_the_stage_in_one_line(repo, tmp_path, monkeypatch, mlflow_db_template):
    """Killed between two epochs' logging: one line saying what to do, soon after MLflow's retries, instead of
    its chained tracebacks after waiting them out a second time to end the run."""
    url, server = launch_mlflow_server(tmp_path / "server", mlflow_db_template)
    try:
        wait_until_up(f"{url}/health", server, tmp_path / "server" / "server.log")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the default 7 would take minutes here
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        with pytest.raises(ChromalabError) as err:
            with runs.model_run("gan", parse_params({}), dataset_hash="h", stage="train@gan"):
                runs.log_epoch({"g_loss": 1.0}, 1)
                stop_process_group(server)
                started = time.monotonic()
                runs.log_epoch({"g_loss": 0.5}, 2)
    finally:
        stop_process_group(server)
    assert time.monotonic() - started < 60
    assert f"MLflow tracking server {url} stopped answering" in str(err.value) and "\n" not in str(err.value)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # MLflow's own settings as they were


def test_deleted_experiment_is_a_one_line_error(repo):
    import mlflow

    client = mlflow.MlflowClient(runs.tracking_uri())
    client.delete_experiment(client.create_experiment(runs.EXPERIMENT))
    with pytest.raises(ChromalabError, match="restore it") as err:
        with runs.model_run("gan", parse_params({}), dataset_hash="h", stage="train@gan"):
            pass
    assert "\n" not in str(err.value)


def test_unreachable_server_is_reported_at_once(monkeypatch):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(ChromalabError) as err:
        runs.check_tracking_server()
    assert time.monotonic() - started < 10
    assert uri in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("uri", "message"), [
    ("foo://bar", "MLFLOW_TRACKING_URI foo://bar: not a tracking store"),
    ("/nonexistent/dir", "folder /nonexistent does not exist"),
    ("file:///nonexistent/mlruns", "folder /nonexistent does not exist")])
def test_a_tracking_uri_that_is_no_store_or_in_no_folder_is_one_line(uri, message, tmp_path, monkeypatch):
    # MLflow raised a 76-line traceback for a scheme it has no store for, after 7 s, and another for the folder
    with pytest.raises(ChromalabError, match=message) as err:
        runs.check_tracking_server(uri)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    runs.check_tracking_server((tmp_path / "mlruns").as_uri())  # a file store (the GPU check's, allowed) is one
    runs.check_tracking_server(str(tmp_path / "mlruns"))


@pytest.mark.parametrize(("store", "reason"), [
    ("sqlite://mlflow.db", "Invalid SQLite URL"),  # two slashes: no path, a host
    ("sqlite:///{tmp}/text.db", "file is not a database"),
    ("postgresql://user@127.0.0.1:1/db", "No module named"),  # its driver is not installed
    ("{tmp}/mlruns", "The filesystem tracking backend (e.g., './mlruns') is in maintenance mode and will not "
                     "receive further updates): fix")])
def test_a_store_mlflow_cannot_open_is_one_line_before_training(store, reason, tmp_path, monkeypatch):
    # MLflow's traceback once the run was opened, after the data was loaded and the model built
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "text.db").write_text("no database\n" * 100)
    uri = store.format(tmp=tmp_path)
    with pytest.raises(ChromalabError) as err:
        runs.check_tracking_server(uri)
    assert str(err.value).startswith(f"MLflow cannot open the store {uri} (")
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_a_store_of_an_older_mlflow_is_one_line_saying_how_to_upgrade_it(tmp_path, mlflow_db_template):
    # The one line cut MLflow's advice (`mlflow db upgrade`) off and said to fix or unset MLFLOW_TRACKING_URI
    import shutil
    import sqlite3

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '7f2a7d5fae7d'")  # an older MLflow's schema
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ChromalabError, match="out-of-date database schema") as err:
        runs.check_tracking_server(uri)
    assert str(err.value).endswith(f": back it up, then upgrade it (`mlflow db upgrade {uri}`)")


def test_a_plain_http_server_asked_over_https_is_told_to_use_http(tmp_path):
    # the TLS handshake meets plain HTTP: the line said to set a certificate
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ChromalabError, match="it answers plain HTTP: use http:// in MLFLOW_TRACKING_URI"):
            runs.check_tracking_server(f"https://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_a_plain_http_server_is_named_whichever_openssl_reports_it():
    # OpenSSL 3.2 and later say "record layer failure" where earlier ones said WRONG_VERSION_NUMBER
    import ssl

    for reason in ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
                   "[SSL] record layer failure (_ssl.c:1000)"):
        assert runs._unreachable_advice(ssl.SSLError(1, reason)) == ("it answers plain HTTP: use http:// in "
                                                                     "MLFLOW_TRACKING_URI")
    assert "CA bundle" in runs._unreachable_advice(ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] failed"))


def test_a_5xx_with_mlflows_json_body_is_a_server_failure_and_a_local_error_is_not():
    from mlflow.exceptions import MlflowException, RestException

    assert runs._refused_status(RestException({"error_code": "NOT_IMPLEMENTED", "message": "no"})) == 501
    assert runs._refused_status(MlflowException("Run 'abc' not found")) is None  # its default code maps to 500
    assert runs._refused_status(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"})) is None


def test_a_server_that_takes_the_connection_but_never_answers_is_named_stuck_not_down(monkeypatch):
    # the line said to start a server that was running
    import socket

    monkeypatch.setattr(runs, "HEALTH_TIMEOUT_S", 0.5)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel accepts the connection; nothing ever answers it
        with pytest.raises(ChromalabError, match=r"did not answer within 0.5 s: see whether it is stuck"):
            runs.check_tracking_server(f"http://127.0.0.1:{listener.getsockname()[1]}")


def test_a_broken_default_store_is_one_line_saying_to_move_it_aside(repo):
    # With MLFLOW_TRACKING_URI unset there is no URI to fix: the line said to fix or unset it
    (repo / "mlflow.db").write_text("no database\n" * 100)
    with pytest.raises(ChromalabError, match="file is not a database") as err:
        runs.check_tracking_server()
    assert str(err.value).endswith(f": move {repo / 'mlflow.db'} aside (MLflow makes a new one there), then re-run")


def test_stages_opening_a_new_store_at_once_take_turns(tmp_path, monkeypatch):
    # `dvc queue start -j 2` on a new mlflow.db: both stages ran MLflow's migrations at once, and one failed
    # ("duplicate column name: step") with a line saying to fix MLFLOW_TRACKING_URI
    import threading

    import mlflow

    from chromalab.files import held_exclusively

    opened = []

    class Client:
        def __init__(self, uri):
            opened.append(uri)

        def search_experiments(self, max_results):
            pass

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with held_exclusively(tmp_path, 0) as held:  # the other stage, making the store's tables
        assert held
        opening = threading.Thread(target=runs.check_tracking_server, args=(uri,), daemon=True)
        opening.start()
        opening.join(timeout=1)
        assert opening.is_alive() and not opened
    opening.join(timeout=10)
    assert opened == [uri]


def test_sqlite_store_in_a_missing_folder_is_reported(tmp_path):
    uri = f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}"
    with pytest.raises(ChromalabError, match="does not exist"):
        runs.check_tracking_server(uri)


def test_silent_server_times_out(monkeypatch):
    monkeypatch.setattr(runs, "HEALTH_TIMEOUT_S", 1.0)
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ChromalabError, match="unreachable") as err:
            runs.check_tracking_server(uri)
        assert time.monotonic() - started < 5
    assert uri in str(err.value)


@pytest.fixture
def guarded_server():
    """A stand-in tracking server behind a login, as a proxy in front of `mlflow server` puts it: every path,
    /health too, wants user alice's password; `answers[path]` (a status) overrides the API's answer."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    login = "Basic " + base64.b64encode(b"alice:secret").decode()
    answers: dict[str, int] = {}

    class Guarded(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            status = 401 if self.headers.get("Authorization") != login else answers.get(path, 200)
            body = b"OK" if path == "/health" else b'{"experiments": []}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers
    server.shutdown()
    server.server_close()


def test_a_server_behind_a_login_is_checked_with_mlflows_credentials(guarded_server, monkeypatch):
    # The check asked /health without the credentials MLflow sends: a server MLflow could use was refused.
    uri, _ = guarded_server
    with pytest.raises(ChromalabError, match="HTTP 401 on /health: it wants credentials: set "
                                             "MLFLOW_TRACKING_USERNAME") as err:
        runs.check_tracking_server(uri)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    runs.check_tracking_server(uri)


@pytest.mark.parametrize(("status", "advice"), [
    (403, r"the account in MLFLOW_TRACKING_USERNAME \(or MLFLOW_TRACKING_TOKEN\) may not do this"),
    (500, "the server failed: see its log")])
def test_a_server_that_refuses_its_api_is_one_line_at_once(guarded_server, monkeypatch, status, advice):
    # Healthy, but refusing what logging needs: MLflow retried a 500 for 4 minutes, then a traceback.
    uri, answers = guarded_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    answers["/api/2.0/mlflow/experiments/search"] = status
    started = time.monotonic()
    with pytest.raises(ChromalabError, match=f"HTTP {status} on /api/2.0/mlflow/experiments/search: {advice}"):
        runs.check_tracking_server(uri)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("failure", ["API request to /api/2.0/mlflow/runs/log-batch failed with exception "
                                     "(Caused by ResponseError('too many 500 error responses'))", 403])
def test_a_bug_while_handling_a_server_failure_keeps_its_traceback(guarded_server, monkeypatch, failure):
    # What an exception was raised while handling was searched too: the bug became the server's one line
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    uri, _ = guarded_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    refused = (MlflowException(failure) if isinstance(failure, str)
               else MlflowException("Permission denied", error_code=PERMISSION_DENIED))
    with pytest.raises(KeyError, match="a bug in the fallback"):
        with runs.server_failures_in_one_line(uri):
            try:
                raise refused
            except MlflowException:
                {}["a bug in the fallback"]


def test_a_server_refusing_to_start_the_run_is_one_line(repo, faulty_proxy, monkeypatch):
    # An account that may read but not write runs: MLflow's traceback, outside the one-line guard.
    uri, faults, _ = faulty_proxy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    faults["/api/2.0/mlflow/runs/create"] = 403
    runs.check_tracking_server()  # it may read
    with pytest.raises(ChromalabError, match=f"MLflow tracking server {uri} answered HTTP 403 mid-stage; .*"
                                             "may not do this") as err:
        with runs.model_run("gan", parse_params({}), dataset_hash="h", stage="train@gan"):
            pass
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("status", [500, 501])  # 501: MLflow does not retry it (a traceback before)
def test_a_server_failing_mid_run_is_one_line_without_retrying_again(repo, faulty_proxy, monkeypatch, status):
    """HTTP 5xx, once MLflow's retries (if any) ran out: one line, and ending the run does not wait them out again
    (the default retries took 4 minutes for each, then a traceback)."""
    uri, faults, refused = faulty_proxy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    with pytest.raises(ChromalabError) as err:
        with runs.model_run("gan", parse_params({}), dataset_hash="h", stage="train@gan"):
            runs.log_epoch({"g_loss": 1.0}, 1)
            faults["/api/2.0/mlflow/runs/log-batch"] = faults["/api/2.0/mlflow/runs/update"] = status
            runs.log_epoch({"g_loss": 0.5}, 2)
    assert str(err.value).startswith(f"MLflow tracking server {uri} answered HTTP {status} mid-stage; what was "
                                     "checkpointed is kept: the server failed: see its log, then re-run to resume")
    assert refused.count("/api/2.0/mlflow/runs/update") == 1  # ending the run: no retry
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # MLflow's own settings as they were


def test_repo_root_leaves_dvc_temp_copies(tmp_path, monkeypatch):
    for name in DVC_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    # `dvc exp run --queue` workers copy the workspace to <root>/.dvc/tmp/exps/celery/<tmpdir>, .dvc included
    root = tmp_path / "repo"
    copy = root / ".dvc" / "tmp" / "exps" / "celery" / "tmpk2j4"
    (copy / ".dvc").mkdir(parents=True)
    (copy / "src").mkdir()
    assert runs.repo_root(copy / "src") == root.resolve()
    plain = tmp_path / "not-a-dvc-repo"
    plain.mkdir()
    monkeypatch.chdir(plain)
    assert runs.repo_root() == plain.resolve()
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert runs.repo_root() == root.resolve()


def test_repo_root_without_dvc_installed_finds_the_folder_holding_dvc(tmp_path, monkeypatch):
    """The GPU machine has no DVC: repo_root must still answer (the first GPU check died on `import dvc`)."""
    for name in DVC_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in [m for m in sys.modules if m == "dvc" or m.startswith("dvc.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BlockDvc(), *sys.meta_path])
    root = tmp_path / "repo"
    (root / ".dvc").mkdir(parents=True)
    (root / "data" / "tfrecords").mkdir(parents=True)
    assert runs.repo_root(root / "data" / "tfrecords") == root.resolve()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert runs.repo_root(plain) == plain.resolve()


class BlockDvc:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dvc":
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


PROBE = """\
import json, os, sys
from pathlib import Path
from chromalab.track.runs import repo_root, tracking_uri
answer = {"cwd": os.getcwd(), "root": str(repo_root()), "uri": tracking_uri(), "exp": os.environ.get("DVC_EXP_NAME")}
os.environ.pop("DVC_ROOT")
answer["root_from_cwd_alone"] = str(repo_root())
Path(sys.argv[1]).write_text(json.dumps(answer))
"""


def test_real_root_inside_dvc_exp_run_temp(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    answer = tmp_path / "answer.json"
    env = {k: v for k, v in os.environ.items() if k not in (*DVC_ENV_VARS, "MLFLOW_TRACKING_URI")}
    env.update(GIT_ENV, HOME=str(tmp_path), DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site"))
    _git(repo, "init", "-q")
    subprocess.run([BIN / "dvc", "init", "-q"], cwd=repo, env=env, check=True)
    (repo / "probe.py").write_text(PROBE)
    (repo / "dvc.yaml").write_text(f"stages:\n  probe:\n    cmd: {sys.executable} probe.py {answer}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "probe stage")

    done = subprocess.run([BIN / "dvc", "exp", "run", "--temp", "-n", "temp-probe"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(answer.read_text())
    real = repo.resolve()
    assert Path(seen["cwd"]).is_relative_to(real / ".dvc" / "tmp" / "exps")  # it did run in a copy
    assert seen["root"] == seen["root_from_cwd_alone"] == str(real)
    assert seen["uri"] == f"sqlite:///{real / 'mlflow.db'}"
    assert seen["exp"] == "temp-probe"


def test_choosing_the_store_does_not_leak_into_the_environment(repo, monkeypatch, tmp_path):
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; ours must not turn into an override."""
    assert "MLFLOW_TRACKING_URI" not in os.environ
    first = runs.use_store()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    other = tmp_path / "other-repo"
    other.mkdir()
    monkeypatch.chdir(other)
    assert runs.use_store() != first


def test_a_run_stopped_by_a_full_disk_that_its_store_shares_ends_with_that_error_alone(repo, capsys):
    """Training on a full disk: the checkpoint's write fails, then so did MLflow recording the run FAILED in a
    store on that disk. MLflow's store logged that with its traceback (over 100 lines before the one-line error),
    and its error replaced the run's, which names the file that filled the disk."""
    import errno
    import sqlite3

    import mlflow

    full = OSError(errno.ENOSPC, "No space left on device", "models/baseline/checkpoint/epoch-00002.weights.h5")
    with pytest.raises(OSError) as raised:
        with runs.model_run("baseline", parse_params({}), dataset_hash="h", stage="train@baseline"):
            locker = sqlite3.connect(repo / "mlflow.db", isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")  # the store takes no write (as on a full disk)
            raise full
    locker.execute("ROLLBACK")
    locker.close()
    assert raised.value is full
    assert capsys.readouterr().err == ""
    assert mlflow.active_run() is None
