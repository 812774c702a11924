"""MLflow tracking: one experiment ("chromalab"), one run per trained model, resumable after a kill.

The store is `MLFLOW_TRACKING_URI` when set, else `sqlite:///<repo root>/mlflow.db` with artifacts in
`<repo root>/mlruns/chromalab/` (MLflow's own default, `./mlruns` beside the database, made absolute).
The repo root is the *real* one even when DVC runs a stage in a temporary copy of the workspace
(`dvc exp run --temp` / `--queue` work in `<root>/.dvc/tmp/exps/…`): runs and artifacts would otherwise
vanish with the copy.

Training (`chromalab.train.stage`) opens `model_run(...)`, logs per-epoch metrics, sample sheets and the final
model; evaluation later logs its test metrics into the same run by id.
MLflow's HTTP client retries for minutes by default (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`,
`MLFLOW_HTTP_REQUEST_TIMEOUT`); `check_tracking_server` therefore asks the server directly, once, with a
short timeout, and leaves those settings to the user for the run itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

from chromalab.config import Params, flatten
from chromalab.errors import ChromalabError, causes, machine_failure, one_line

if TYPE_CHECKING:
    import keras
    import mlflow
    import numpy as np
    from mlflow.models.model import ModelInfo

EXPERIMENT = "chromalab"
HEALTH_TIMEOUT_S = 5.0
STORE_OPEN_WAIT_S = 300.0  # for another process making a new store's tables (~5 CPU s; far longer on a busy disk)
MLFLOW_RETRIES_VAR = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
# Params every model's run depends on (the data pipeline and the shared training settings); the run also
# gets its own model's group. The other model's group and `evaluate` are left out: they don't shape this run.
SHARED_PARAM_GROUPS = ("base", "data", "split", "images", "tfrecords", "train")
# DVC runs `dvc exp run --temp` / `--queue` stages in `<root>/.dvc/tmp/exps/<queue>/<tmpdir>`.
_DVC_TEMP_COPY_PARTS = (".dvc", "tmp", "exps")

# Tag names: MLflow's own for git (the UI shows them), plain names for the rest.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "mlflow.source.git.dirty"
TAG_DVC_EXP_NAME = "dvc.exp_name"
TAG_DVC_BASELINE_REV = "dvc.baseline_rev"
TAG_DVC_REV = "dvc.rev"  # where `dvc get <repo> data/tfrecords --rev <it>` fetches this run's data (README)
# MLflow 3 records an experiment's kind in this tag (its UI sets it too); ours holds model training runs.
# MLflow 3.17's UI opens experiments by its own GenAI | Model training switch instead (see README).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def repo_root(start: Path | None = None) -> Path:
    """The real DVC repository root: `start` (or `$DVC_ROOT`, or the cwd), leaving any DVC temp copy.

    DVC sets `DVC_ROOT` for every stage (for experiment runs, to the parent repo, not the temp copy); the
    path test below also covers a stage run by hand inside a copy. Outside any DVC repo: the folder itself.
    """
    begin = Path(start or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    root = _dvc_root(begin) or begin
    return temp_copy_origin(root) or root


def temp_copy_origin(path: Path) -> Path | None:
    """The repository whose DVC temporary copy (under its .dvc/tmp/exps) holds `path`; None outside any copy."""
    parts = path.parts
    n = len(_DVC_TEMP_COPY_PARTS)
    for i in range(len(parts) - n + 1):
        if parts[i : i + n] == _DVC_TEMP_COPY_PARTS:
            return Path(*parts[:i])
    return None


def _dvc_root(begin: Path) -> Path | None:
    """DVC's own answer where DVC is installed; on a machine without it (the GPU check's), the nearest
    folder holding `.dvc/`, which is what DVC looks for."""
    try:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo
    except ImportError:
        return next((folder for folder in (begin, *begin.parents) if (folder / ".dvc").is_dir()), None)
    try:
        return Path(Repo.find_root(os.fspath(begin)))
    except NotDvcRepoError:
        return None


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set (a relative store: see _out_of_temp_copy), else an absolute SQLite store at
    the real repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return _out_of_temp_copy(uri) if uri else _default_store()


def _default_store() -> str:
    """Where runs go when MLFLOW_TRACKING_URI is unset: SQLite at the real repository's root."""
    return f"sqlite:///{(repo_root() / 'mlflow.db').as_posix()}"


