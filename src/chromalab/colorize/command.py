"""The `colorize` command: finding photos, naming their outputs, and colouring them on every core."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from chromalab.colorize.model import limit_model_threads, load_colorizer, model_file, model_input_size
from chromalab.colorize.photos import (Photo, colour_photo, compare_sheet, describe_unreadable, read_photo,
                                       save_atomic, small_lightness)
from chromalab.devices import available_cores
from chromalab.errors import NO_WRITES_ERRNOS, ChromalabError, machine_failure, one_line, printable
from chromalab.files import (MAX_NAME_BYTES, PHOTO_SUFFIXES, READ_ERRORS, clear_stale_temps, cut_to_bytes,
                             folder_photos, is_colorize_output)

KEPT_FORMATS = {"JPEG", "PNG", "WEBP"}  # anything else is written as PNG
OUTPUT_TAG = "_color"
COMPARE_TAG = "_compare"


@dataclass
class ColorizeReport:
    done: list[Path] = field(default_factory=list)  # outputs written
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input, one-line reason)
    skipped: list[Path] = field(default_factory=list)  # inputs whose output already existed
    empty: list[str] = field(default_factory=list)  # folders with nothing to colour, each with why

    @property
    def total(self) -> int:
        return len(self.done) + len(self.failed) + len(self.skipped)


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path
    output_format: str
    compare: Path | None


def _say(message: str) -> None:
    tqdm.write(printable(message, None), file=sys.stderr)  # a photo's name may hold an escape sequence


# --- finding photos and naming outputs ----------------------------------------------------------------------


def output_name(source: Path) -> tuple[str, str]:
    """(`<stem>_color<ext>`, Pillow format): JPEG, PNG and WebP keep theirs, the rest become PNG."""
    image_format = Image.registered_extensions().get(source.suffix.lower())
    if image_format in KEPT_FORMATS:
        return _fitting_name(source.stem, f"{OUTPUT_TAG}{source.suffix}"), image_format
    return _fitting_name(source.stem, f"{OUTPUT_TAG}.png"), "PNG"


def _fitting_name(stem: str, tail: str) -> str:
    """`stem` + `tail`, the stem cut where the whole would pass a file name's MAX_NAME_BYTES: a photo's legal
    name of 250 bytes must not make an output name no file system takes."""
    return cut_to_bytes(stem, MAX_NAME_BYTES - len(tail.encode("utf-8", "surrogateescape"))) + tail


def _folder_photos(folder: Path, output_roots: list[Path]) -> tuple[list[Path], int]:
    """The photos in `folder`, without what this command's outputs (`output_roots`) or earlier ones are, and how
    many such outputs were left out."""
    files = folder_photos(folder)
    inside = folder.resolve()
    # An output root that lies inside the folder holds outputs, not photos; one that is the folder itself, or
    # above it (`-o` the folder or its parent), does not hide the photos.
    outputs = [root for root in output_roots if root != inside and root.is_relative_to(inside)]
    # an earlier run's outputs carry colorize's EXIF mark, whatever their name: your own `rose_color.jpg` is a photo
    photos = [p for p in files if not any(p.resolve().is_relative_to(o) for o in outputs) and not is_colorize_output(p)]
    return photos, len(files) - len(photos)


def _not_a_photo_path(given: Path) -> str:
    """Why a path named on the command line is neither a file nor a folder to read."""
    if given.is_symlink() and not given.exists():
        return f"a link to {os.readlink(given)}, which does not exist"
    if given.exists():
        return "not a regular file or folder (a pipe or a device?)"
    return "no such file or folder"


def _not_ours(output: Path) -> bool:
    """A file at `output` that colorize did not write: never to be skipped as done, nor overwritten."""
    return output.is_file() and not is_colorize_output(output)


def _output_roots(paths: list[Path], out_dir: Path | None) -> list[Path]:
    """Where this command writes under `out_dir`: itself (photos named one by one) and <folder's name> for
    each folder given."""
    if out_dir is None:
        return []
    out = out_dir.resolve()
    return [out] + [out / given.resolve().name for given in paths if given.is_dir()]


def plan_jobs(paths: Sequence[Path], out_dir: Path | None, compare: bool, report: ColorizeReport) -> list[Job]:
    """One job per photo found; missing paths and clashing outputs go to `report.failed`."""
    jobs: list[Job] = []
    seen: set[Path] = set()
    owner_of: dict[Path, Path] = {}  # output → the input that writes it
    paths = [Path(given) for given in paths]
    output_roots = _output_roots(paths, out_dir)
    for given in paths:
        if given.is_dir():
            # Under out_dir a folder keeps its own name, as `cp -r` does: `colorize a/ b/ -o out` gives
            # out/a/… and out/b/…, so same-named photos in different folders don't collide.
            photos, outputs = _folder_photos(given, output_roots)
            found = [(p, given.resolve().name / p.relative_to(given).parent) for p in photos]
            if outputs and not found:
                report.empty.append(f"{given}: only colorize's own outputs here ({outputs}); name one on the "
                                    "command line to colour it again")
            elif not found:
                report.empty.append(f"{given}: no photos here (looked for {', '.join(PHOTO_SUFFIXES)})")
        elif given.is_file():
            found = [(given, None)]
        else:
            reason = _not_a_photo_path(given)
            _say(f"{given}: {reason}")
            report.failed.append((given, reason))
            continue
        for source, mirrored_dir in found:
            if source.resolve() in seen:
                continue
            seen.add(source.resolve())
            name, output_format = output_name(source)
            if out_dir is None:
                output = source.with_name(name)
            elif mirrored_dir is None:
                output = out_dir / name
            else:
                output = out_dir / mirrored_dir / name
            sheet = output.with_name(_fitting_name(source.stem, f"{COMPARE_TAG}.jpg")) if compare else None
            clash = next((owner_of[t.resolve()] for t in (output, sheet) if t and t.resolve() in owner_of), None)
            if clash is not None or _not_ours(output):
                reason = (f"its output would overwrite that of {clash}; colorize it alone with -o <another folder>"
                          if clash else f"{output} is there and not colorize's output (a photo of yours?); colour "
                          "into another folder with -o")
                _say(f"{source}: {reason}")
                report.failed.append((source, reason))
                continue
            for target in (output, sheet):
                if target is not None:
                    owner_of[target.resolve()] = source
            jobs.append(Job(source, output, output_format, sheet))
    return jobs


# --- the command --------------------------------------------------------------------------------------------


def colorize_paths(paths: Sequence[Path], out_dir: Path | None = None, model: str = "gan", overwrite: bool = False,
                   compare: bool = False, batch_size: int = 1, models_root: Path = Path("models"),
                   image_size: int | None = None, verbose: bool = False) -> ColorizeReport:
    """Colour every photo in `paths` (files and folders, searched recursively) at its full resolution.

    Outputs are `<stem>_color<ext>` beside each input, or under `out_dir` (a folder input `photos/` is
    mirrored as `out_dir/photos/…`); with `compare`, also `<stem>_compare.jpg` beside the output. Existing
    files (inputs included) are never replaced unless `overwrite`. Unreadable photos are reported and skipped,
    saying what was wrong with each in the user's words (`verbose`: with the technical detail); the rest are
    done. Photos go through the model as soon as decoded, at most `batch_size` at a time, with at most
    max(`batch_size`, 2 per core) of them held decoded at once."""
    if batch_size < 1:
        raise ChromalabError(f"batch size {batch_size}: must be at least 1")
    model_file(model, models_root)  # a wrong model fails here, before --out is made or any photo decoded
    if out_dir is not None:
        _check_out_dir(Path(out_dir))
    report = ColorizeReport()
    jobs = _jobs_to_do(paths, out_dir, compare, overwrite, report)
    if report.total == 0 and not jobs:
        raise ChromalabError("; ".join(report.empty) or "no photos given")
    for note in report.empty:
        _say(note)
    if not jobs:
        return report

    # Photos are decoded, coloured and encoded on every core at once (numpy and Pillow release the GIL);
    # the model runs in this thread between the two, and the phases overlap: the first photos are decoded
    # while the model loads, and the workers write the photos the model has coloured while it colours the
    # next ones.
    workers = max(1, min(len(jobs), available_cores()))
    # Photos decoded and not yet written, at most: each worker writes one while another waits for or goes
    # through the model (4 per worker measured slower: more threads contending for the cores). Their
    # full-resolution lightness is what fills the memory.
    held = max(batch_size, 2 * workers)
    limit_model_threads(available_cores())
    with tqdm(total=len(jobs), desc="colorize", unit="photo") as bar, ThreadPoolExecutor(workers) as pool:
        flow = _Pipeline(pool, iter(jobs), held, report, bar, verbose)
        flow.read_ahead(None)
        try:
            colorizer = load_colorizer(model, models_root)
        except BaseException:
            for read_done in flow.reads:
                read_done.cancel()
            raise
        size = model_input_size(colorizer, image_size)
        flow.reads = deque(pool.submit(_with_small, read_done, size) for read_done in flow.reads)
        while flow.reads:
            photos = flow.decoded(batch_size)
            if photos:
                flow.colour(colorizer, photos)
            del photos  # the workers hold them until written: `held` counts only theirs
            flow.finish_writes(wait=False)
            flow.read_ahead(size)
            if not flow.reads:  # `held` photos are being written: the next read waits for them
                flow.finish_writes(wait=True)
                flow.read_ahead(size)
        flow.finish_writes(wait=True)
    return report


def _jobs_to_do(paths: Sequence[Path], out_dir: Path | None, compare: bool, overwrite: bool,
                report: ColorizeReport) -> list[Job]:
    """The photos' jobs, less those done (`_pending`), with what a killed run's writes left cleared, and their
    folders checked for writing when the outputs go beside the photos."""
    planned = plan_jobs(paths, out_dir, compare, report)
    _clear_stale_temps(planned)
    jobs = _pending(planned, overwrite, report)
    if out_dir is None:
        _check_beside_photos(jobs)
    return jobs


def _check_out_dir(out_dir: Path) -> None:
    """--out must be a folder, or a path one can be made at, that takes files: found out before any photo is
    decoded and coloured (a read-only one failed each photo in turn, after the work)."""
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise ChromalabError(f"--out {out_dir}: {path} is a file, not a folder; name a folder for the outputs")
            break
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        refused = _refuses_files(out_dir)
    except OSError as exc:
        refused = exc
    if refused is not None:
        raise ChromalabError(f"--out {out_dir}: cannot write there ({refused.strerror or refused}); name another "
                             "folder for the outputs")


def _check_beside_photos(jobs: list[Job]) -> None:
    """Without --out, each folder of photos must take their outputs: found out before any photo is coloured
    (a read-only folder, a camera card locked, failed each photo in turn, after the work)."""
    for folder in sorted({job.output.parent for job in jobs}):
        if (refused := _refuses_files(folder)) is not None:
            raise ChromalabError(f"cannot write beside the photos in {folder} ({refused.strerror or refused}): "
                                 "pass --out <a folder> for the outputs")


def _refuses_files(folder: Path) -> OSError | None:
    """Why a file cannot be written in `folder`, by writing one (what permissions say is not the whole story:
    a read-only mount, a full disk), or None."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        return exc
    return None


