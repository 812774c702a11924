"""How every chromalab process starts and ends: the `chromalab` command and each DVC stage's entry point.

Start: refuse the imports Keras and TensorFlow make for integrations chromalab never uses, and hide
TensorFlow's start-up lines (chromalab.quiet). End: a user's error is one line on stderr and exit status 1,
Ctrl-C or SIGTERM one line and 128 + the signal's number, and the interpreter's teardown is skipped. A
library user who imports chromalab gets none of this.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from importlib.abc import MetaPathFinder

from chromalab.errors import ChromalabError, error_line, machine_failure
from chromalab.quiet import quiet_tensorflow

# Keras and TensorFlow import scikit-learn, JAX and matplotlib's pyplot whenever they are installed, for
# integrations chromalab never uses (Keras's scikit-learn wrappers, image gallery and Orbax checkpoints, TF
# Lite's JAX converter): seconds of every TensorFlow command's start on 2 cores (docs/speed.md, "Quiet by default").
# Each of those imports is optional (guarded by `except ImportError`), so those integrations are simply off.
# Only these importers are refused: JAX as Keras's backend, MLflow, and chromalab's own plots import them.
UNUSED_EXTRAS = {  # module: the importers refused it
    "sklearn": ("keras.",),
    "matplotlib.pyplot": ("keras.",),
    "jax": ("tensorflow.", "keras.src.callbacks.orbax_checkpoint"),  # not the JAX backend's own import
    # Keras's optional TensorFlow (seeding tf.random, spotting tf.TensorShape when saving), which imports
    # TensorFlow under JAX too, with its threads. The TensorFlow backend imported it already.
    "tensorflow": ("keras.src.utils.module_utils",),
}

# The frames between an import statement and a finder: Python's import machinery, and chromalab.quiet's import
# hook, which asks the finders after it on its importer's behalf.
IMPORT_MACHINERY = ("importlib", "_frozen_importlib", "chromalab.quiet")


class SkipUnusedExtras(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        prefixes = UNUSED_EXTRAS.get(name)
        if prefixes is None:
            return None  # not ours to decide: the next finder looks for it
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(IMPORT_MACHINERY):
            frame = frame.f_back
        importer = "" if frame is None else frame.f_globals.get("__name__", "")
        if importer.startswith(prefixes):
            raise ModuleNotFoundError(f"{name} is not imported for {importer} (chromalab.entry.UNUSED_EXTRAS)",
                                      name=name)
        return None


def skip_unused_extras() -> None:
    """Install the refusals (once); before Keras or TensorFlow is imported, or they have imported it all."""
    if not any(isinstance(finder, SkipUnusedExtras) for finder in sys.meta_path):
        sys.meta_path.insert(0, SkipUnusedExtras())


def start_process(verbose: bool = False) -> None:
    """What a chromalab program does first: the import refusals, and quiet TensorFlow unless `verbose`."""
    skip_unused_extras()
    quiet_tensorflow(verbose)


def run_stage(stage: Callable[[], object]) -> None:
    """A DVC stage's entry point: start the process, run `stage`, end as `chromalab <stage>` would. The stage
    also ends when DVC does: killed with -9, DVC passes nothing on, and its stage went on training as an
    orphan beside the re-run's."""
    parent = os.getppid()
    start_process()
    handle_stop_signals()
    end_with_parent(parent)
    try:
        stage()
        raise_if_stopped()  # one raised where Python ignores it (a destructor): the stage went on, yet was stopped
        code = 0
    except ChromalabError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = report_stop()
    except Exception as exc:
        if (message := machine_failure(exc)) is None:
            raise  # a bug: its traceback
        print(error_line(message), file=sys.stderr)
        code = 1
    exit_without_teardown(code)


def _quiet_about_stops(hook: Callable) -> Callable:
    """`hook`, less the stops raised in a destructor or weakref callback (evaluate's plots), which Python can only
    ignore: each printed "Exception ignored" and a traceback, and the process exited 0; run_stage reports it, and
    the `chromalab` command (raise_if_stop_ignored)."""

    def unraisable(info) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):
            _ignored_stops[0] = True
        else:
            hook(info)

    unraisable.notes_stops = True
    return unraisable


_ignored_stops = [False]  # whether Python ignored a stop (raised in a destructor): the work went on to its end


