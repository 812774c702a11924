"""Atomic output (chromalab.files): what a killed write leaves is cleared by the next run, and nothing else is."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from chromalab.files import atomic_file, clear_stale_temps
from repo import git_ignored

KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from chromalab.files import atomic_file, atomic_path
folder = Path(sys.argv[1])
if sys.argv[2] == "file":
    with atomic_file(folder / "photo_color.jpg") as f:
        f.write(b"half a ph")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
with atomic_path(folder / "model.keras") as tmp:  # a library writing by name (Keras' save)
    tmp.write_bytes(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_write_killed_midway_leaves_the_old_file_and_a_temp_file_the_next_run_clears(tmp_path):
    target = tmp_path / "photo_color.jpg"
    target.write_bytes(b"the previous, whole photo")
    for kind in ("file", "path"):
        killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_MID_WRITE), str(tmp_path), kind])
        assert killed.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"the previous, whole photo"
    left = sorted(p.name for p in tmp_path.iterdir() if p != target)
    assert len(left) == 2 and not (tmp_path / "model.keras").exists(), left
    theirs = [".notes.txt.0123abcd.tmp", ".hidden", "a.0123abcd.tmp"]
    for name in theirs:
        (tmp_path / name).write_text("not a temp file of these targets")

    clear_stale_temps(tmp_path, ["photo_color.jpg", "model.keras"])  # only these targets' temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["photo_color.jpg", *theirs])
    clear_stale_temps(tmp_path)  # a folder only chromalab writes: every temp file of its writes
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "a.0123abcd.tmp", "photo_color.jpg"]
    clear_stale_temps(tmp_path / "absent")  # nothing to clear is fine


def test_a_write_another_run_is_still_making_is_not_cleared_as_stale(tmp_path):
    """Two `colorize` into one folder: the second's start-up clearing must not delete the first's temp file
    under it (whose rename then failed), while one a killed run left is still cleared."""
    left = tmp_path / ".photo_color.jpg.0123abcd.tmp"
    left.write_bytes(b"what a killed run left")
    with atomic_file(tmp_path / "photo_color.jpg") as f:
        f.write(b"half")
        clear_stale_temps(tmp_path, ["photo_color.jpg"])  # another run, starting meanwhile
        f.write(b" and the rest")
    assert (tmp_path / "photo_color.jpg").read_bytes() == b"half and the rest"
    assert [p.name for p in tmp_path.iterdir()] == ["photo_color.jpg"]


def test_a_file_system_without_locks_still_takes_atomic_writes(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with atomic_file(tmp_path / "metrics.json", text=True) as f:
        f.write("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_completed_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_file(target, text=True) as f:
        f.write("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_name_near_the_file_systems_limit_is_written_and_its_temp_files_cleared(tmp_path):
    """The temp name adds 14 bytes: a legal 250-byte output name failed for its temp file's sake."""
    from chromalab.files import atomic_path

    long_names = ["é" * 120 + "_color.jpg", "a" * 244 + ".keras"]  # 250 bytes each in UTF-8
    for name in long_names:
        assert len(name.encode()) == 250
    with atomic_file(tmp_path / long_names[0]) as f:
        f.write(b"photo")
    with atomic_path(tmp_path / long_names[1]) as tmp:
        assert tmp.name.endswith(".keras")  # libraries writing by name check the suffix
        tmp.write_bytes(b"model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(long_names)
    # what a write killed midway leaves: its temp file, which the next run clears by the target's name
    from chromalab import files

    stale = [files._temp_sibling(tmp_path / long_names[0]),
             tmp_path / f".1234abcd.tmp.{files._fitted(long_names[1], keep_end=True)}"]
    for path in stale:
        path.write_bytes(b"half")
    clear_stale_temps(tmp_path, long_names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(long_names)


def test_what_a_killed_write_leaves_in_the_repository_is_git_ignored(tmp_path):
    """A kill mid-write leaves a temp file (or staged folder) until the next run: it may hold photos (Unsplash's
    licence) and must not be swept into a `git add -A`, though DVC's own .gitignore files name only the outputs."""
    from chromalab.files import atomic_path, staged_dir

    with atomic_path(tmp_path / "model.keras") as by_name, staged_dir(tmp_path / "tfrecords") as folder:
        left = {"models/gan": by_name.name, "data": folder.name}
        by_name.write_bytes(b"model")
    with atomic_file(tmp_path / "worst.png") as f:
        left["reports/evaluate"] = next(p.name for p in tmp_path.iterdir() if p.name.startswith(".worst.png"))
        f.write(b"png")
    for where, name in left.items():
        assert git_ignored(f"{where}/{name}"), f"{where}/{name} is not git-ignored"


def test_a_stop_while_a_staged_folder_replaces_the_old_one_leaves_one_of_them(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (as chromalab.entry handles them: a KeyboardInterrupt) right after the old folder moved
    aside: the new one must still take its place, not leave `out_dir` missing until the next run."""
    import os

    from chromalab.files import staged_dir

    def stop(signum, frame):
        raise KeyboardInterrupt

    real_replace, calls = os.replace, []

    def replace_then_stop(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    out_dir = tmp_path / "tfrecords"
    out_dir.mkdir()
    (out_dir / "dataset.json").write_text("old")
    previous = signal.signal(signal.SIGTERM, stop)
    done = threading.Event()  # the stages have threads (workers, progress bars): the kernel may pick any of them
    threading.Thread(target=done.wait, daemon=True).start()
    try:
        monkeypatch.setattr(os, "replace", replace_then_stop)
        with pytest.raises(KeyboardInterrupt):
            with staged_dir(out_dir) as new:
                (new / "dataset.json").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
        done.set()
    assert (out_dir / "dataset.json").read_text() == "new"


def test_a_lock_whose_folder_its_holder_removed_is_taken_again_on_the_folder_now_there(tmp_path):
    """A waits, B holds and removes the folder (a trained experiment's checkpoint): A must not hold a lock on the
    removed folder while C locks the new one, or both would write one checkpoint."""
    from chromalab.files import held_exclusively

    folder, events, results = tmp_path / "checkpoint", [], {}
    holding, release = threading.Event(), threading.Event()

    def first():
        with held_exclusively(folder, 5) as held:
            results["first"] = held
            holding.set()
            release.wait(5)
            shutil.rmtree(folder)

    def waiter():
        with held_exclusively(folder, 5) as held:
            results["waiter"] = held
            events.append("waiter holds")
            release.wait(5)
            time.sleep(0.5)  # long enough for a third to try
            events.append("waiter ends")

    threads = [threading.Thread(target=first), threading.Thread(target=waiter)]
    threads[0].start()
    holding.wait(5)
    threads[1].start()
    time.sleep(0.3)
    release.set()
    while "waiter holds" not in events:
        time.sleep(0.01)
    with held_exclusively(folder, 0) as third:
        assert not third  # the waiter holds the folder that is there now
    for thread in threads:
        thread.join()
    assert results == {"first": True, "waiter": True} and folder.is_dir()



def test_a_staged_folder_a_kill_left_is_removed_by_the_next_staging_and_others_are_kept(tmp_path):
    """A kill -9 inside `staged_dir` leaves its half-made folder beside `out_dir`: the next run removes it (a
    tfrecords stage's would otherwise keep gigabytes), but not a sibling's."""
    from chromalab.files import staged_dir

    out_dir = tmp_path / "tfrecords"
    killed = tmp_path / ".tfrecords.0123abcd.tmp"
    (killed / "train").mkdir(parents=True)
    (killed / "train" / "shard-0.tfrecord").write_bytes(b"half a shard")
    sibling = tmp_path / ".split.89abcdef.tmp"
    sibling.mkdir()
    with staged_dir(out_dir) as new:
        (new / "dataset.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".split.89abcdef.tmp", "tfrecords"]


def test_a_write_that_fails_midway_leaves_the_old_file_whole_and_nothing_beside_it(tmp_path):
    """An error inside the block (a full disk, a bug, Ctrl-C) must not put half a file in the old one's place."""
    from chromalab.files import atomic_path

    target, model = tmp_path / "metrics.json", tmp_path / "model.keras"
    target.write_text("the previous, whole metrics")
    model.write_bytes(b"the previous model")
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(target, text=True) as f:
            f.write("half")
            raise OSError("disk full")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(model) as tmp:
            tmp.write_bytes(b"half a model")
            raise KeyboardInterrupt
    assert target.read_text() == "the previous, whole metrics" and model.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.keras"]


def test_a_written_file_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """After a power cut the rename may be on disk and the data not: synced first, the name never shows an empty
    file. (A crash of the machine cannot be made in a test; the order of the calls can be watched.)"""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_file(tmp_path / "per_photo.csv", text=True) as f:
        f.write("photo_id,model\n")
    assert [kind for kind, _ in events] == ["fsync", "replace"] and events[0][1] == events[1][1]
    assert (tmp_path / "per_photo.csv").read_text() == "photo_id,model\n"


def test_a_staged_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    from chromalab.files import staged_dir

    out_dir = tmp_path / "tfrecords"
    out_dir.mkdir()
    (out_dir / "dataset.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out_dir) as new:
            (new / "train-00000.tfrecord").write_bytes(b"half a shard")
            raise RuntimeError("a photo is unreadable")
    assert [p.name for p in tmp_path.iterdir()] == ["tfrecords"] and [p.name for p in out_dir.iterdir()] == [
        "dataset.json"]
    with staged_dir(out_dir) as new:
        (new / "dataset.json").write_text("new")
    # the old folder is gone, not left hidden beside the new one (the tfrecords stage's are gigabytes)
    assert [p.name for p in tmp_path.iterdir()] == ["tfrecords"] and (out_dir / "dataset.json").read_text() == "new"


def test_a_lock_taken_on_a_folder_removed_meanwhile_is_taken_again_on_the_one_now_there(tmp_path, monkeypatch):
    """The holder before us removes the folder between our open and our flock: deterministic, unlike the threads
    above. A lock on the removed folder guards nothing; the one held must be on the folder at the path."""
    import fcntl

    from chromalab.files import held_exclusively

    folder, real_flock, calls = tmp_path / "checkpoint", fcntl.flock, []

    def flock_after_removal(descriptor, operation):
        calls.append(operation)
        if len(calls) == 1:
            shutil.rmtree(folder)
        return real_flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_removal)
    with held_exclusively(folder, 1) as held:
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert held and folder.is_dir() and len(calls) == 2  # the first lock, on the removed folder, let go
        with held_exclusively(folder, 0) as other:
            assert not other  # another writer of this folder must wait


def test_a_full_disk_says_which_output_it_was_writing(tmp_path):
    """A write's ENOSPC names no file: the stage's one line said "the disk is full: free space there", there
    being nowhere. Each atomic writer names its output."""
    import errno

    from chromalab.errors import machine_failure
    from chromalab.files import atomic_path, staged_dir

    def disk_full():
        return OSError(errno.ENOSPC, "No space left on device")  # as a file's write raises it

    outputs = {atomic_file: tmp_path / "metrics.json", atomic_path: tmp_path / "model.keras",
               staged_dir: tmp_path / "tfrecords"}
    for writer, output in outputs.items():
        with pytest.raises(OSError) as raised:
            with writer(output):
                raise disk_full()
        assert machine_failure(raised.value) == (f"the disk is full ({output}): free space there, then re-run: "
                                                 "finished work is kept")
    with pytest.raises(OSError) as raised:  # a library's error that names its file keeps it
        with atomic_path(tmp_path / "model.keras"):
            raise OSError(errno.ENOSPC, "No space left on device", "/elsewhere/weights.h5")
    assert raised.value.filename == "/elsewhere/weights.h5"
