"""The rows of the pipeline around training: the tfrecords stage on real photos, the tf.data input pipeline, and
`chromalab colorize` on full-resolution photos."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import keras
from PIL import Image

from chromalab.bench.report import Measurement, cpu_time
from chromalab.colorize import colorize_paths
from chromalab.config import Params, TrainParams
from chromalab.devices import available_cores
from chromalab.errors import ChromalabError
from chromalab.train.models import build_generator
from chromalab.bench.samples import real_crops
from chromalab.data.tfrecords import run_tfrecords
from chromalab.train.input import make_dataset

INPUT_VARIANTS = ("augmented", "no augmentation")
BENCH_PHOTOS = 64  # training photos in the bench's TFRecords
BENCH_TEST_PHOTOS = 4  # the stage needs a test split too
BENCH_VAL_PHOTOS = 2  # ... and a val split
INPUT_MIN_SECONDS = 3.0  # whole passes over the cached records are timed until this much time has passed
COLORIZE_PHOTOS = 8
COLORIZE_SIDE = 3464  # photos colourised at full resolution: 12 megapixels each, as from a phone
PHOTO_SEED = 0  # crops of scikit-image's bundled photos (chromalab.bench.samples) are the bench's photos


def time_tfrecords_stage(images_dir: Path, out_dir: Path, image_size: int, n_train: int | None = None) -> Measurement:
    """Photos/s of the whole tfrecords stage (one worker process per core) on the photos in `images_dir`."""
    n_photos = (n_train or BENCH_PHOTOS) + BENCH_TEST_PHOTOS + BENCH_VAL_PHOTOS
    workers = min(available_cores(), n_photos)
    start, cpu_start = time.perf_counter(), cpu_time()
    run_tfrecords(Params(), images_dir, out_dir, workers=workers)  # returns once its workers have exited
    seconds = time.perf_counter() - start
    return Measurement("tfrecords", variant="stage", image_size=image_size, items=n_photos, seconds=seconds,
                       cpu_seconds=cpu_time() - cpu_start,
                       images_per_s=n_photos / seconds,
                       note=f"{workers} worker process(es) with contrast variants, start-up included")


def time_input_pipeline(data_dir: Path, batch: int, image_size: int, augment: bool) -> Measurement:
    """Images/s of make_dataset(training=True) over passes that last INPUT_MIN_SECONDS, after one that fills
    its cache."""
    train = TrainParams()
    dataset = make_dataset(data_dir, "train", batch, training=True, flip_lr=augment and train.flip_lr,
                           flip_ud=augment and train.flip_ud, contrast_aug=augment and train.contrast_aug,
                           seed=Params().base.seed)
    for _ in dataset:  # the first pass reads the files into the cache
        pass
    images, passes = 0, 0
    start, cpu_start = time.perf_counter(), cpu_time()
    while passes == 0 or time.perf_counter() - start < INPUT_MIN_SECONDS:
        for lightness, _ab in dataset:
            images += int(lightness.shape[0])
        passes += 1
    seconds, cpu_seconds = time.perf_counter() - start, cpu_time() - cpu_start
    variant = INPUT_VARIANTS[0] if augment else INPUT_VARIANTS[1]
    what = "flips and contrast variants as in training" if augment else "shuffle and batch only"
    return Measurement("input", variant=variant, image_size=image_size, batch=batch, items=images,
                       seconds=seconds, cpu_seconds=cpu_seconds, images_per_s=images / seconds,
                       note=f"passes over the cache: {passes}; {what}")


def peak_memory_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def time_colorize(folder: Path, image_size: int, width: float, precision: str) -> Measurement:
    """`colorize_paths` on COLORIZE_PHOTOS photos with a freshly built (untrained) U-Net of this size."""
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(precision)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "generator.keras"
    build_generator(image_size, width).save(model_path)
    for name, count in (("warmup", 1), ("photos", COLORIZE_PHOTOS)):
        for i, rgb in enumerate(real_crops(count, COLORIZE_SIDE, seed=PHOTO_SEED + 1)):
            path = folder / name / f"photo{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).convert("L").save(path, quality=Params().images.jpeg_quality)  # old gray photos
    # One photo first, untimed: pays the process's one-time costs (library set-up, first graph tracing).
    colorize_paths([folder / "warmup"], out_dir=folder / "out-warmup", model=str(model_path))
    start, cpu_start = time.perf_counter(), cpu_time()
    report = colorize_paths([folder / "photos"], out_dir=folder / "out", model=str(model_path))
    seconds, cpu_seconds = time.perf_counter() - start, cpu_time() - cpu_start
    if report.failed:
        raise ChromalabError(f"colorize failed on {len(report.failed)} bench photo(s): {report.failed[0][1]}")
    megapixels = COLORIZE_SIDE**2 / 1e6
    return Measurement("colorize", variant=f"{megapixels:.3g} MP gray photos", image_size=image_size,
                       width=width, precision=precision, items=len(report.done), seconds=seconds,
                       cpu_seconds=cpu_seconds, images_per_s=len(report.done) / seconds,
                       note=f"one call, model load included; untrained U-Net; {_model_threads()}; peak memory "
                            f"of the bench process so far {peak_memory_bytes() / 2**30:.2f} GiB")


def _model_threads() -> str:
    """How many threads TensorFlow gives an operation here (colorize sets it only in a fresh process)."""
    if keras.backend.backend() != "tensorflow":
        return f"{keras.backend.backend()} backend"
    import tensorflow as tf

    threads = tf.config.threading.get_intra_op_parallelism_threads()
    return f"model on {threads} TensorFlow thread(s)" if threads else "model on TensorFlow's default threads"