def _out_of_temp_copy(uri: str) -> str:
    """`uri`, but a relative store on this machine (`sqlite:///mlflow.db`, as `mlflow ui` is given it) inside a
    DVC temporary copy made absolute in the same folder of the real repository: MLflow takes it relative to the
    current folder, and the copy's database would vanish with it, leaving the runs' artifacts orphaned."""
    store = _local_store(uri)
    here = Path.cwd().resolve()
    copy = None if store is None or store.is_absolute() else _dvc_root(here)
    if copy is None or copy == repo_root(here):
        return uri
    path = (repo_root(here) / here.relative_to(copy) / store).as_posix()
    return f"sqlite:///{path}" if uri.startswith("sqlite:") else path


def use_store() -> str:
    """Point MLflow's fluent API at `tracking_uri()` and return it.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which would turn our own choice into a
    user override for every later run in this process and its children: put the variable back.
    """
    import mlflow

    # MLflow's SQL store logs each database error with its traceback (dozens of lines) before raising it; a full
    # disk's is then said in one line (errors.machine_failure), any other error raised with its traceback
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    uri = tracking_uri()
    with store_override():
        mlflow.set_tracking_uri(uri)
    return uri


@contextmanager
def store_override(uri: str | None = None) -> Iterator[None]:
    """Inside the block MLFLOW_TRACKING_URI is `uri` (if given); afterwards it is what it was before."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is not None:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _served(uri: str) -> bool:
    """Whether `uri` is a tracking server; plain `databricks`, with no scheme, is one, not a relative path."""
    return _over_http(uri) or uri.startswith("databricks")


def _over_http(uri: str) -> bool:
    """Whether `uri` is a tracking server over HTTP(S), which chromalab can ask directly."""
    return uri.startswith(("http://", "https://"))


def _local_store(uri: str) -> Path | None:
    """Where a store on this machine lives: a SQLite database's file, or an MLflow file store's folder (a file:
    URI or a plain path: the GPU check's, where MLflow has no database); None for any other store."""
    if _served(uri):
        return None
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(url2pathname(urlsplit(uri).path))
    return None if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri) else Path(uri)


def _is_local_database(uri: str) -> bool:
    # MLflow's database stores (sqlite, postgresql, mysql, mssql) put artifacts on a local path by default.
    from mlflow.store.db.db_types import DATABASE_ENGINES

    return uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_ENGINES


def _unreachable(uri: str) -> bool:
    """Whether `uri` is a tracking server that no longer answers its health check."""
    try:
        check_tracking_server(uri)
    except ChromalabError:
        return _over_http(uri)
    return False


def check_tracking_server(uri: str | None = None, *, reading: bool = False) -> None:
    """Fail fast, in one line, when the tracking store can't be used: before any training time is spent.
    `reading` (a model to load from it): a local store must exist, as opening one makes it."""
    uri = uri or tracking_uri()
    served = _served(uri)
    folder = _local_store(uri)
    if folder is None and not (served or _is_local_database(uri)):
        raise ChromalabError(f"MLFLOW_TRACKING_URI {uri}: not a tracking store chromalab can use (a server, "
                             "http(s)://host:port, or a database, sqlite:///path/to/mlflow.db); fix it, or unset it "
                             "to log to the local mlflow.db")
    if folder is not None and not folder.parent.is_dir():
        raise ChromalabError(f"MLflow store {uri}: folder {folder.parent} does not exist; create it or fix "
                             "MLFLOW_TRACKING_URI")
    if reading and folder is not None and not folder.exists():
        raise ChromalabError(f"no MLflow store at {folder}: run this in the repository whose training logged the "
                             "model (its mlflow.db), or set MLFLOW_TRACKING_URI to where it was logged")
    if _over_http(uri):
        _check_server(uri)
    elif not served:
        _open_store(uri)


