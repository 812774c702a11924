"""`chromalab colorize`: colour your own photos at their full resolution.

The models work on S×S lightness (S = 256 for the U-Net). A photo keeps its own detail because only its
colour comes from the model: L is computed at the original resolution, a resized S×S copy goes through the
model, the predicted ab (smooth by nature) is upsampled back to the original size and joined with the
full-resolution L. A 12-megapixel photo comes back 12 megapixels, as sharp as it went in.

Non-square photos are squashed to S×S for the model and the ab map is stretched back: the model sees a
distorted photo, but colour varies slowly, and the detail, which comes from L, is never resampled.

Any colour already in an input is discarded (only its lightness is used); alpha is kept. Output formats:
JPEG (quality 95), PNG and WebP stay what they were; every other format (BMP, TIFF, 16-bit…) becomes
8-bit PNG. EXIF orientation is applied to the pixels; other metadata is not copied.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from chromalab.color import AbSource, lab_rows_to_rgb8, rgb8_lightness_norm, rgb_to_lab_norm
from chromalab.config import MODEL_NAMES
from chromalab.devices import available_cores
from chromalab.errors import ChromalabError
from chromalab.files import atomic_file
from chromalab.inference import for_inference

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
KEPT_FORMATS = {"JPEG", "PNG", "WEBP"}  # anything else is written as PNG
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "PNG": {}}
OUTPUT_TAG = "_color"
COMPARE_TAG = "_compare"
COMPARE_MAX_SIDE = 2048  # each half of the side-by-side sheet: a preview, not a second full-size copy
DEFAULT_IMAGE_SIZE = 256  # for models without a fixed input size, when image_size is not given
# The lightness of an RGB photo is computed in stripes of a quarter megapixel, so that its temporaries stay
# small whatever the photo's size.
STRIPE_PIXELS = 1 << 18
DOWNSAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0  # Pillow first box-reduces by whole factors down to 3x the target, then filters: ~5x faster
# Pillow's 16-bit grayscale modes ("I" is how some readers deliver 16-bit PNG/TIFF; its values are 0-65535).
GRAY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # runs:/…, models:/…, s3://…; not C:/…
ZEROS_INITIALIZER = {"module": "keras.initializers", "class_name": "Zeros", "config": {}, "registered_name": None}
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass
class ColorizeReport:
    done: list[Path] = field(default_factory=list)  # outputs written
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input, one-line reason)
    skipped: list[Path] = field(default_factory=list)  # inputs whose output already existed

    @property
    def total(self) -> int:
        return len(self.done) + len(self.failed) + len(self.skipped)


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path
    output_format: str
    compare: Path | None


@dataclass
class Photo:
    """A decoded photo: its lightness at full resolution (L/100, float32 [H, W]) and its alpha, if any,
    and, when read for a model, its lightness at the model's size (`small`, [S, S])."""

    lightness: np.ndarray
    alpha: Image.Image | None
    small: np.ndarray | None = None


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- finding photos and naming outputs ----------------------------------------------------------------------


def _output_name(source: Path) -> tuple[str, str]:
    """(`<stem>_color<ext>`, Pillow format): JPEG, PNG and WebP keep theirs, the rest become PNG."""
    image_format = Image.registered_extensions().get(source.suffix.lower())
    if image_format in KEPT_FORMATS:
        return f"{source.stem}{OUTPUT_TAG}{source.suffix}", image_format
    return f"{source.stem}{OUTPUT_TAG}.png", "PNG"


def _is_earlier_output(path: Path, stems: set[tuple[Path, str]]) -> bool:
    """`x_color.jpg` / `x_compare.jpg` beside an `x.*` photo: a previous run's output, not a new photo."""
    for tag in (OUTPUT_TAG, COMPARE_TAG):
        if path.stem.endswith(tag) and (path.parent, path.stem.removesuffix(tag)) in stems:
            return True
    return False


