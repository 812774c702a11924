"""What a chromalab process imports at start: not the scikit-learn, JAX and pyplot integrations of Keras and
TensorFlow that it never uses (chromalab.entry.UNUSED_EXTRAS), while everyone else still gets those modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chromalab import entry

# TensorFlow is refused only to Keras's optional loader, for JAX processes (tests/test_distributed.py shows
# they run without it); on the TensorFlow backend it is the backend, imported before that loader asks.
UNUSED = sorted(set(entry.UNUSED_EXTRAS) - {"tensorflow"})


def test_keras_on_tensorflow_starts_without_its_unused_extras():
    script = f"""
import json, sys
import chromalab.entry; chromalab.entry.skip_unused_extras()
import keras, tensorflow as tf
assert keras.backend.backend() == "tensorflow"
dense = keras.layers.Dense(2)
assert dense(keras.ops.ones((1, 3))).shape == (1, 2)
print(json.dumps({{name: name not in sys.modules for name in {UNUSED!r}}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {name: True for name in UNUSED}


def test_importing_chromalab_changes_nothing_global():
    """A library user gets neither the import refusals nor the quiet stderr filter (nor TF_CPP_MIN_LOG_LEVEL):
    only the `chromalab` command and the stages' entry points install them (chromalab.entry)."""
    script = """
import json, os, sys
import chromalab, chromalab.cli, chromalab.config, chromalab.train.models, chromalab.data.tfrecords
print(json.dumps({"finders": [type(f).__module__ for f in sys.meta_path],
                  "tf_log": os.environ.get("TF_CPP_MIN_LOG_LEVEL")}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"KERAS_BACKEND": "tensorflow", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert not [module for module in seen["finders"] if module.startswith("chromalab")]  # Keras adds its own
    assert seen["tf_log"] != "3"  # chromalab.quiet's level (Keras itself sets 1 where unset)


def test_a_chromalab_program_installs_the_refusals_and_the_quiet_filter(monkeypatch):
    from chromalab import quiet

    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delenv(quiet.TF_LOG_VARIABLE, raising=False)
    entry.start_process()
    kinds = [type(finder) for finder in sys.meta_path]
    assert entry.SkipUnusedExtras in kinds and quiet._QuietImports in kinds
    assert os.environ[quiet.TF_LOG_VARIABLE] == quiet.QUIET_TF_LOG_LEVEL


def test_only_the_named_importers_are_refused(tmp_path, monkeypatch):
    (tmp_path / "chromalab_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setitem(entry.UNUSED_EXTRAS, "chromalab_probe", ("keras.", "tensorflow.lite"))
    monkeypatch.delitem(sys.modules, "chromalab_probe", raising=False)

    def import_from(importer: str) -> None:
        exec("import chromalab_probe", {"__name__": importer})

    for refused in ("keras.src.wrappers.fixes", "tensorflow.lite.python.util"):
        with pytest.raises(ModuleNotFoundError, match="chromalab_probe"):
            import_from(refused)
    assert "chromalab_probe" not in sys.modules
    import_from("mlflow.keras")  # any other importer gets it
    assert sys.modules["chromalab_probe"].VALUE == 1
    import_from("keras.src.wrappers.fixes")  # and once imported, so does everyone


def test_the_refusals_hold_behind_the_quiet_import_hook(tmp_path, monkeypatch):
    """chromalab.quiet's hook asks the finders after it on the importer's behalf: Keras under JAX must still be
    refused TensorFlow (~5 CPU-s and its threads) when a command runs quiet."""
    from chromalab import quiet

    (tmp_path / "chromalab_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setitem(entry.UNUSED_EXTRAS, "chromalab_probe", ("keras.",))
    monkeypatch.setattr(quiet, "QUIETED_IMPORTS", ("chromalab_probe",))
    monkeypatch.setattr(sys, "meta_path", [quiet._QuietImports(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "chromalab_probe", raising=False)
    with pytest.raises(ModuleNotFoundError, match="chromalab_probe"):
        exec("import chromalab_probe", {"__name__": "keras.src.utils.module_utils"})
    exec("import chromalab_probe", {"__name__": "mlflow.keras"})
    assert sys.modules["chromalab_probe"].VALUE == 1