def _open_store(uri: str) -> None:
    """Open the store on this machine as logging will (MLflow keeps it open for the process): one MLflow cannot
    open (a malformed sqlite URI, a database driver not installed, a file store, which MLflow 3 refuses unless
    MLFLOW_ALLOW_FILE_STORE=true) is one line now, not a traceback once training has started."""
    import mlflow

    from chromalab.files import held_exclusively

    database = _local_store(uri) if uri.startswith("sqlite:") else None
    # MLflow makes a new database's tables unguarded: two stages doing it at once (`dvc queue start -j 2`) fail one
    turns = held_exclusively(database.parent, STORE_OPEN_WAIT_S) if database else nullcontext()
    try:
        with turns:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 — whatever the store's library raises, it can't be used as it is
        if machine_failure(exc) is not None:  # a full disk, a store it may not write: the entry point's line
            raise
        reason = one_line(exc).split(". ")[0]  # MLflow's refusal of a file store runs to a paragraph
        if "out-of-date database schema" in reason:  # made by an older MLflow: its runs are to be kept
            action = f"back it up, then upgrade it (`mlflow db upgrade {uri}`)"
        elif not os.environ.get("MLFLOW_TRACKING_URI") and uri == _default_store():  # no URI to fix: the file is
            action = f"move {_local_store(uri)} aside (MLflow makes a new one there), then re-run"
        else:
            action = ("fix MLFLOW_TRACKING_URI (a database: sqlite:///path/to/mlflow.db), or unset it to log to the "
                      "local mlflow.db")
        raise ChromalabError(f"MLflow cannot open the store {uri} ({reason}): {action}") from None


# What the server asks of the user, by the HTTP status it refused a request with (others: see server_advice).
_REFUSAL_ADVICE = {
    401: "it wants credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    403: "the account in MLFLOW_TRACKING_USERNAME (or MLFLOW_TRACKING_TOKEN) may not do this: ask the server's admin "
         "for access, or use another account",
}
# Asked after /health: an API call needs what logging will need (credentials), which /health often does not.
_API_PROBE = ("/api/2.0/mlflow/experiments/search", {"max_results": 1})


def server_advice(status: int) -> str:
    """What to do about a tracking server answering HTTP `status`."""
    if status in _REFUSAL_ADVICE:
        return _REFUSAL_ADVICE[status]
    if status >= 500:
        return "the server failed: see its log"
    return "check the URI in MLFLOW_TRACKING_URI and that the server is running"


