"""Quiet by default: TensorFlow's C++ start-up lines are hidden unless the user asks for them.

TF_CPP_MIN_LOG_LEVEL hides most of them, but not all. On CPUs where oneDNN's custom operations are on (AVX-512
VNNI and newer), TensorFlow logs that notice through absl before absl's logging is initialised, and absl then
writes it to stderr whatever the level, after its own preamble ("WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR"). Those lines come while `tensorflow` is imported, from
C++, so no Python logger sees them: that one import runs with the process's stderr (file descriptor 2)
captured, and what it wrote is passed on less absl's INFO and WARNING lines. Everything else, Python's own
warnings included, is passed on.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import os
import re
import sys
import tempfile

TF_LOG_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# Level 3, not 2: on such CPUs the first float16 tensor (the TFRecords are float16) logs "oneDNN supports DT_HALF
# only on platforms with AVX-512. Falling back to the default Eigen-based implementation" as an ERROR. TensorFlow's
# real errors reach the user as Python exceptions, with their message.
QUIET_TF_LOG_LEVEL = "3"
QUIETED_IMPORTS = ("tensorflow",)

# absl's preamble, its INFO and WARNING lines ("I0000 00:00:1796109817.490888    7082 port.cc:153] ..."), and the
# second line of the CPU feature guard's notice.
START_UP_LINE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ :\]]+:\d+\] "
    r"|To enable the following instructions: .*rebuild TensorFlow"
)


def quiet_tensorflow(verbose: bool = False) -> None:
    """Hide TensorFlow's start-up lines, unless `verbose` or the user has set TF_CPP_MIN_LOG_LEVEL."""
    if verbose or TF_LOG_VARIABLE in os.environ:
        return
    os.environ[TF_LOG_VARIABLE] = QUIET_TF_LOG_LEVEL
    # The Python side (absl warnings routed through the "absl" and "tensorflow" loggers) likewise.
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not any(isinstance(finder, _QuietImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImports())


def is_start_up_line(line: str) -> bool:
    return START_UP_LINE.match(line) is not None


@contextlib.contextmanager
def start_up_lines_hidden():
    """Capture what this process writes to file descriptor 2 (C++ and Python alike) in the block, then write
    it to stderr less TensorFlow's start-up lines."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter (closed by the caller)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = "".join(line for line in text.splitlines(keepends=True) if not is_start_up_line(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietImports(importlib.abc.MetaPathFinder):
    """Runs the import of each QUIETED_IMPORTS module inside `start_up_lines_hidden`."""

    def find_spec(self, name, path=None, target=None):
        if name not in QUIETED_IMPORTS:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:  # the finders that would have found it
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with start_up_lines_hidden():
            self.loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, …: the real loader's
        return getattr(self.loader, name)