def raise_if_stop_ignored() -> None:
    """After the work, a stop Python ignored: not any stop noted, since a command may end on one as planned
    (serve)."""
    if _ignored_stops[0]:
        raise KeyboardInterrupt


# --- Ctrl-C and SIGTERM -----------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stops: list[int] = []  # the stop signals received, in order
_deferring = [False]
_resumes = [True]  # whether a re-run of the stopped work goes on where it stopped (the stop line says so)


def handle_stop_signals() -> None:
    """Ctrl-C and SIGTERM (`kill`'s default) both stop the work as a KeyboardInterrupt, which ends an MLflow
    run as KILLED (SIGTERM's default ended the process there and then, leaving the run RUNNING for ever). One
    raised where Python ignores it is noted instead of printed (_quiet_about_stops)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)
    if not getattr(sys.unraisablehook, "notes_stops", False):
        sys.unraisablehook = _quiet_about_stops(sys.unraisablehook)


def _on_stop_signal(signum: int, frame) -> None:
    _stops.append(signum)
    if not (_deferring[0] and len(_stops) == 1):  # a second signal stops at once
        raise KeyboardInterrupt


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Inside, a first stop signal is only noted, and `raise_if_stopped` raises it where stopping is safe:
    raised anywhere, it could land in a destructor (which ignores it: training went on to the end) or in a
    library's thread start (MLflow's image logging: the process hung)."""
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = False


def raise_if_stopped() -> None:
    if _stops:
        raise KeyboardInterrupt


def starts_afresh() -> None:
    """Work a re-run repeats from the start (bench) calls this: its stop line then promises no resume."""
    _resumes[0] = False


def report_stop() -> int:
    """One line for a stopped process; its exit status, 128 + the signal's number, as a shell gives."""
    signum = _stops[-1] if _stops else signal.SIGINT
    detached = ""
    if signum != signal.SIGINT and _in_workspace_experiment():  # DVC puts git's HEAD back on Ctrl-C only
        detached = (" (if `dvc exp run` itself was killed, git is left on a detached HEAD: `git checkout <branch>` "
                    "first)")
    then = "; re-run to resume where it stopped" if _resumes[0] else ""
    print(f"stopped ({signal.Signals(signum).name}){then}{detached}", file=sys.stderr)
    return 128 + signum


def _in_workspace_experiment() -> bool:
    """Under `dvc exp run` in the workspace (DVC sets DVC_ROOT to the repository, not to a queued run's copy,
    which the queue may delete under the stage as it kills it)."""
    root = os.environ.get("DVC_ROOT")
    if not os.environ.get("DVC_EXP_NAME") or root is None:
        return False
    try:
        return Path(root).resolve() == Path.cwd().resolve()
    except OSError:  # the current folder is gone: a queued run's copy
        return False


def end_with_parent(parent: int) -> None:
    """End (SIGTERM) when the process that started this one does, even killed with -9 (Linux's
    PR_SET_PDEATHSIG); at once if it has already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(128 + signal.SIGTERM)


def exit_code(exc: SystemExit) -> int:
    """The status Python gives `sys.exit(code)`; a message is printed, as Python does."""
    code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        return 1
    return code or 0


def exit_without_teardown(code: int = 0) -> None:
    """End the process as CPython's exit does, less the teardown: join non-daemon threads (after their pools'
    shut-down hooks, e.g. MLflow's artifact-logging executors), run the atexit handlers, flush, exit.

    Once TensorFlow is imported, Python's own exit (finalising every module, TensorFlow's C++ destructors)
    takes seconds after the work is done and saved. The exit handlers still run (MLflow, logging, worker
    pools) and threads are joined, as at a normal exit; only the teardown is skipped. An unexpected error
    keeps Python's usual traceback and exit (the caller never gets here).
    """
    import atexit
    import threading

    stops_before = len(_stops)

    def stop_while_exiting(signum: int, frame) -> None:
        # Raised in an exit handler, a stop printed its traceback and the exit went on (status 0). A first one
        # now lets the handlers finish (MLflow ends its run in one); the process's second, counting one that
        # stopped the work before the exit, ends it at once (the handlers may wait minutes on a server).
        _stops.append(signum)
        if len(_stops) > 1:
            os._exit(128 + signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_while_exiting)
    threading._shutdown()
    atexit._run_exitfuncs()
    if len(_stops) > stops_before and code == 0:
        code = report_stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