def _check_server(uri: str) -> None:
    """The server answers its health check and an API call, each once, within HEALTH_TIMEOUT_S, asked as MLflow
    asks it (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, MLFLOW_TRACKING_INSECURE_TLS, …_SERVER_CERT_PATH): a
    plain request would be refused by a server that MLflow itself can use."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    for endpoint, query in (("/health", None), _API_PROBE):
        try:
            answer = http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0,
                                  timeout=HEALTH_TIMEOUT_S, raise_on_status=False, params=query)
        except MlflowException as exc:  # raised from (or while handling) requests' own error: name that one
            error = exc.__cause__ or exc.__context__ or exc
            raise ChromalabError(f"MLflow tracking server {uri} is unreachable ({type(error).__name__}): "
                                 f"{_unreachable_advice(error)} or unset MLFLOW_TRACKING_URI to log to the local "
                                 "mlflow.db") from None
        if answer.status_code != 200:
            raise ChromalabError(f"MLflow tracking server {uri} answered HTTP {answer.status_code} on {endpoint}: "
                                 f"{server_advice(answer.status_code)}")


def _unreachable_advice(error: BaseException) -> str:
    """What to do about the error a request to the tracking server failed with."""
    if "Read timed out" in str(error):  # it took the connection but did not answer: up, yet stuck or overloaded
        return f"it did not answer within {HEALTH_TIMEOUT_S:g} s: see whether it is stuck or overloaded, restart it"
    if type(error).__name__ != "SSLError":
        return "start it (`mlflow server`)"
    # the answer was no TLS: a plain HTTP server asked over https:// (OpenSSL 3.2 and later name it "record layer
    # failure", earlier ones WRONG_VERSION_NUMBER)
    if any(reason in str(error) for reason in ("WRONG_VERSION_NUMBER", "record layer failure")):
        return "it answers plain HTTP: use http:// in MLFLOW_TRACKING_URI"
    return ("set MLFLOW_TRACKING_SERVER_CERT_PATH to the CA bundle that signed its certificate (or "
            "MLFLOW_TRACKING_INSECURE_TLS=true)")


def _git_state(path: Path) -> dict[str, str]:
    """HEAD commit and whether tracked files differ from it (untracked files don't count, as in MLflow)."""
    try:
        import git
    except ImportError:  # GitPython (an MLflow dependency) finds no git executable
        return {}
    try:
        repo = git.Repo(path, search_parent_directories=True)
        return {TAG_GIT_COMMIT: repo.head.commit.hexsha,
                TAG_GIT_DIRTY: str(repo.is_dirty(untracked_files=False)).lower()}
    except (git.GitError, ValueError):  # not a repository, or no commit yet
        return {}


def _device_name() -> str:
    from chromalab.devices import gpu_names

    return ", ".join(gpu_names()) or "CPU"


def _framework_versions() -> dict[str, str]:
    import keras

    versions = {"keras.version": keras.__version__, "keras.backend": keras.backend.backend()}
    if versions["keras.backend"] == "tensorflow":  # JAX runs without TensorFlow: don't import it there
        import tensorflow as tf

        versions["tensorflow.version"] = tf.__version__
    if versions["keras.backend"] == "jax":
        import jax

        versions["jax.version"] = jax.__version__
    return versions


def run_identity() -> dict[str, str]:
    """Tags that say what produced a run: git commit and dirty flag, DVC experiment, device, versions.

    Outside `dvc exp run` the experiment name is "workspace" and its baseline is the git commit. `dvc.rev` is
    the experiment's own git ref, where `dvc exp run` commits its dvc.lock (its name alone may be reused on
    another baseline); outside it, the commit the run started from.
    """
    identity = _git_state(Path.cwd())
    name, baseline = os.environ.get("DVC_EXP_NAME"), os.environ.get("DVC_EXP_BASELINE_REV")
    identity[TAG_DVC_EXP_NAME] = name or "workspace"
    if name and baseline:
        identity[TAG_DVC_REV] = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
    baseline = baseline or identity.get(TAG_GIT_COMMIT)
    if baseline:
        identity[TAG_DVC_BASELINE_REV] = baseline
        identity.setdefault(TAG_DVC_REV, baseline)
    identity["device"] = _device_name()
    identity.update(_framework_versions())
    return identity


def run_params(params: Params, model_name: str) -> dict[str, object]:
    """The flattened params a model's run depends on: the shared groups and its own model group."""
    params.model(model_name)  # unknown model name → ParamsError
    groups = (*SHARED_PARAM_GROUPS, model_name)
    return {key: value for key, value in flatten(params).items() if key.split(".", 1)[0] in groups}


def _experiment_id(client: mlflow.MlflowClient, uri: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        # MLflow would put a database store's artifacts in `./mlruns` of the *current* folder, i.e. in
        # DVC's temporary copy, deleted after the stage: pin them to the real root.
        location = (repo_root() / "mlruns" / EXPERIMENT).as_uri() if _is_local_database(uri) else None
        try:
            return client.create_experiment(EXPERIMENT, artifact_location=location,
                                            tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException as exc:  # another stage created it meanwhile (parallel queue workers)
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment.lifecycle_stage == "deleted":
        raise ChromalabError(
            f"MLflow experiment {EXPERIMENT!r} is deleted in {uri}: restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or purge it (`mlflow gc`)"
        )
    if TAG_EXPERIMENT_KIND not in experiment.tags:  # left alone once set, by us or in the UI
        client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return experiment.experiment_id


def end_abandoned_run(run_id: str) -> None:
    """A killed run whose checkpoint is given up (params, data or code changed) ends KILLED: nothing will
    resume it, and RUNNING it would stay for ever beside the new run of the same name."""
    import mlflow

    client = mlflow.MlflowClient(use_store())
    if run_in_store(client, run_id) and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED")


def run_in_store(client: mlflow.MlflowClient, run_id: str) -> bool:
    """Whether this store holds `run_id`, not deleted."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as exc:  # not in this store (another database, or removed by `mlflow gc`)
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return False


@contextmanager
def model_run(model_name: str, params: Params, *, dataset_hash: str, stage: str, run_id: str | None = None,
              on_new_run: Callable[[str], None] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the model's MLflow run, resuming `run_id` when the store still has it.

    A new run is named `<DVC_EXP_NAME or "workspace">-<model>`, and `on_new_run` gets its id before anything
    is logged (where a kill would leave it for the re-run to resume); params and identity tags are (re)logged
    either way. Leaving the block ends the run: FINISHED, FAILED on an error, KILLED on Ctrl-C.
    """
    import mlflow

    uri = use_store()
    with server_failures_in_one_line(uri) as server_failed:  # from the first request: a 403 may refuse any
        client = mlflow.MlflowClient(uri)
        experiment_id = _experiment_id(client, uri)
        if run_id and not run_in_store(client, run_id):
            print(f"MLflow run {run_id} (from the checkpoint) is not in {uri} or was deleted; starting a new run",
                  file=sys.stderr)
            run_id = None
        tags = {**run_identity(), "model": model_name, "stage": stage, "dataset_hash": dataset_hash}
        if run_id:
            run = mlflow.start_run(run_id=run_id)
        else:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{tags[TAG_DVC_EXP_NAME]}-{model_name}")
        with run:
            try:
                if not run_id and on_new_run is not None:
                    on_new_run(run.info.run_id)
                mlflow.set_tags(tags)
                mlflow.log_params(_params_to_log(client, run_id, run_params(params, model_name)))
                yield run
            except KeyboardInterrupt:  # MLflow would record a stopped run as FAILED
                _end_run_quietly("KILLED")
                raise
            except Exception as exc:
                server_failed(exc)  # before the run is ended: that must not wait out MLflow's retries again
                # here, not in MLflow's exit: a store on the disk that filled fails to record it too, and that
                # error replaced the run's own, which says what filled
                _end_run_quietly("FAILED")
                raise


def _end_run_quietly(status: str) -> None:
    """End the active run `status` (KILLED, FAILED). Where the store cannot take it (another process holds
    mlflow.db locked, its disk is full), a stop says so in one line and goes on, and a failure's own error follows
    alone; either way the run shows RUNNING until the stage is re-run, which resumes it."""
    import mlflow

    try:
        mlflow.end_run(status)
    except Exception as exc:  # noqa: BLE001 — any store error: the stop, or the run's own error, goes on
        if status == "KILLED":
            print(f"MLflow could not record the stopped run as KILLED ({one_line(exc)[:160]}); it shows RUNNING "
                  "until this stage is re-run, which resumes it", file=sys.stderr)


@contextmanager
def server_failures_in_one_line(uri: str, kept: str = "what was checkpointed is kept",
                                rerun: str = "re-run to resume") -> Iterator:
    """A tracking server that stops answering mid-stage, or refuses a request (HTTP 401, 403, or a 5xx once
    MLflow's retries ran out), ends the stage in one line, not MLflow's chained tracebacks: what failed, what is
    `kept`, what to do, then `rerun`. Inside, `server_failed(exc)` says whether it has; if so it also turns
    MLflow's retries off, so that ending a run does not wait them out (minutes) a second time."""
    retries, failure = os.environ.get(MLFLOW_RETRIES_VAR), []

    def server_failed(exc: BaseException) -> bool:
        if not failure and _over_http(uri):
            status = _refused_status(exc)
            if status is not None:
                failure.append((f"answered HTTP {status} mid-stage", server_advice(status)))
            elif _unreachable(uri):
                failure.append((f"stopped answering mid-stage ({type(exc).__name__})", "start the server again"))
            if failure:
                os.environ[MLFLOW_RETRIES_VAR] = "0"
        return bool(failure)

    try:
        yield server_failed
    except ChromalabError:
        raise
    except Exception as exc:
        if not server_failed(exc):
            raise
        what, action = failure[0]
        raise ChromalabError(f"MLflow tracking server {uri} {what}; {kept}: {action}, then {rerun}") from None
    finally:
        if retries is None:
            os.environ.pop(MLFLOW_RETRIES_VAR, None)
        else:
            os.environ[MLFLOW_RETRIES_VAR] = retries


def _refused_status(exc: BaseException) -> int | None:
    """The HTTP status a tracking server refused a request with, as MLflow raised it: 401 or 403 (MLflow's error
    code for it), a 429 or 5xx once its retries ran out (urllib3: "too many 500 error responses", which MLflow's
    message quotes), or a 5xx it does not retry (its body text or MLflow's JSON); None for any other failure, a bug
    raised while handling one included."""
    from mlflow.exceptions import MlflowException, RestException

    for cause in causes(exc):
        if found := re.search(r"too many (\d{3}) error responses|failed with error code (5\d\d) ", str(cause)):
            return int(found.group(1) or found.group(2))  # the latter: a 5xx MLflow does not retry (501, 507)
        # the same with a JSON body (MLflow's own NOT_IMPLEMENTED is a 501): only an answer is a RestException,
        # while a plain MlflowException's default code maps to 500 too
        if isinstance(cause, RestException) and cause.get_http_status_code() >= 500:
            return cause.get_http_status_code()
        if isinstance(cause, MlflowException) and cause.get_http_status_code() in _REFUSAL_ADVICE:
            return cause.get_http_status_code()
    return None


def _params_to_log(client, run_id: str | None, params: dict[str, object]) -> dict[str, object]:
    """The params a resumed run does not have yet. MLflow refuses to change a logged value; one that differs
    is of a group the checkpoint's fingerprint leaves out (e.g. images.concurrency), which does not change
    what trains, so the run keeps its first value and says so."""
    if not run_id:
        return params
    logged = client.get_run(run_id).data.params
    changed = sorted(key for key, value in params.items() if key in logged and logged[key] != str(value))
    if changed:
        print(f"MLflow run {run_id} keeps its first values of {', '.join(changed)} (they do not change what "
              "trains)", file=sys.stderr)
    return {key: value for key, value in params.items() if key not in logged}


def logged_model(name: str):
    """The active run's model logged as `name`, whole (READY), or None: what a run that finishes again after a
    kill logged already."""
    from mlflow.entities import LoggedModelStatus

    ready = [model for model in _run_models(name) if model.status == LoggedModelStatus.READY]
    return ready[-1] if ready else None


def discard_unfinished_models(name: str) -> None:
    """Delete the active run's models logged as `name` that never became whole (PENDING, or FAILED: a kill in
    the middle of their upload), so that a run finishing again after a kill lists one model per name."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    for model in _run_models(name):
        if model.status != LoggedModelStatus.READY:
            mlflow.MlflowClient().delete_logged_model(model.model_id)
            _remove_local_artifacts(model.artifact_location)


def _remove_local_artifacts(location: str) -> None:
    """A deleted model's files, where they are on this machine: MLflow leaves them (a full disk that stopped
    the upload stays full of the part it wrote). Elsewhere (a tracking server's store), `mlflow gc` removes them."""
    import shutil

    if (folder := _local_store(location)) is not None:  # a file: URI or a plain path
        shutil.rmtree(folder, ignore_errors=True)


def _run_models(name: str) -> list:
    """The active run's logged models named `name`, in any state."""
    import mlflow

    require_active_run()
    run = mlflow.active_run()
    return mlflow.MlflowClient().search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'")


def require_active_run():
    """The active MLflow run: mlflow.log_* without one would silently open a stray run in the Default experiment."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("chromalab.track.runs: log inside `with model_run(...)`")
    return run


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """Per-epoch metrics at step `epoch` (1-based: the number of epochs done)."""
    import mlflow

    require_active_run()
    mlflow.log_metrics(metrics, step=epoch)


def log_new_metrics(metrics: dict[str, float], step: int = 0, run_id: str | None = None) -> None:
    """Log `metrics` to run `run_id` (default: the active run), less those whose latest value there is this one
    already: what the same run finishing again after a kill, or an evaluation re-run, logged before (a second
    point would show). A run named by id is written without being reopened, so its status stays as it is."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    run_id = run_id or require_active_run().info.run_id
    latest = client.get_run(run_id).data.metrics
    now_ms = int(time.time() * 1000)
    fresh = [Metric(key, value, now_ms, step) for key, value in metrics.items() if latest.get(key) != value]
    if fresh:
        client.log_batch(run_id, metrics=fresh)


def log_exported_checkpoint(best_epoch: int, best_val_delta_e00: float, exported: str) -> None:
    """Which epoch's weights the run exported and why: the metrics best_epoch and best_val_delta_e00, and the
    tag `exported` (e.g. "best validation ΔE00 (epoch 40)"), as train_metrics.json says it."""
    import mlflow

    require_active_run()
    log_new_metrics({"best_epoch": best_epoch, "best_val_delta_e00": best_val_delta_e00})
    mlflow.set_tag("exported", exported)


def log_sample_sheet(image: np.ndarray, epoch: int, key: str = "samples") -> None:
    """A stepped image series (MLflow stores `images/<key>+step+<epoch>+….png` and a webp thumbnail)."""
    import mlflow

    require_active_run()
    mlflow.log_image(image, key=key, step=epoch)


def sample_sheet_steps(run_id: str, key: str = "samples") -> set[int]:
    """The epochs of the sample sheets `run_id` holds (what log_sample_sheet stored)."""
    import mlflow

    marker = f"{key}+step+"
    return {int(a.path.split(marker)[1].split("+")[0])
            for a in mlflow.MlflowClient().list_artifacts(run_id, "images") if marker in a.path}


def log_keras_model(model: keras.Model, input_example: np.ndarray, name: str = "model") -> ModelInfo:
    """Log the model with a signature inferred from one input batch; loadable by `mlflow.keras.load_model`.

    The example itself is not stored: it is a dataset photo, and the model package may be shared.
    """
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    discard_unfinished_models(name)
    inputs = np.asarray(input_example, dtype=np.float32)
    outputs = np.asarray(model.predict(inputs, verbose=0), dtype=np.float32)  # float32 under mixed precision too
    return mlflow.keras.log_model(model, name=name, signature=infer_signature(inputs, outputs),
                                  pip_requirements=model_requirements())


def model_requirements() -> list[str]:
    """What loading the model needs: Keras and its backend, pinned as installed.

    Stated rather than inferred: MLflow's inference reloads the model in a subprocess, seconds per model.
    """
    import keras
    from importlib.metadata import PackageNotFoundError, version

    packages = ["keras"] + (["jax"] if keras.backend.backend() == "jax"
                            else ["tensorflow", "tensorflow-cpu", "tensorflow-gpu"])
    pinned = []
    for package in packages:
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pinned


def training_run_id(reports_root: Path, model_name: str) -> str | None:
    """The MLflow run that trained `model_name`, as reports/<model>/train_metrics.json records it."""
    train_metrics = Path(reports_root) / model_name / "train_metrics.json"
    return json.loads(train_metrics.read_text()).get("mlflow_run_id") if train_metrics.is_file() else None
