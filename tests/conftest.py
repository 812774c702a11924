"""Test-wide settings: offline, quiet, no telemetry, the TensorFlow backend unless a test says otherwise."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("MLFLOW_TRACKING_URI", None)