def _clear_stale_temps(jobs: list[Job]) -> None:
    """What a killed run's writes left beside these jobs' outputs (in the user's folders: those files only)."""
    by_folder: dict[Path, set[str]] = {}
    for job in jobs:
        for target in (job.output, job.compare):
            if target is not None:
                by_folder.setdefault(target.parent, set()).add(target.name)
    for folder, names in by_folder.items():
        clear_stale_temps(folder, names)


def _pending(jobs: list[Job], overwrite: bool, report: ColorizeReport) -> list[Job]:
    """The jobs to do, unless `overwrite`: a job whose colour output exists is done (it is written last) and
    is skipped (in `report`); one whose sheet exists already (a kill between the two writes, or a file of
    the user's) writes only its colour output."""
    pending = []
    for job in jobs:
        if overwrite:
            pending.append(job)
        elif job.output.exists():
            _say(f"skipped {job.source}: {job.output} exists (--overwrite replaces it)")
            report.skipped.append(job.source)
        elif job.compare is not None and job.compare.exists():
            pending.append(dataclasses.replace(job, compare=None))
        else:
            pending.append(job)
    return pending


Read = tuple[Job, Photo | None, BaseException | None]  # a job, its decoded photo or why it could not be read


def _read(job: Job, size: tuple[int, int] | None) -> Read:
    try:
        return job, read_photo(job.source, size, job.output_format), None
    except READ_ERRORS as exc:
        return job, None, exc


