"""Test-wide settings: offline, quiet, no telemetry, the TensorFlow backend unless a test says otherwise."""

import os
import sys
from pathlib import Path

# The project's own tools (mlflow, dvc, uvicorn) first, as `make test` has them: `mlflow models serve` finds
# uvicorn by PATH, so `.venv/bin/python -m pytest` without an activated venv failed the serve tests.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("MLFLOW_TRACKING_URI", None)


from chromalab.entry import skip_unused_extras  # noqa: E402

skip_unused_extras()  # as every chromalab program does, before any test module imports Keras

# What TensorFlow's C++ side prints as it starts (absl's preamble, the CPU feature guard, oneDNN's notices,
# "oneDNN supports DT_HALF only…" at the first float16 tensor), which chromalab's commands hide (chromalab.quiet).
TENSORFLOW_NOISE = ("absl::InitializeLog", "cpu_feature_guard", "oneDNN", "DT_HALF")

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
    monkeypatch.setattr("chromalab.data.download.DOWNLOAD_BACKOFF_S", 0.01)
    monkeypatch.setattr("chromalab.data.images.BACKOFF_FACTOR_S", 0.01)


# --- a real MLflow tracking server, shared by the tracking and training tests ---
import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

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


# One `mlflow server` for the whole run, however many xdist workers ask for it: each start costs ~10 CPU-s
# (MLflow's imports, twice: the CLI and its uvicorn worker). The first worker to ask starts it and writes
# where it listens into SHARED_DIR; the others read that. The pytest process that made SHARED_DIR (xdist's
# controller, or the only process under -n 0) stops it at the end, after every worker has finished.
SHARED_DIR = "CHROMALAB_TESTS_SHARED_DIR"


def pytest_configure(config):
    if SHARED_DIR not in os.environ:  # the first pytest process: workers inherit its environment
        import tempfile

        os.environ[SHARED_DIR] = tempfile.mkdtemp(prefix="chromalab-tests-")
        config._chromalab_shared_dir = Path(os.environ[SHARED_DIR])


def pytest_unconfigure(config):
    import shutil

    shared = getattr(config, "_chromalab_shared_dir", None)
    if shared is None:
        return
    server = shared / "mlflow-server.json"
    if server.is_file():
        started = json.loads(server.read_text())
        with contextlib.suppress(ProcessLookupError):  # gone already
            stop_process_group(_Started(started["pid"], started["args"]))
    shutil.rmtree(shared, ignore_errors=True)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is our child and has exited
    try:  # a zombie (exited, its parent gone, not yet reaped) has not the state R/S/D/... but Z
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


_STARTED: list[subprocess.Popen] = []


class _Started:
    """A server another process started, as much of a Popen as wait_until_up and stop_process_group use."""

    def __init__(self, pid: int, args: list[str]):
        self.pid, self.args, self.returncode = pid, args, None

    def poll(self):
        if self.returncode is None and not _alive(self.pid):
            self.returncode = "unknown (another test process started it)"
        return self.returncode

    def wait(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.1)
        return self.returncode


@pytest.fixture(scope="session")
def mlflow_server_process(mlflow_db_template):
    """A real `mlflow server` on 127.0.0.1 (light settings, security middleware on), one per test run."""
    from filelock import FileLock

    folder = Path(os.environ[SHARED_DIR]) / "mlflow-server"
    record = folder.parent / "mlflow-server.json"
    with FileLock(f"{record}.lock"):
        if not record.is_file():
            url, proc = launch_mlflow_server(folder, mlflow_db_template)
            _STARTED.append(proc)  # kept: the process that made SHARED_DIR stops it, not this Popen's finaliser
            record.write_text(json.dumps({"url": url, "pid": proc.pid, "args": proc.args}))
    started = json.loads(record.read_text())
    return started["url"], _Started(started["pid"], started["args"]), folder / "server.log"


@pytest.fixture
def faulty_proxy(mlflow_server):
    """The shared server behind a proxy that answers `faults[path]` (an HTTP status, with a text body as MLflow's
    auth app sends) instead of passing the request on; `refused` lists the paths so answered, in order."""
    import threading
    import urllib.error
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    faults: dict[str, int] = {}
    refused: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def _answer(self):
            sent = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            if (status := faults.get(self.path.split("?")[0])) is not None:
                refused.append(self.path.split("?")[0])
                body = b"Permission denied" if status == 403 else b"failed"
            else:
                ask = urllib.request.Request(mlflow_server + self.path, data=sent, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type", "")})
                try:
                    with urllib.request.urlopen(ask, timeout=60) as answer:
                        status, body = answer.status, answer.read()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", faults, refused
    server.shutdown()
    server.server_close()


def launch_mlflow_server(folder: Path, db_template: Path) -> tuple[str, subprocess.Popen]:
    """Start `mlflow server` on a free port of 127.0.0.1 over a copy of the template store in `folder` (logging
    to folder/server.log); its URL and process. Not yet answering: see wait_until_up."""
    import shutil

    folder.mkdir(parents=True)
    shutil.copy(db_template, folder / "mlflow.db")  # its tables made already
    port = _free_port()
    args = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts")]
    with (folder / "server.log").open("wb") as log:
        proc = subprocess.Popen(args, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its workers share its group
    return f"http://127.0.0.1:{port}", proc


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server started with start_new_session=True and its workers; SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group already exited (a failed start)
        return
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
    # One persistent compilation cache for the run's JAX processes: they build the same tiny nets, whose
    # weights' initialisers compile once per shape. A size limit turns on its file lock: processes on both
    # workers read and write it at once.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(Path(os.environ[SHARED_DIR]) / "jax-cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_COMPILATION_CACHE_MAX_SIZE": str(2**30)}
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags, **cache}


# --- xdist: modules start longest first, so that the two workers finish together ----------------------------
# Seconds each module took in a whole run on 2 cores (`--durations`, summed per module), 2026-12-01. Modules of
# ~1 s are left out (0 s). Longest first keeps the tail short: the last modules to start are the small ones;
# a new long module belongs here.
MODULE_SECONDS = {
    "test_pipeline.py": 225, "test_gpu_check.py": 158, "test_training.py": 99, "test_bench.py": 98,
    "test_learning.py": 84, "test_training_backends.py": 82, "test_distributed.py": 68, "test_registry.py": 36,
    "test_tracking.py": 32, "test_evaluate.py": 27, "test_models.py": 27, "test_serve.py": 22, "test_cli.py": 13,
    "test_tfrecords.py": 13, "test_losses.py": 10, "test_colorize.py": 9, "test_startup.py": 8,
    "test_serve_page.py": 8, "test_images.py": 7, "test_optimizers.py": 6, "test_training_input.py": 23,
    "test_progress.py": 12, "test_unreadable.py": 5, "test_layout.py": 2, "test_gan_levers.py": 30,
}


def pytest_collection_modifyitems(items):
    def rank(item) -> float:
        return -MODULE_SECONDS.get(item.path.name, 0)

    items.sort(key=rank)  # stable: the order within a module is kept
