"""The `chromalab` command as a user meets it: strict params with one-line errors, and quiet output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chromalab.cli import main
from conftest import TENSORFLOW_NOISE


@pytest.mark.parametrize(("content", "message"), [
    ("base:\n  sed: 3\n", "base.sed: unknown key"),
    ("base:\n  seed: three\n", "base.seed: Input should be a valid integer"),
    ("gan:\n  epochs: 2.5\n", "gan.epochs"),
    ("base:\n  image_size: 100\n", "base.image_size: must be a power of two"),
    ("base:\n  seed: 1\ngan:\n  epochs: [3\n", "not valid YAML at line 5, column 1"),
    ("gan:\n  learning_rate: 9e999\n", "gan.learning_rate: Input should be a finite number"),
    ("colour:\n  on: yes\n", "colour: unknown key"),
    ("data:\n  sha256: abc\n", "data.sha256: 'abc' is not a SHA-256 (64 hex digits)"),
    (None, "not found; check the path"),  # given with --params: not "run from the repository root"
    ("base:\n  seed: 1  # caf\xe9\n".encode("latin-1"), "not UTF-8 text (line 2); save it as UTF-8"),
    ("a folder", "a folder, not a params file"),
])
def test_bad_params_stop_every_stage_with_one_line_and_exit_status_1(tmp_path, capsys, content, message):
    path = tmp_path / "params.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "a folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    for stage in ("split", "tfrecords", "evaluate"):
        with pytest.raises(SystemExit) as exited:
            main([stage, "--params", str(path)])
        assert exited.value.code == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and message in lines[0], captured.err


@pytest.mark.parametrize("value", ["on", "off", "auto"])
def test_switches_take_on_and_off_written_bare_as_dvc_writes_them(tmp_path, value):
    """`dvc exp run -S train.xla=off` writes `xla: off`, which PyYAML (YAML 1.1) reads as False."""
    from chromalab.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  xla: {value}\n  mixed_precision: {value}\n")
    train = load_params(path).train
    assert (train.xla, train.mixed_precision) == (value, value)


@pytest.mark.parametrize(("written", "rate"), [("1e-05", 1e-05), ("2.0e-4", 2e-4), ("1E-3", 1e-3), ("0.0002", 2e-4)])
def test_a_rate_in_e_notation_without_a_dot_is_a_number_as_dvc_writes_it(tmp_path, written, rate):
    """`dvc exp run -S gan.learning_rate=0.00001` writes `1e-05`, which YAML 1.1 (PyYAML) reads as a string."""
    from chromalab.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text(f"gan:\n  learning_rate: {written}\n")
    assert load_params(path).gan.learning_rate == rate


def test_a_command_that_fails_or_is_interrupted_exits_non_zero(monkeypatch, capsys):
    """`chromalab colorize … && next-step` must stop when some photos failed (typer.Exit(1)) or on Ctrl-C."""
    import typer

    from chromalab import cli

    commands = typer.Typer()

    @commands.command()
    def partly_failed():
        raise typer.Exit(1)

    @commands.command()
    def interrupted():
        raise KeyboardInterrupt

    @commands.command()
    def done():
        pass

    monkeypatch.setattr(cli, "app", commands)
    for command, status in (("partly-failed", 1), ("interrupted", 130)):
        with pytest.raises(SystemExit) as exited:
            cli.main([command])
        assert exited.value.code == status, command
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped (SIGINT); re-run to resume where it stopped"
    cli.main(["done"])  # success returns: no SystemExit


def test_a_stopped_bench_promises_no_resume(monkeypatch, capsys):
    """A re-run of bench measures everything again, so its stop line does not say it resumes."""
    import chromalab.bench
    from chromalab import cli, entry

    def stopped(**options):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "_resumes", [True])  # put back after the test: bench clears it for its process
    monkeypatch.setattr(chromalab.bench, "run_bench", stopped)
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "--only", "baseline"])
    assert exited.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped (SIGINT)"


STOPPED_IN_A_DESTRUCTOR = """
import gc, signal
import chromalab.bench
from chromalab import cli
class Plot:  # as a figure's weakref callback, which Python runs during collection, anywhere
    def __del__(self):
        signal.raise_signal(signal.SIGINT)
