"""Test-wide settings: offline, quiet, no telemetry, the TensorFlow backend unless a test says otherwise."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("MLFLOW_TRACKING_URI", None)


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
