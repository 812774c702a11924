"""How a chromalab process starts and ends. At start it does not import the scikit-learn, JAX and pyplot
integrations of Keras and TensorFlow that it never uses (chromalab.entry.UNUSED_EXTRAS), while everyone else
still gets those modules; stopped (Ctrl-C, SIGTERM, its parent killed) it ends in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# --- how a stage ends when it is stopped -------------------------------------------------------------

STAGE = """
import sys, time
from chromalab.entry import run_stage
def stage():
    print("working", flush=True)
    time.sleep(60)
run_stage(stage)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_stopped_stage_says_so_in_one_line_and_exits_with_the_signals_status(signum):
    stage = subprocess.Popen([sys.executable, "-c", STAGE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert stage.stdout.readline() == "working\n"
    stage.send_signal(signum)
    _, err = stage.communicate(timeout=30)
    assert stage.returncode == 128 + signum
    assert err.strip() == f"stopped ({signal.Signals(signum).name}); re-run to resume where it stopped"


STOPPED_IN_A_DESTRUCTOR = """
import gc, signal
from chromalab.entry import run_stage
class Plot:  # as a figure's weakref callback, which Python runs during collection, anywhere
    def __del__(self):
        signal.raise_signal(signal.{name})
def stage():
    Plot()
    gc.collect()
    print("went on", flush=True)
run_stage(stage)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_stop_raised_in_a_destructor_still_stops_the_stage_in_one_line(signum):
    """Python ignores an exception raised in a destructor: a Ctrl-C landing in one (evaluate's plots, 3 stops in
    30 near its end) printed "Exception ignored" and a traceback, the stage went on and exited 0, and DVC ran the
    rest of the pipeline. The work is done, but a stop is a stop: one line, 128 + the signal."""
    script = STOPPED_IN_A_DESTRUCTOR.format(name=signal.Signals(signum).name)
    stage = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert stage.stdout == "went on\n"
    assert stage.returncode == 128 + signum, stage.stderr
    assert stage.stderr.strip() == f"stopped ({signal.Signals(signum).name}); re-run to resume where it stopped"


EXITING_STAGE = """
import atexit, time
from chromalab.entry import run_stage
def handler():  # as MLflow's, which ends the run at exit
    print("exiting", flush=True)
    time.sleep(3)
    print("handler done", flush=True)
run_stage(lambda: atexit.register(handler))
"""


@pytest.mark.parametrize("n_stops", [1, 2])
def test_a_stop_while_exiting_lets_the_exit_handlers_finish_and_a_second_ends_at_once(n_stops):
    """The work is done, but a stop then is still a stop: one line and 128 + the signal (it was a traceback from
    inside the exit handler, and status 0); a second stop does not wait for the handlers."""
    stage = subprocess.Popen([sys.executable, "-c", EXITING_STAGE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert stage.stdout.readline() == "exiting\n"
    for _ in range(n_stops):
        stage.send_signal(signal.SIGINT)
        time.sleep(0.2)
    out, err = stage.communicate(timeout=30)
    assert stage.returncode == 128 + signal.SIGINT
    assert ("handler done" in out) == (n_stops == 1)
    assert err.strip() == ("stopped (SIGINT); re-run to resume where it stopped" if n_stops == 1 else ""), err


STOPPED_STAGE_EXITING = """
import atexit, time
from chromalab.entry import run_stage
def handler():  # as MLflow's at exit, waiting out its retries on a server that stopped answering
    print("exiting", flush=True)
    time.sleep(30)
def stage():
    atexit.register(handler)
    print("working", flush=True)
    time.sleep(60)
run_stage(stage)
"""


def test_a_second_stop_ends_a_stopped_stage_s_exit_at_once():
    """Ctrl-C stops the work; a second while the exit handlers wait on something ends the process at once, as
    a second stop does anywhere: it was only noted, as if it were the first, and the handlers ran on."""
    stage = subprocess.Popen([sys.executable, "-c", STOPPED_STAGE_EXITING], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert stage.stdout.readline() == "working\n"
    stage.send_signal(signal.SIGINT)
    assert stage.stdout.readline() == "exiting\n"
    stage.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, err = stage.communicate(timeout=60)
    assert time.monotonic() - started < 10
    assert stage.returncode == 128 + signal.SIGINT
    assert err.strip() == "stopped (SIGINT); re-run to resume where it stopped", err


FAILING_STAGE = """
import sys
from chromalab.entry import run_stage
def fill_the_disk():
    with open("/dev/full", "w") as f:  # every write fails with ENOSPC, as a full disk's
        f.write("a checkpoint")
def stage():
    if sys.argv[1] == "disk-full":
        fill_the_disk()
    try:
        fill_the_disk()
    except OSError:  # "bug": a bug in the handler of a full disk's error is still a bug
        raise ValueError("a bug of ours")
run_stage(stage)
"""


def test_a_stage_stopped_by_a_full_disk_says_so_in_one_line_and_a_bug_keeps_its_traceback():
    said = {}
    for case in ("disk-full", "bug"):
        stage = subprocess.run([sys.executable, "-c", FAILING_STAGE, case], capture_output=True, text=True, timeout=60)
        said[case] = (stage.returncode, stage.stderr.strip())
    assert said["disk-full"] == (1, "error: the disk is full: free space there, then re-run: finished work is kept")
    returncode, stderr = said["bug"]
    assert returncode == 1 and "Traceback (most recent call last)" in stderr
    assert stderr.endswith("ValueError: a bug of ours")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_workspace_experiment_killed_says_how_to_leave_the_detached_head_dvc_leaves(tmp_path, signum):
    """Killed otherwise than by Ctrl-C, `dvc exp run` leaves git on the detached HEAD it ran on, and its re-run
    keeps it there. A queued run's copy (DVC_ROOT is the repository, not its folder) detaches nothing, nor does
    one that the queue deleted under the stage as it killed it."""
    copy, deleted = (tmp_path / ".dvc" / "tmp" / "exps" / name for name in ("run1", "run2"))
    copy.mkdir(parents=True)
    deleted.mkdir(parents=True)
    said = {}
    for where in (tmp_path, copy, deleted):
        env = {**os.environ, "DVC_EXP_NAME": "brisk-lynx", "DVC_ROOT": str(tmp_path)}
        stage = subprocess.Popen([sys.executable, "-c", STAGE], cwd=where, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert stage.stdout.readline() == "working\n"
        if where == deleted:
            shutil.rmtree(deleted)
        stage.send_signal(signum)
        said[where] = stage.communicate(timeout=30)[1].strip()
    stopped = f"stopped ({signal.Signals(signum).name}); re-run to resume where it stopped"
    assert said[copy] == said[deleted] == stopped
    assert said[tmp_path] == (stopped if signum == signal.SIGINT else stopped + " (if `dvc exp run` itself was "
                              "killed, git is left on a detached HEAD: `git checkout <branch>` first)")


def test_a_stage_ends_with_the_process_that_started_it_even_one_killed_with_9():
    """DVC killed with -9 passes nothing on: its stage went on training, an orphan beside the re-run's."""
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, "
                               f"'-c', {STAGE!r}])"], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline() == "working\n"  # the stage is running, under the parent
    children = [int(pid) for pid in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    assert children and not any(_alive(pid) for pid in children)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_inside_stops_deferred_a_first_stop_waits_for_a_safe_point_and_a_second_stops_at_once(monkeypatch):
    monkeypatch.setattr(entry, "_stops", [])
    previous = {signum: signal.getsignal(signum) for signum in entry.STOP_SIGNALS}
    entry.handle_stop_signals()
    try:
        with entry.stops_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run: nothing raised
            with pytest.raises(KeyboardInterrupt):
                entry.raise_if_stopped()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