def bench(**options):
    Plot()
    gc.collect()
    print("went on", flush=True)
chromalab.bench.run_bench = bench
cli.run(["bench", "--only", "baseline"])
"""


def test_a_command_stopped_in_a_destructor_stops_in_one_line():
    """As a stage (test_startup): a Ctrl-C landing in a destructor (evaluate's plots) printed "Exception ignored"
    and a traceback, and `chromalab evaluate` went on and exited 0."""
    done = subprocess.run([sys.executable, "-c", STOPPED_IN_A_DESTRUCTOR], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout == "went on\n"
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "stopped (SIGINT)"


def test_a_command_the_machine_stops_says_what_to_free_in_one_line(monkeypatch, capsys, tmp_path):
    """Out of memory, a full disk, an MLflow store SQLite cannot write (as MLflow wraps it): one line each, what to
    do, exit status 1; any other failure is a bug, with its traceback."""
    import sqlite3

    import typer
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    from chromalab import cli

    store = tmp_path / "mlflow.db"
    sqlite3.connect(store).execute("CREATE TABLE runs (id)").connection.commit()
    commands = typer.Typer()

    @commands.command()
    def memory():
        raise MemoryError

    @commands.command()
    def disk():
        with open("/dev/full", "w") as f:  # every write fails with ENOSPC, as a full disk's
            f.write("a photo")

    @commands.command()
    def store_readonly():
        try:
            sqlite3.connect(f"file:{store}?mode=ro", uri=True).execute("INSERT INTO runs VALUES (1)")
        except sqlite3.Error as exc:
            refused = exc
        # SQLAlchemy's error holds the driver's as `orig`; MLflow's says it in words
        raise MlflowException(f"(sqlite3.OperationalError) {refused}") from OperationalError("INSERT", (1,), refused)

    @commands.command()
    def tensor_memory():
        import tensorflow as tf

        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape [16,512,32,32]")

    @commands.command()
    def bug():
        raise KeyError("a bug of ours")

    monkeypatch.setattr(cli, "app", commands)
    memory = "out of memory: close other programs, or lower a batch size or images.concurrency"
    expected = {"memory": memory, "tensor-memory": memory,
                "disk": "the disk is full: free space there",
                "store-readonly": "the MLflow store cannot be written (OperationalError: attempt to write a readonly "
                                  "database): free space or fix its permissions"}
    for command, start in expected.items():
        with pytest.raises(SystemExit) as exited:
            cli.main([command])
        assert exited.value.code == 1
        assert capsys.readouterr().err == f"error: {start}, then re-run: finished work is kept\n"
    with pytest.raises(KeyError):
        cli.main(["bug"])


def _colorize(folder: Path, *options: str) -> subprocess.Popen:
    """`chromalab colorize` up to its model load, started: Keras, and with it TensorFlow, is imported, then
    the model file that is not a model stops the command with its own one-line error. The cheapest real
    command that brings up TensorFlow."""
    Image.fromarray(np.full((40, 48), 120, np.uint8)).save(folder / "gray.png")
    (folder / "broken.keras").write_text("not a zip archive")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    return subprocess.Popen([sys.executable, "-c", "from chromalab.cli import run; run()", *options, "colorize",
                             "gray.png", "--model", "broken.keras"],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_commands_are_quiet_unless_asked_to_be_verbose(tmp_path):
    ERROR = "error: cannot load model broken.keras: BadZipFile: File is not a zip file"
    # Both at once: each spends its ~10 s importing TensorFlow, on a core of its own where there are two.
    (tmp_path / "quiet").mkdir(), (tmp_path / "verbose").mkdir()
    started = _colorize(tmp_path / "quiet"), _colorize(tmp_path / "verbose", "-v")
    (quiet_out, quiet_err), (_, verbose_err) = (proc.communicate(timeout=300) for proc in started)
    quiet, verbose = started
    # its own progress bar and error line, nothing of TensorFlow's
    lines = [line for line in quiet_err.splitlines() if line.strip()]
    assert quiet.returncode == 1 and lines[-1] == ERROR, quiet_err[-2000:]
    assert all(line.startswith("colorize:") for line in lines[:-1]), quiet_err[-2000:]
    assert quiet_out == ""
    assert verbose.returncode == 1  # the same command, which does import TensorFlow, shows its lines
    if not any(tag in verbose_err for tag in TENSORFLOW_NOISE):
        pytest.skip("this TensorFlow build prints no start-up lines here, so there is nothing to hide")
    assert verbose_err.splitlines()[-1] == ERROR


# A stand-in for TensorFlow's import on a CPU where oneDNN's custom operations are on: absl writes its INFO line
# whatever TF_CPP_MIN_LOG_LEVEL says (the real one does so only on such CPUs, so the test above may skip).
FAKE_TENSORFLOW = r"""
import os, sys
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
os.write(2, b"I0000 00:00:1796109817.490888    7082 port.cc:153] oneDNN custom operations are on.\n")
os.write(2, b"W0000 00:00:1796109817.590888    7082 cpu_feature_guard.cc:227] This TensorFlow binary...\n")
os.write(2, b"E0000 00:00:1796109817.690888    7082 util.cc:131] a real error\n")
print("a Python warning", file=sys.stderr)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_tensorflow_lines_that_ignore_the_log_level_are_hidden_at_import_and_nothing_else(tmp_path, verbose):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    (tmp_path / "tensorflow" / "python.py").write_text("")
    program = ("import sys; from chromalab.quiet import quiet_tensorflow; quiet_tensorflow(sys.argv[1] == 'v'); "
               "print('before', file=sys.stderr); import tensorflow.python; print('after', file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", program, "v" if verbose else "q"], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    lines = done.stderr.splitlines()
    if verbose:
        assert len(lines) == 7 and "port.cc:153] oneDNN" in lines[2], done.stderr
    else:  # its own lines, in order, and TensorFlow's errors
        assert lines == ["before", "E0000 00:00:1796109817.690888    7082 util.cc:131] a real error",
                         "a Python warning", "after"], done.stderr


def test_a_users_own_tensorflow_log_level_is_kept(monkeypatch):
    from chromalab import cli

    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # the import hook quiet mode adds goes with it
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    cli.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    cli.quiet_tensorflow(verbose=True)
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    cli.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"


# A program that prints without flushing, leaves a worker-pool task and an exit handler pending, and holds an
# object that Python's teardown would finalise; then hands over to `chromalab` (the console script, `run`).
EXITING = """
import atexit, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

out = Path(sys.argv[1])

class FinalisedAtTeardown:
    def __del__(self):
        out.joinpath("teardown").write_text("ran")

kept = FinalisedAtTeardown()
print("printed before, unflushed", end="")
atexit.register(lambda: out.joinpath("atexit").write_text("ran"))
pool = ThreadPoolExecutor(1)
pool.submit(lambda: (time.sleep(0.5), out.joinpath("pool").write_text("ran")))
from chromalab.cli import run
run(sys.argv[2:])
"""


def test_no_arguments_show_the_help_and_no_empty_error_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    captured = capsys.readouterr()
    assert exited.value.code == 2 and "Usage: chromalab" in captured.out + captured.err
    assert "error:" not in captured.err


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_an_upload_limit_that_is_no_size_is_refused_before_the_server_starts(capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--max-upload-mb", value])
    (line,) = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and line.startswith("error: Invalid value for '--max-upload-mb': "), line


@pytest.mark.parametrize(("args", "status", "stderr_says"), [
    (["--help"], 0, ""),
    (["no-such-command"], 2, "error: No such command 'no-such-command' (see `chromalab --help`)\n"),
    (["train", "--bogus"], 2, "error: No such option: --bogus (see `chromalab train --help`)\n"),
    (["split", "--params", "missing.yaml"], 1, "error: missing.yaml: "),
])
def test_the_program_exits_with_its_status_after_the_exit_handlers_but_skips_the_teardown(tmp_path, args, status,
                                                                                           stderr_says):
    done = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stderr.startswith(stderr_says) and done.stderr.count("\n") == (1 if status else 0), done.stderr
    assert done.stdout.startswith("printed before, unflushed")
    # What a normal exit does still happens: pending pool work, then the exit handlers...
    assert (tmp_path / "pool").is_file() and (tmp_path / "atexit").is_file()
    # ...but not the seconds of finalising every module (and TensorFlow) after the work is saved.
    assert not (tmp_path / "teardown").exists()
