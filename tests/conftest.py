"""Test-wide settings: offline, quiet, no telemetry, the TensorFlow backend unless a test says otherwise."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("MLFLOW_TRACKING_URI", None)


import chromalab  # noqa: E402,F401  before any test module imports Keras: it then skips its unused imports

# --- fake Unsplash (tests/fake_unsplash.py) for the download / split / images stages ---
import pytest  # noqa: E402


@pytest.fixture
def fake_unsplash():
    """A running fake Unsplash HTTP server on 127.0.0.1, stopped after the test."""
    from fake_unsplash import FakeUnsplash

    with FakeUnsplash() as server:
        yield server


@pytest.fixture
def fast_backoff(monkeypatch):
    """Millisecond backoff between retries (urllib3 Retry), so retry tests do not sleep for seconds."""
    monkeypatch.setattr("chromalab.download.DOWNLOAD_BACKOFF_S", 0.01)
    monkeypatch.setattr("chromalab.images.BACKOFF_FACTOR_S", 0.01)


# --- a real MLflow tracking server, shared by the tracking and training tests ---
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import requests  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, its tables made once per test session, by whichever xdist worker asks
    first: MLflow's migrations cost ~5 CPU s (and far more wall time on a busy disk) that every fresh store
    would pay again. A fresh store is a copy of it; runs still land in their own store."""
    import shutil

    import mlflow
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's basetemp, which the workers share
    path = root / "mlflow-template.db"
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            folder = root / "mlflow-template-making"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
            os.replace(folder / "mlflow.db", path)
    return path


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory, mlflow_db_template):
    """A real `mlflow server` on 127.0.0.1 (light settings, security middleware on), one per session."""
    import shutil

    folder = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_db_template, folder / "mlflow.db")  # its tables made already
    port = _free_port()
    log_path = folder / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its workers share its group
        )
    yield f"http://127.0.0.1:{port}", proc, log_path
    stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server started with start_new_session=True and its workers; SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until_up(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 90) -> str:
    """`url` once it answers 200; fails with the server's log if it exits or takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not up after {timeout_s:g} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process) -> str:
    """The server's URI once /health answers."""
    uri, proc, log_path = mlflow_server_process
    wait_until_up(f"{uri}/health", proc, log_path)
    return uri


def jax_env() -> dict[str, str]:
    """A subprocess environment for the JAX backend on CPU. XLA's optimisation passes take most of the
    run for these tiny models (one compilation per op and weight shape) and buy nothing here."""
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}


# --- xdist: the longest modules start first, so that the two workers finish together -----------------------
LONGEST_FIRST = ("test_pipeline.py", "test_gpu_check.py", "test_training.py", "test_learning.py",
                 "test_training_backends.py", "test_bench.py", "test_distributed.py")  # ~60-200 s each on 2 cores


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module is kept