def _with_small(read_done: Future, size: tuple[int, int]) -> Read:
    """A photo decoded before the model's input size was known, with its small lightness added. (The
    read it waits for was submitted first, so a worker has it already: no deadlock.)"""
    job, photo, exc = read_done.result()
    if photo is not None:
        try:
            photo.small = small_lightness(job.source, photo.lightness, size)
        except READ_ERRORS as error:
            return job, None, error
    return job, photo, exc


def _write(job: Job, photo: Photo, ab_small: np.ndarray) -> OSError | None:
    coloured = colour_photo(photo, ab_small)
    try:  # the sheet first: a photo whose colour output exists is whole
        if job.compare is not None:
            save_atomic(compare_sheet(photo, coloured), job.compare, "JPEG")
        save_atomic(coloured, job.output, job.output_format, photo.exif)
    except OSError as exc:
        return exc
    return None


@dataclass
class _Pipeline:
    """The photos in flight: being decoded on the pool (`reads`, in order) or written (`writes`), at most
    `held` of them together."""

    pool: ThreadPoolExecutor
    todo: Iterator[Job]
    held: int
    report: ColorizeReport
    bar: tqdm
    verbose: bool
    reads: deque[Future] = field(default_factory=deque)
    writes: deque[tuple[Job, Future]] = field(default_factory=deque)

    def read_ahead(self, size: tuple[int, int] | None) -> None:
        while len(self.reads) + len(self.writes) < self.held and (job := next(self.todo, None)) is not None:
            self.reads.append(self.pool.submit(_read, job, size))

    def decoded(self, batch_size: int) -> list[tuple[Job, Photo]]:
        """The photos decoded by now, at least one read, at most batch_size; the unreadable are reported."""
        batch = [self.reads.popleft().result()]
        while self.reads and len(batch) < batch_size and self.reads[0].done():
            batch.append(self.reads.popleft().result())
        photos = []
        for job, photo, exc in batch:
            if exc is None:
                if photo.frames > 1:  # the output is one still photo: say so rather than drop the rest unsaid
                    _say(f"{job.source}: {photo.frames} frames (an animation or several pages); the first is coloured")
                photos.append((job, photo))
                continue
            reason = describe_unreadable(exc, job.source)
            _say(f"{job.source}: {reason}" + (f" [{one_line(exc)}]" if self.verbose else ""))
            self.report.failed.append((job.source, reason))
            self.bar.update()
        return photos

    def colour(self, colorizer, photos: list[tuple[Job, Photo]]) -> None:
        """The model colours `photos` while the workers write those before; the workers then write these."""
        small = np.stack([photo.small for _, photo in photos])[..., None]
        predicted = np.asarray(colorizer.predict_on_batch(small), dtype=np.float32)
        for (job, photo), ab in zip(photos, predicted):
            self.writes.append((job, self.pool.submit(_write, job, photo, ab)))

    def finish_writes(self, wait: bool) -> None:
        while self.writes and (wait or self.writes[0][1].done()):
            job, written = self.writes.popleft()
            exc = written.result()
            if exc is not None and exc.errno in NO_WRITES_ERRNOS:  # every photo after it would fail alike
                for pending in (*self.reads, *(later for _, later in self.writes)):
                    pending.cancel()
                raise ChromalabError(f"cannot write {job.output}: {machine_failure(exc)}")
            if exc is not None:
                _say(f"{job.source}: cannot write {job.output} ({one_line(exc)})")
                self.report.failed.append((job.source, one_line(exc)))
            else:
                self.report.done.append(job.output)
            self.bar.update()