def _folder_photos(folder: Path, out_dir: Path | None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if out_dir is not None:  # outputs written inside the scanned folder are not inputs
        out_resolved = out_dir.resolve()
        files = [p for p in files if not p.resolve().is_relative_to(out_resolved)]
    stems = {(p.parent, p.stem) for p in files}
    return [p for p in files if not _is_earlier_output(p, stems)]


def plan_jobs(paths: Sequence[Path], out_dir: Path | None, compare: bool, report: ColorizeReport) -> list[Job]:
    """One job per photo found; missing paths and clashing outputs go to `report.failed`."""
    jobs: list[Job] = []
    seen: set[Path] = set()
    owner_of: dict[Path, Path] = {}  # output → the input that writes it
    for given in map(Path, paths):
        if given.is_dir():
            # Under out_dir a folder keeps its own name, as `cp -r` does: `colorize a/ b/ -o out` gives
            # out/a/… and out/b/…, so same-named photos in different folders don't collide.
            found = [(p, given.resolve().name / p.relative_to(given).parent)
                     for p in _folder_photos(given, out_dir)]
            if not found:
                _say(f"{given}: no photos here ({', '.join(PHOTO_SUFFIXES)})")
        elif given.is_file():
            found = [(given, None)]
        else:
            _say(f"{given}: no such file or folder")
            report.failed.append((given, "no such file or folder"))
            continue
        for source, mirrored_dir in found:
            if source.resolve() in seen:
                continue
            seen.add(source.resolve())
            name, output_format = _output_name(source)
            if out_dir is None:
                output = source.with_name(name)
            elif mirrored_dir is None:
                output = out_dir / name
            else:
                output = out_dir / mirrored_dir / name
            sheet = output.with_name(f"{source.stem}{COMPARE_TAG}.jpg") if compare else None
            clash = next((owner_of[t.resolve()] for t in (output, sheet) if t and t.resolve() in owner_of), None)
            if clash is not None:
                reason = f"its output would overwrite that of {clash}; colorize one of them separately"
                _say(f"{source}: {reason}")
                report.failed.append((source, reason))
                continue
            for target in (output, sheet):
                if target is not None:
                    owner_of[target.resolve()] = source
            jobs.append(Job(source, output, output_format, sheet))
    return jobs


# --- the model --------------------------------------------------------------------------------------------


def model_file(model: str, models_root: Path = Path("models")) -> Path | None:
    """The .keras file `model` names (checked to exist), or None for an MLflow URI; bad names are one-line
    errors. Cheap: colorize checks it before any photo is read."""
    if URI_PATTERN.match(model) and model not in MODEL_NAMES:
        return None
    if model in MODEL_NAMES:
        path = models_root / model / "model.keras"
        if not path.is_file():
            raise ChromalabError(f"{path} does not exist: train the {model} model first "
                                 f"(`dvc repro train@{model}` or `chromalab train {model}`)")
        return path
    path = Path(model)
    if path.suffix != ".keras":
        raise ChromalabError(f"--model {model!r}: expected {', '.join(MODEL_NAMES)}, a .keras file, "
                             "or an MLflow model URI (runs:/<run id>/model, models:/chromalab-gan@champion)")
    if not path.is_file():
        raise ChromalabError(f"model file {path} does not exist: check the path")
    return path


def load_colorizer(model: str, models_root: Path = Path("models")):
    """A Keras model L [B, S, S, 1] → ab [B, S, S, 2], from a model name, a .keras file or an MLflow URI."""
    path = model_file(model, models_root)
    if path is None:
        return _load_mlflow(model)
    try:
        return _checked(_load_keras_file(path), str(path))
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        raise ChromalabError(f"cannot load model {path}: {_reason(exc)}") from None


def _load_keras_file(path: Path):
    """`keras.saving.load_model(path, compile=False)` without first filling every weight with random numbers
    that the file's weights then replace: its initialisers become Zeros (for the 54 M-parameter U-Net that
    skips a second of CPU, on the way to the first photo). Weights the file lacks fail as in load_model."""
    import keras

    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as folder:
        config = json.loads(archive.read("config.json"))
        config["compile_config"] = None
        model = keras.saving.deserialize_keras_object(_zero_initializers(config))
        # from a file of its own: h5py reading inside the zip seeks back and forth, which zipfile pays for
        # by reading from the member's start again (seconds for 200 MB)
        model.load_weights(archive.extract("model.weights.h5", folder))
    return model


def _zero_initializers(config):
    if isinstance(config, list):
        return [_zero_initializers(item) for item in config]
    if not isinstance(config, dict):
        return config
    return {key: ZEROS_INITIALIZER if key.endswith("_initializer") and isinstance(value, dict)
            else _zero_initializers(value) for key, value in config.items()}


def _load_mlflow(uri: str):
    """A run's Keras model (runs:/<id>/model) or a registered chromalab model, whose pyfunc holds one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from chromalab import tracking

    tracking.use_store()
    try:
        if "keras" in mlflow.models.get_model_info(uri).flavors:
            loaded = mlflow.keras.load_model(uri, load_model_kwargs={"compile": False})
        else:  # chromalab.serve.pyfunc.Colorizer: its Keras model is loaded with it
            loaded = getattr(mlflow.pyfunc.load_model(uri).unwrap_python_model(), "colorizer", None)
            if loaded is None:
                raise ValueError("not a chromalab colorizer (no Keras flavour, no chromalab pyfunc)")
    except (MlflowException, OSError, ValueError) as exc:
        raise ChromalabError(f"cannot load MLflow model {uri} from {tracking.tracking_uri()}: "
                             f"{_reason(exc)} (set MLFLOW_TRACKING_URI if it lives elsewhere)") from None
    return _checked(loaded, uri)


def _checked(model, name: str):
    """`model`, checked to be a colorizer, made cheaper to run (chromalab.inference)."""
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[-1] == 1 and model.output_shape[-1] == 2):
        raise ChromalabError(f"model {name} maps {shape} → {model.output_shape}; a colorizer maps "
                             "L [B, S, S, 1] → ab [B, S, S, 2]")
    return for_inference(model)


def model_input_size(model, image_size: int | None) -> tuple[int, int]:
    """(height, width) the model is fed: its own fixed size (the U-Net has one), else image_size or 256."""
    height, width = model.input_shape[1:3]
    if height is not None and width is not None:
        return height, width
    side = image_size or DEFAULT_IMAGE_SIZE
    return height or side, width or side


# --- pixels -------------------------------------------------------------------------------------------------


def _stripes(height: int, width: int) -> Iterator[slice]:
    rows = max(1, STRIPE_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield slice(top, top + rows)


@functools.cache
def _gray_lightness_table(levels: int) -> np.ndarray:
    """L/100 of every gray level (256 or 65536): a gray photo's L is then an exact table lookup."""
    dtype = np.uint8 if levels == 256 else np.uint16
    gray = np.arange(levels, dtype=dtype)
    return rgb_to_lab_norm(np.repeat(gray[:, None], 3, axis=1))[:, 0]


def _rgb_lightness(rgb: np.ndarray) -> np.ndarray:
    lightness = np.empty(rgb.shape[:2], dtype=np.float32)
    for rows in _stripes(*rgb.shape[:2]):
        lightness[rows] = rgb8_lightness_norm(rgb[rows])
    return lightness


def _lightness_and_alpha(image: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
    alpha = None
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    if "A" in image.getbands():
        alpha = image.getchannel("A")
        image = image.convert("RGB" if "R" in image.getbands() else "L")
    if image.mode in GRAY16_MODES:
        levels = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return _gray_lightness_table(65536)[levels], alpha
    if image.mode in ("L", "1"):
        return _gray_lightness_table(256)[np.asarray(image.convert("L"))], alpha
    return _rgb_lightness(np.asarray(image.convert("RGB"))), alpha


def _small_lightness(path: Path | io.BytesIO, lightness: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The lightness at the model's size. A JPEG is decoded again in draft mode, straight at 1/2, 1/4 or 1/8
    scale (still at least the model's size): a few milliseconds, where filtering the full-resolution L
    down would cost a full-resolution pass."""
    if hasattr(path, "seek"):
        path.seek(0)  # a file object: read_photo's own decode has moved it
    with Image.open(path) as opened:
        if opened.format == "JPEG" and opened.mode in ("L", "RGB"):
            opened.draft(opened.mode, (max(size), max(size)))
            small, _ = _lightness_and_alpha(ImageOps.exif_transpose(opened))
            return _resize(small, size, DOWNSAMPLE)
    return _resize(lightness, size, DOWNSAMPLE)


def read_photo(path: Path | io.BytesIO, model_size: tuple[int, int] | None = None) -> Photo:
    """Decode a photo upright (EXIF orientation applied) into its full-resolution lightness and alpha, and,
    with `model_size` = (height, width), its lightness at that size for the model."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
    lightness, alpha = _lightness_and_alpha(image)
    small = None if model_size is None else _small_lightness(path, lightness, model_size)
    return Photo(lightness, alpha, small)


def _resize(channel: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize one float32 channel [H, W] to size = (height, width)."""
    image = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
    return np.asarray(image.resize(size[::-1], resample, reducing_gap=REDUCING_GAP))


def _bilinear_taps(out_size: int, in_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output positions start..stop-1 of out_size: the two input positions each lies between and the
    weight of the second (pixel centres aligned, as Pillow and OpenCV do)."""
    position = (np.arange(start, stop) + 0.5) * (in_size / out_size) - 0.5
    position = np.clip(position, 0, in_size - 1)
    first = np.floor(position).astype(np.intp)
    return first, np.minimum(first + 1, in_size - 1), (position - first).astype(np.float32)[:, None]


def ab_rows(ab_small: np.ndarray, size: tuple[int, int]) -> AbSource:
    """ab_small [h, w, 2] bilinearly upsampled to size = (height, width), made a few rows at a time where
    `lab_rows_to_rgb8` asks for them (into its planar a and b), so that no full-resolution ab array
    exists. The model's ab varies slowly (the detail comes from L), so bilinear loses nothing visible."""
    height, width = size
    ab_small = np.asarray(ab_small, dtype=np.float32)
    left, right, x_weight = _bilinear_taps(width, ab_small.shape[1], 0, width)
    wide = ab_small[:, left] + (ab_small[:, right] - ab_small[:, left]) * x_weight  # [h, width, 2]
    wide = np.ascontiguousarray(np.moveaxis(wide, -1, 0))  # [2, h, width]: a plane, b plane
    rise = np.diff(wide, axis=1, append=wide[:, -1:])  # to the next row; 0 after the last one
    upper, _, y_weight = _bilinear_taps(height, ab_small.shape[0], 0, height)

    def fill(rows: slice, a_norm: np.ndarray, b_norm: np.ndarray) -> None:
        # rows between the same two small rows differ only in their weight: one numpy call for them all
        sources, weights = upper[rows], y_weight[rows]
        bounds = [0, *(np.flatnonzero(np.diff(sources)) + 1), len(sources)]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            for channel, plane in enumerate((a_norm, b_norm)):
                np.multiply(rise[channel, sources[start]], weights[start:stop], out=plane[start:stop])
                plane[start:stop] += wide[channel, sources[start]]

    return fill


def lab_image(lightness: np.ndarray, ab_small: np.ndarray) -> Image.Image:
    """Full-resolution L/100 [H, W] and the model's ab/128 [h, w, 2] → an RGB image [H, W], made a few rows
    at a time: one pass over the photo."""
    planes = lab_rows_to_rgb8(lightness, ab_rows(ab_small, lightness.shape))
    return Image.merge("RGB", [Image.fromarray(plane) for plane in planes])


def colour_photo(photo: Photo, ab_small: np.ndarray) -> Image.Image:
    """Join the photo's own L with the model's ab, upsampled to the photo's size."""
    coloured = lab_image(photo.lightness, ab_small)
    if photo.alpha is not None:
        coloured.putalpha(photo.alpha)
    return coloured


def compare_sheet(photo: Photo, coloured: Image.Image) -> Image.Image:
    """Gray input | colourised, side by side, each at most COMPARE_MAX_SIDE on its long side."""
    height, width = photo.lightness.shape
    scale = min(1.0, COMPARE_MAX_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    lightness = _resize(photo.lightness, size, DOWNSAMPLE)
    gray = lab_image(lightness, np.zeros((1, 1, 2), dtype=np.float32))
    sheet = Image.new("RGB", (2 * size[1], size[0]))
    sheet.paste(gray, (0, 0))
    sheet.paste(coloured.convert("RGB").resize(size[::-1], DOWNSAMPLE), (size[1], 0))
    return sheet


def colour_bytes(colorizer, data: bytes, image_size: int | None = None) -> tuple[Photo, Image.Image]:
    """One photo file's contents → (the decoded photo, coloured at its full size), as `colorize` colours it.

    The entry point of the served model and of `chromalab serve`; raises one of READ_ERRORS on a bad file.
    """
    photo = read_photo(io.BytesIO(data), model_input_size(colorizer, image_size))
    ab_small = np.asarray(colorizer.predict_on_batch(photo.small[None, ..., None]), dtype=np.float32)[0]
    return photo, colour_photo(photo, ab_small)


def save_atomic(image: Image.Image, path: Path, image_format: str) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted write leaves no half photo."""
    with atomic_file(path) as f:
        image.save(f, format=image_format, **SAVE_OPTIONS.get(image_format, {}))


# --- the command --------------------------------------------------------------------------------------------


def limit_model_threads(cores: int) -> int | None:
    """On TensorFlow, give the model a third of the cores (1 of 2) before it first runs: the photo workers
    keep every core busy, and more TensorFlow threads only contend with them (12 MP photos, 2 cores: 0.95 →
    1.06-1.10 photos/s, 12.6 → 11.3 CPU-s for 8). The model is about a third of the CPU work per photo.
    TensorFlow fixes its threads at its first operation, so this is possible only before that (not in a
    process that already ran TensorFlow, nor under JAX). Returns the threads set, or None."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    threads = max(1, round(cores / 3))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)  # one model call at a time
    except RuntimeError:  # TensorFlow is already running in this process: its threads stay as they are
        return None
    return threads



def colorize_paths(paths: Sequence[Path], out_dir: Path | None = None, model: str = "gan", overwrite: bool = False,
                   compare: bool = False, batch_size: int = 1, models_root: Path = Path("models"),
                   image_size: int | None = None) -> ColorizeReport:
    """Colour every photo in `paths` (files and folders, searched recursively) at its full resolution.

    Outputs are `<stem>_color<ext>` beside each input, or under `out_dir` (a folder input `photos/` is
    mirrored as `out_dir/photos/…`); with `compare`, also `<stem>_compare.jpg` beside the output. Existing
    files (inputs included) are never replaced unless `overwrite`. Unreadable photos are reported and
    skipped; the rest are done. Photos go through the model as soon as they are decoded, at most
    `batch_size` at a time, and at most `batch_size` of them are held decoded at once.
    """
    if batch_size < 1:
        raise ChromalabError(f"batch size {batch_size}: must be at least 1")
    report = ColorizeReport()
    jobs = []
    for job in plan_jobs(paths, out_dir, compare, report):
        existing = next((t for t in (job.output, job.compare) if t is not None and t.exists()), None)
        if existing is not None and not overwrite:
            _say(f"skipped {job.source}: {existing} exists (--overwrite replaces it)")
            report.skipped.append(job.source)
        else:
            jobs.append(job)
    if report.total == 0 and not jobs:
        raise ChromalabError(f"no photos found in {', '.join(map(str, paths))}: "
                             f"looked for {', '.join(PHOTO_SUFFIXES)}")
    if not jobs:
        return report

    # Photos are decoded, coloured and encoded on every core at once (numpy and Pillow release the GIL);
    # the model runs in this thread between the two, and the phases overlap: the first photos are decoded
    # while the model loads, and the workers write the photos the model has coloured while it colours the
    # next ones.
    workers = max(1, min(len(jobs), available_cores()))
    # Photos decoded and not yet written, at most: enough for the workers to decode the next ones while they
    # write those the model has coloured (with 2 per worker, the model waited for decoding once they were
    # all being written). Their full-resolution lightness is what fills the memory.
    held = max(batch_size, 2 * workers)

    def read(job: Job, size: tuple[int, int] | None) -> tuple[Job, Photo | None, BaseException | None]:
        try:
            return job, read_photo(job.source, size), None
        except READ_ERRORS as exc:
            return job, None, exc

    def with_small(read_done: Future, size: tuple[int, int]) -> tuple[Job, Photo | None, BaseException | None]:
        """A photo decoded before the model's input size was known, with its small lightness added. (The
        read it waits for was submitted first, so a worker has it already: no deadlock.)"""
        job, photo, exc = read_done.result()
        if photo is not None:
            try:
                photo.small = _small_lightness(job.source, photo.lightness, size)
            except READ_ERRORS as error:
                return job, None, error
        return job, photo, exc

    def write(job: Job, photo: Photo, ab_small: np.ndarray) -> OSError | None:
        coloured = colour_photo(photo, ab_small)
        try:
            save_atomic(coloured, job.output, job.output_format)
            if job.compare is not None:
                save_atomic(compare_sheet(photo, coloured), job.compare, "JPEG")
        except OSError as exc:
            return exc
        return None

    todo = iter(jobs)
    reads: deque[Future] = deque()
    writes: deque[tuple[Job, Future]] = deque()

    def read_ahead(size: tuple[int, int] | None) -> None:
        while len(reads) + len(writes) < held and (job := next(todo, None)) is not None:
            reads.append(pool.submit(read, job, size))

    def finish_writes(wait: bool) -> None:
        while writes and (wait or writes[0][1].done()):
            job, written = writes.popleft()
            exc = written.result()
            if exc is not None:
                _say(f"{job.source}: cannot write {job.output} ({_reason(exc)})")
                report.failed.append((job.source, _reason(exc)))
            else:
                report.done.append(job.output)
            bar.update()

    model_file(model, models_root)  # a wrong model name fails here, before any progress bar or decoding
    limit_model_threads(available_cores())
    with tqdm(total=len(jobs), desc="colorize", unit="photo") as bar, ThreadPoolExecutor(workers) as pool:
        read_ahead(None)
        try:
            colorizer = load_colorizer(model, models_root)
        except BaseException:
            for read_done in reads:
                read_done.cancel()
            raise
        size = model_input_size(colorizer, image_size)
        reads = deque(pool.submit(with_small, read_done, size) for read_done in reads)
        while reads:
            # the photos decoded by now, at least one, at most batch_size: the model colours them while
            # the workers write those before
            batch = [reads.popleft().result()]
            while reads and len(batch) < batch_size and reads[0].done():
                batch.append(reads.popleft().result())
            photos: list[tuple[Job, Photo]] = []
            for job, photo, exc in batch:
                if exc is not None:
                    _say(f"{job.source}: cannot read it ({_reason(exc)})")
                    report.failed.append((job.source, _reason(exc)))
                    bar.update()
                else:
                    photos.append((job, photo))
            if photos:
                small = np.stack([photo.small for _, photo in photos])[..., None]
                predicted = np.asarray(colorizer.predict_on_batch(small), dtype=np.float32)
                writes.extend((job, pool.submit(write, job, photo, ab)) for (job, photo), ab in zip(photos, predicted))
            del batch, photos
            finish_writes(wait=False)
            read_ahead(size)
            if not reads:  # `held` photos are being written: the next read waits for them
                finish_writes(wait=True)
                read_ahead(size)
        finish_writes(wait=True)
    return report
