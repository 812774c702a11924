"""`chromalab bench`: how fast the pipeline runs on this device, and how much of the device it uses.

Measured, each on its own (a JSON report plus a table):
- `gan`, `baseline`: training throughput of one pix2pix step / one baseline step on synthetic batches held
  in memory, at the chosen image size, width, precision and batch sizes. The first WARMUP_STEPS steps
  (tracing, XLA compilation, optimizer slots) are not timed; the clock stops only once the last step's
  losses have been computed (on JAX, work is asynchronous: the logs are read back, which waits for them).
  Model FLOPs utilisation = FLOPs per image (from the layer shapes: chromalab.models) × images/s ÷ the
  device's peak, taken from PEAK_TFLOPS for known GPUs or given with `peak_tflops`; none on a CPU.
- `loop`: beside each `gan` / `baseline` step row, real training at the same settings, on the step row's
  model (built once for both): `fit` on TFRecords with training's own input (JAX: the split on the device;
  TensorFlow: tf.data), augmentation and epoch boundaries included, timed the same way over the same
  number of steps. Its note gives loop/step: what the input costs. The records are the bench's own
  photos, or `records` (e.g. the pipeline's data/tfrecords).
  Beside chromalab's GAN step, on TensorFlow, the same run times the yardstick: the TensorFlow pix2pix
  tutorial's step (two GradientTapes in one tf.function, two Adams, the same generator and discriminator),
  and the GAN row gives chromalab's speed as a ratio of it (`reference_ratio`, ≥ 1: at least as fast).
  The arithmetic is the same; chromalab's step is faster on a CPU because its Adam updates each variable in
  one fused kernel (chromalab.optimizers.FusedAdam) where Keras' Adam makes ~10 passes over 57 M parameters.
  The two alternate for TIMING_ROUNDS rounds and each keeps its fastest round, so that other work on a
  shared machine slows neither more than the other.
- `tfrecords`: the tfrecords stage (`run_tfrecords`) on BENCH_PHOTOS real photographs at the chosen size.
- `input`: the training input pipeline (`make_dataset(..., training=True)`) from those records once its
  cache is filled, with the training augmentations and without.
- `colorize`: `chromalab colorize` on COLORIZE_PHOTOS photos of COLORIZE_SIDE px, model load included.

Each row also has the CPU time spent meanwhile (this process's threads and finished child processes):
CPU ms per image says how many cores a rate needs, e.g. to feed a GPU from the input pipeline.

Needs TensorFlow only for `input` (tf.data): under KERAS_BACKEND=jax it never imports TensorFlow, reports
`input` as skipped, and the loop rows time JAX's own input instead.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
from PIL import Image
from tqdm import tqdm

from chromalab import __version__
from chromalab.colorize import colorize_paths, limit_model_threads
from chromalab.config import BaselineParams, GanParams, Params, TrainParams
from chromalab.devices import available_cores, gpu_names
from chromalab.errors import ChromalabError
from chromalab.models import (baseline_train_step_flops, build_discriminator, build_generator,
                              gan_train_step_flops)
from chromalab.samples import real_crops, write_images_stage
from chromalab.tfrecords import make_dataset, read_dataset_info, run_tfrecords
from chromalab.training import build_for_training

PARTS = ("gan", "baseline", "loop", "input", "tfrecords", "colorize")
TRAINING_PARTS = ("gan", "baseline")
NEEDS_TENSORFLOW = ("input",)  # tf.data; the rest is pure Keras and chromalab.records
LOOP = "loop"  # the variant of a training row that times real training, input included
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
INPUT_VARIANTS = ("augmented", "no augmentation")
REPORT_FORMAT = 1
TABLE_MIN_WIDTH = 150  # rich assumes 80 columns when not on a terminal: too narrow for the table

WARMUP_STEPS = 2  # step 1 traces and compiles; step 2 can still retrace once the optimizer has its slots
TIMING_ROUNDS = 2  # chromalab's GAN step and the reference alternate; each keeps its fastest round
REFERENCE_VARIANT = "reference"
BENCH_PHOTOS = 64  # training photos in the bench's TFRecords
BENCH_TEST_PHOTOS = 4  # the stage needs a test split too
INPUT_MIN_SECONDS = 3.0  # whole passes over the cached records are timed until this much time has passed
COLORIZE_PHOTOS = 8
COLORIZE_SIDE = 3464  # photos colourised at full resolution: 12 megapixels each, as from a phone
PHOTO_SEED = 0  # crops of scikit-image's bundled photos (chromalab.samples) are the bench's photos


@dataclass(frozen=True)
class GpuPeak:
    """Dense tensor-core peaks from NVIDIA's data sheets, TFLOP/s (sparsity would double them)."""

    pattern: str  # regular expression matched against the device name; the first match wins
    model: str
    bfloat16: float | None  # None: no bfloat16 tensor cores (Volta, Turing)
    float16: float
    float32: float  # TF32 tensor cores where the GPU has them (TensorFlow and XLA use them for float32
    #                 by default), plain FP32 on Volta and Turing


PEAK_TFLOPS = (
    GpuPeak(r"H100.*PCIe", "H100 PCIe", 756.0, 756.0, 378.0),
    GpuPeak(r"H[12]00.*NVL", "H100/H200 NVL", 835.5, 835.5, 417.5),
    GpuPeak(r"H100|H200", "H100/H200 SXM", 989.4, 989.4, 494.7),
    GpuPeak(r"A100", "A100", 312.0, 312.0, 156.0),
    GpuPeak(r"\bL4\b", "L4", 121.0, 121.0, 60.0),
    GpuPeak(r"\bT4\b", "T4", None, 65.0, 8.1),
    GpuPeak(r"V100", "V100 SXM2", None, 125.0, 15.7),
)
PEAK_FIELD = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


@dataclass
class Measurement:
    """One row of the report. `items` images (or photos) went through in `seconds` of timed work."""

    part: str
    variant: str = ""
    status: str = "ok"  # "ok" or "skipped"
    note: str = ""
    image_size: int | None = None
    batch: int | None = None
    width: float | None = None
    precision: str | None = None
    xla: bool | None = None
    items: int | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None  # CPU time meanwhile: this process's threads and finished children
    s_per_step: float | None = None
    images_per_s: float | None = None
    gflops_per_image: float | None = None
    tflops_per_s: float | None = None
    utilisation: float | None = None  # fraction of the peak; None where no peak is known
    reference_ratio: float | None = None  # GAN row: its images/s ÷ the reference step's, same run


@dataclass(frozen=True)
class Device:
    """What the training steps run on, and the peak their utilisation is measured against."""

    name: str
    accelerator: str  # "gpu" or "cpu"
    peak_tflops: float | None
    peak_source: str


# --- device ----------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The processor's model name (Linux reports it in /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spec_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """(dense peak TFLOP/s, which GPU) of a known GPU at this precision; None for anything else."""
    for peak in PEAK_TFLOPS:
        if re.search(peak.pattern, device_name):
            value = getattr(peak, PEAK_FIELD[precision])
            return None if value is None else (value, peak.model)
    return None


def detect_device(precision: str, peak_tflops: float | None) -> Device:
    """The backend's device; its peak is the one given, else a known GPU's spec at this precision, else none."""
    gpus = gpu_names()
    name = ", ".join(gpus) if gpus else cpu_name()
    accelerator = "gpu" if gpus else "cpu"
    if peak_tflops is not None:
        return Device(name, accelerator, peak_tflops, "given (--peak-tflops)")
    known = spec_peak(gpus[0], precision) if gpus else None
    if known is None:
        why = f"no {PEAK_FIELD[precision]} peak known for this GPU" if gpus else "CPU"
        return Device(name, accelerator, None, f"none ({why}): pass --peak-tflops")
    value, model = known
    return Device(name, accelerator, value, f"NVIDIA spec, {model} dense {PEAK_FIELD[precision]}")


def utilisation(flops_per_image: float, images_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: the fraction of the peak that the model's own arithmetic uses."""
    if peak_tflops is None:
        return None
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


# --- training steps --------------------------------------------------------------------------------------


def cpu_time() -> float:
    """CPU seconds used so far by this process (every thread) and by its children that have exited."""
    children = os.times()  # children's times appear once they are reaped; process_time has finer resolution
    return time.process_time() + children.children_user + children.children_system


class _StepClock(keras.callbacks.Callback):
    """(wall-clock, CPU) time at the end of two chosen steps, once their results exist."""

    def __init__(self, marks: tuple[int, int]):
        super().__init__()
        self.marks = marks
        self.times: dict[int, tuple[float, float]] = {}

    def on_train_batch_end(self, batch, logs=None):
        if batch in self.marks:
            # Reading the losses back waits for the step's device work (JAX and GPUs run ahead of Python).
            for value in (logs or {}).values():
                float(value)
            self.times[batch] = time.perf_counter(), cpu_time()


def synthetic_batch(batch: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random (L in [0, 1] [B,S,S,1], ab in [-1, 1] [B,S,S,2]) float32: the shapes and ranges of real data."""
    rng = np.random.default_rng(seed)
    lightness = rng.random((batch, image_size, image_size, 1), dtype=np.float32)
    ab = rng.uniform(-1.0, 1.0, (batch, image_size, image_size, 2)).astype(np.float32)
    return lightness, ab


def _fed(data: tuple[np.ndarray, np.ndarray], n_steps: int):
    """The batch `n_steps` times, as training feeds fit. On TensorFlow that is a tf.data pipeline of batches
    of a fixed size (tfrecords.make_dataset drops the partial one): fed from a Python generator instead,
    the step is traced for batches of unknown size, and runs ~20 % slower on a CPU (the 0.74-0.82x of
    issue 12). JAX, which may run without TensorFlow here, gets a generator; it compiles for fixed shapes."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.data.Dataset.from_tensors(data).repeat(n_steps)
    return (data for _ in range(n_steps))


@functools.cache
def step_flops(part: str, image_size: int, width: float) -> int:
    """FLOPs per image of a `part` training step, counted once per size: counting builds the nets (their
    weights too), which the step row and the loop row would otherwise each pay at every batch size."""
    return (gan_train_step_flops if part == "gan" else baseline_train_step_flops)(image_size, width)


def _timed_fit(model: keras.Model, data: tuple[np.ndarray, np.ndarray], steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `steps` fit steps after WARMUP_STEPS untimed ones: how `chromalab train` steps."""
    n_steps = WARMUP_STEPS + steps
    clock = _StepClock((WARMUP_STEPS - 1, n_steps - 1))
    # One in-memory batch, fed again every step: the step is measured, not the input pipeline.
    model.fit(_fed(data, n_steps), steps_per_epoch=n_steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[clock])
    (start, cpu_start), (end, cpu_end) = clock.times[WARMUP_STEPS - 1], clock.times[n_steps - 1]
    return end - start, cpu_end - cpu_start


def reference_gan_step(image_size: int, width: float, jit_compile: bool):
    """The TensorFlow pix2pix tutorial's train step, as the yardstick for chromalab's: two GradientTapes in
    one tf.function, one Adam(2e-4, β1 = 0.5) per net, λ = 100, on chromalab's generator and discriminator.
    Returns step(L, ab) → (generator loss, discriminator loss)."""
    import tensorflow as tf

    p = GanParams(width=width)
    generator, discriminator = build_generator(image_size, width), build_discriminator(image_size, width)
    g_optimizer = keras.optimizers.Adam(p.learning_rate, beta_1=p.beta_1)
    d_optimizer = keras.optimizers.Adam(p.learning_rate, beta_1=p.beta_1)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    @tf.function(jit_compile=jit_compile)
    def step(lightness, ab):
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake_ab = generator(lightness, training=True)
            real_logits = discriminator([lightness, ab], training=True)
            fake_logits = discriminator([lightness, fake_ab], training=True)
            l1 = tf.reduce_mean(tf.abs(ab - tf.cast(fake_ab, ab.dtype)))
            g_loss = bce(tf.ones_like(fake_logits), fake_logits) + p.l1_lambda * l1
            d_loss = bce(tf.ones_like(real_logits), real_logits) + bce(tf.zeros_like(fake_logits), fake_logits)
        g_vars, d_vars = generator.trainable_variables, discriminator.trainable_variables
        g_optimizer.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars))
        d_optimizer.apply_gradients(zip(d_tape.gradient(d_loss, d_vars), d_vars))
        return g_loss, d_loss

    return step


def _timed_calls(step, data: tuple[np.ndarray, np.ndarray], steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `steps` calls of a tf.function step after WARMUP_STEPS untimed ones."""
    import tensorflow as tf

    tensors = tuple(tf.constant(x) for x in data)
    for _ in range(WARMUP_STEPS):
        float(step(*tensors)[0])
    start, cpu_start = time.perf_counter(), cpu_time()
    for _ in range(steps):
        losses = step(*tensors)
    float(losses[0])  # waits for the last step
    return time.perf_counter() - start, cpu_time() - cpu_start


def _reference_skipped(precision: str) -> str | None:
    if keras.backend.backend() != "tensorflow":
        return "the reference is TensorFlow's tutorial step: compare with a run on the TensorFlow backend"
    if precision == "mixed_float16":
        return "the tutorial step has no float16 loss scaling"
    return None


def training_model(part: str, *, image_size: int, width: float, precision: str, jit_compile: bool) -> keras.Model:
    """`part`'s model as `chromalab train` builds and compiles it, in a fresh session under `precision`."""
    keras.backend.clear_session()  # frees the previous model; it also resets the dtype policy
    keras.mixed_precision.set_global_policy(precision)
    params = Params(gan=GanParams(width=width), baseline=BaselineParams(width=width))
    return build_for_training(part, params, image_size, jit_compile)


def time_training_step(part: str, *, image_size: int, batch: int, width: float, precision: str, steps: int,
                       jit_compile: bool, peak_tflops: float | None,
                       model: keras.Model | None = None) -> list[Measurement]:
    """Images/s of `steps` training steps of `part` ("gan" | "baseline") after WARMUP_STEPS untimed ones;
    for the GAN also the reference step's row, timed alternately with it (TIMING_ROUNDS rounds).
    `model`: one from training_model at these settings (default: a new one)."""
    row = Measurement(part, image_size=image_size, batch=batch, width=width, precision=precision,
                      xla=jit_compile)
    flops = step_flops(part, image_size, width)
    if model is None:
        model = training_model(part, image_size=image_size, width=width, precision=precision,
                               jit_compile=jit_compile)
    data = synthetic_batch(batch, image_size)
    rows = [row]
    reference, skipped = None, _reference_skipped(precision) if part == "gan" else None
    if part == "gan":
        rows.append(Measurement(part, variant=REFERENCE_VARIANT, image_size=image_size, batch=batch, width=width,
                                precision=precision, xla=jit_compile))
        if skipped is None:
            reference = reference_gan_step(image_size, width, jit_compile)
        else:
            rows[1].status, rows[1].note = "skipped", skipped
    timings: list[list[tuple[float, float]]] = [[], []]
    for _ in range(TIMING_ROUNDS if reference is not None else 1):
        timings[0].append(_timed_fit(model, data, steps))
        if reference is not None:
            timings[1].append(_timed_calls(reference, data, steps))
    for measured, times in zip(rows, timings):
        if not times:
            continue
        seconds, cpu_seconds = min(times)
        measured.items, measured.seconds, measured.cpu_seconds = steps * batch, seconds, cpu_seconds
        measured.s_per_step = seconds / steps
        measured.images_per_s = measured.items / seconds
        measured.gflops_per_image = flops / 1e9
        measured.tflops_per_s = flops * measured.images_per_s / 1e12
        measured.utilisation = utilisation(flops, measured.images_per_s, peak_tflops)
    if reference is not None:
        row.reference_ratio = row.images_per_s / rows[1].images_per_s
        rows[1].note = "TensorFlow tutorial pix2pix step (two tapes, two Keras Adams), same nets: the yardstick"
    return rows


class _LoopClock(_StepClock):
    """_StepClock counting steps across epochs: a loop's timed steps may span several."""

    seen = 0

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(self.seen, logs)
        self.seen += 1


def time_training_loop(part: str, records: Path, *, image_size: int, batch: int, width: float, precision: str,
                       steps: int, jit_compile: bool, peak_tflops: float | None,
                       step_row: Measurement | None = None, model: keras.Model | None = None) -> Measurement:
    """Images/s of `fit` on `records` with training's input, over WARMUP_STEPS + `steps` steps. `model`: the
    step row's (same settings), so that the model is built, and on TensorFlow traced, once for both."""
    from chromalab.device_data import training_input
    from chromalab.epochs import steps_per_epoch

    row = Measurement(part, variant=LOOP, image_size=image_size, batch=batch, width=width, precision=precision,
                      xla=jit_compile)
    info = read_dataset_info(records)
    n_train = int(info["counts"]["train"])
    if int(info["image_size"]) != image_size or n_train < batch:
        row.status = "skipped"
        row.note = f"{records} holds {n_train} photos of {info['image_size']} px: need >= {batch} of {image_size} px"
        return row
    flops = step_flops(part, image_size, width)
    params = Params(gan=GanParams(width=width), baseline=BaselineParams(width=width))
    if model is None:
        model = training_model(part, image_size=image_size, width=width, precision=precision,
                               jit_compile=jit_compile)
    n_steps = WARMUP_STEPS + steps
    per_epoch = steps_per_epoch(n_train, batch)
    epochs = -(-n_steps // per_epoch)
    data = training_input(records, batch, params.train, params.base.seed, epochs=epochs)
    data.prepare(model)
    if data.feed is not None:  # JAX: the feed has wrapped train_step; a step traced before lacks its input
        model.train_function = None
    clock = _LoopClock((WARMUP_STEPS - 1, n_steps - 1))
    model.fit(data.train, epochs=epochs, steps_per_epoch=per_epoch, verbose=0, shuffle=False, callbacks=[clock])
    (start, cpu_start), (end, cpu_end) = clock.times[WARMUP_STEPS - 1], clock.times[n_steps - 1]
    seconds = end - start
    row.items, row.seconds, row.cpu_seconds = steps * batch, seconds, cpu_end - cpu_start
    row.s_per_step, row.images_per_s = seconds / steps, steps * batch / seconds
    row.gflops_per_image, row.tflops_per_s = flops / 1e9, flops * row.images_per_s / 1e12
    row.utilisation = utilisation(flops, row.images_per_s, peak_tflops)
    ratio = f"loop/step {row.images_per_s / step_row.images_per_s:.2f}; " if step_row and step_row.images_per_s else ""
    row.note = f"{ratio}fit on {n_train} photos' records, {per_epoch} steps/epoch"
    return row


# --- photos, TFRecords, input pipeline, colorize -----------------------------------------------------------


def time_tfrecords_stage(images_dir: Path, out_dir: Path, image_size: int, n_train: int | None = None) -> Measurement:
    """Photos/s of the whole tfrecords stage (one worker process per core) on the photos in `images_dir`."""
    n_photos = (n_train or BENCH_PHOTOS) + BENCH_TEST_PHOTOS
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


# --- report ----------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "chromalab": __version__}
    for module in ("keras", "numpy", "tensorflow", "jax", "jaxlib"):
        if module in sys.modules:
            versions[module] = getattr(sys.modules[module], "__version__", "unknown")
    return versions


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_table(rows: list[Measurement]):
    """The rows as a rich Table; utilisation shows "n/a" where no device peak is known. Notes go below it."""
    from rich.table import Table

    table = Table(title="chromalab bench", caption_justify="left")
    columns = ("part", "variant", "size", "batch", "width", "precision", "xla", "img/s", "vs ref", "s/step",
               "CPU ms/img", "GFLOP/img", "TFLOP/s", "util")
    for column in columns:
        table.add_column(column, justify="left" if column in ("part", "variant", "precision") else "right")
    notes = []
    for r in rows:
        if r.status != "ok":
            table.add_row(r.part, r.variant, *[""] * 11, "skipped")
        else:
            util = "" if r.part not in TRAINING_PARTS else "n/a" if r.utilisation is None else f"{r.utilisation:.1%}"
            cpu_ms = None if r.cpu_seconds is None else 1000 * r.cpu_seconds / r.items
            table.add_row(r.part, r.variant, _cell(r.image_size), _cell(r.batch), _cell(r.width), _cell(r.precision),
                          _cell(r.xla), _cell(r.images_per_s),
                          "" if r.reference_ratio is None else f"{r.reference_ratio:.2f}x", _cell(r.s_per_step), _cell(cpu_ms),
                          _cell(r.gflops_per_image), _cell(r.tflops_per_s), util)
        if r.note:
            notes.append(f"{' '.join(x for x in (r.part, r.variant) if x)}: {r.note}")
    table.caption = "\n".join(notes) or None
    return table


def _check_options(out: Path, image_size: int, batches: list[int], width: float, precision: str, steps: int,
                   only: Sequence[str] | None, peak_tflops: float | None, records: Path | None = None) -> list[str]:
    """The parts to measure, in PARTS order, once every option is known to be usable."""
    if out.is_dir():
        raise ChromalabError(f"--out {out} is a folder: give the JSON file to write, e.g. {out / 'report.json'}")
    if precision not in PRECISIONS:
        raise ChromalabError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not batches or any(not isinstance(b, int) or b < 1 for b in batches):
        raise ChromalabError(f"batch sizes must be integers >= 1, got {batches!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ChromalabError(f"steps must be an integer >= 1, got {steps!r}")
    if peak_tflops is not None and not peak_tflops > 0:
        raise ChromalabError(f"--peak-tflops must be a positive number of TFLOP/s, got {peak_tflops!r}")
    if not (isinstance(width, (int, float)) and width > 0):
        raise ChromalabError(f"width must be a positive number (1.0 = the paper), got {width!r}")
    if not (isinstance(image_size, int) and image_size >= 32 and image_size & (image_size - 1) == 0):
        raise ChromalabError(f"image size must be a power of two >= 32 (the U-Net halves it down to 1 px), "
                             f"got {image_size!r}")
    unknown = sorted(set(only or ()) - set(PARTS))
    if unknown:
        raise ChromalabError(f"--only {', '.join(unknown)}: choose among {', '.join(PARTS)}")
    if records is not None:
        from chromalab.tfrecords import read_dataset_info as check_records

        check_records(records)
    return [part for part in PARTS if not only or part in only]


def _measurements(parts: list[str], *, image_size: int, batches: list[int], width: float, precision: str,
                  steps: int, jit_compile: bool, peak_tflops: float | None,
                  records: Path | None = None) -> Iterator[Measurement]:
    """Each planned measurement's row, one at a time (training steps, each with its loop, then the data parts)."""
    models = [p for p in parts if p in TRAINING_PARTS] or (list(TRAINING_PARTS) if LOOP in parts else [])
    with tempfile.TemporaryDirectory(prefix="chromalab-bench-") as tmp:
        work = Path(tmp)
        stage = None
        own_records = "tfrecords" in parts or (records is None and (LOOP in parts or "input" in parts))
        if own_records:  # timed here, reported in its place below; the loop and input rows read these records
            n_train = max([BENCH_PHOTOS] + (batches if LOOP in parts else []))
            images_dir = write_images_stage(work / "images", n_train, BENCH_TEST_PHOTOS, image_size,
                                            seed=PHOTO_SEED, quality=Params().images.jpeg_quality)
            stage = time_tfrecords_stage(images_dir, work / "tfrecords", image_size, n_train)
        records = records or work / "tfrecords"
        for part in models:
            for batch in batches:
                model = training_model(part, image_size=image_size, width=width, precision=precision,
                                       jit_compile=jit_compile)  # one for the step and the loop rows
                step, *reference = time_training_step(part, image_size=image_size, batch=batch, width=width,
                                                      precision=precision, steps=steps, jit_compile=jit_compile,
                                                      peak_tflops=peak_tflops, model=model)
                yield step
                yield from reference
                if LOOP in parts:
                    yield time_training_loop(part, records, image_size=image_size, batch=batch, width=width,
                                             precision=precision, steps=steps, jit_compile=jit_compile,
                                             peak_tflops=peak_tflops, step_row=step, model=model)
        if "tfrecords" in parts:
            yield stage
        if "input" in parts:
            for augment in (True, False):
                if keras.backend.backend() != "tensorflow":  # tf.data is the TensorFlow backend's input
                    yield Measurement("input", variant=INPUT_VARIANTS[0] if augment else INPUT_VARIANTS[1],
                                      status="skipped", note="tf.data input of the TensorFlow backend; under "
                                      f"{keras.backend.backend()} the loop rows time training's own input")
                else:
                    yield time_input_pipeline(records, max(batches), image_size, augment)
        if "colorize" in parts:
            yield time_colorize(work / "colorize", image_size, width, precision)


def run_bench(out: Path = Path("bench/report.json"), image_size: int = 256, batches: Sequence[int] = (1, 8),
              width: float = 1.0, precision: str = "float32", steps: int = 5, only: Sequence[str] | None = None,
              peak_tflops: float | None = None, *, xla: bool | None = None, records: Path | None = None) -> dict:
    """Measure the requested parts (all of PARTS by default); write the JSON report to `out`, print a table.

    Training steps run at every batch size in `batches`; the input pipeline at the largest. `xla`: compile
    the training steps with XLA; by default on a GPU only (on a CPU it adds compile time and no speed). The
    JAX backend always compiles. `records`: TFRecords (a tfrecords stage's folder) for the loop rows instead
    of the bench's own few photos. The report is rewritten after every measurement, so an interrupted run
    keeps what it finished. Returns the report.
    """
    out, batches = Path(out), list(batches)
    parts = _check_options(out, image_size, batches, width, precision, steps, only, peak_tflops, records)
    if parts == ["colorize"]:  # as `chromalab colorize` does before its first TensorFlow operation
        limit_model_threads(available_cores())
    device = detect_device(precision, peak_tflops)
    jit_compile = True if keras.backend.backend() == "jax" else (device.accelerator == "gpu" if xla is None else xla)
    report = {
        "format": REPORT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {**asdict(device), "cpu": cpu_name(), "cpu_cores": available_cores(),
                   "load_average_1m": os.getloadavg()[0]},  # other work on a shared machine slows the bench
        "backend": keras.backend.backend(),
        "versions": _versions(),
        "settings": {"image_size": image_size, "batches": batches, "width": width, "precision": precision,
                     "steps": steps, "warmup_steps": WARMUP_STEPS, "xla": jit_compile, "parts": parts},
        "rows": [],
    }
    rows: list[Measurement] = []
    n_models = len([p for p in parts if p in TRAINING_PARTS]) or (len(TRAINING_PARTS) if LOOP in parts else 0)
    n_gan = 1 if "gan" in parts or (LOOP in parts and not [p for p in parts if p in TRAINING_PARTS]) else 0
    planned = (n_models * (2 if LOOP in parts else 1) + n_gan) * len(batches) + sum(
        len(INPUT_VARIANTS) if p == "input" else 1 for p in parts if p in ("input", "tfrecords", "colorize"))
    previous_policy = keras.mixed_precision.global_policy()
    try:
        with tqdm(total=planned, desc="bench", unit="measurement") as progress:
            for row in _measurements(parts, image_size=image_size, batches=batches, width=width,
                                     precision=precision, steps=steps, jit_compile=jit_compile,
                                     peak_tflops=device.peak_tflops, records=records):
                rows.append(row)
                report["rows"] = [asdict(r) for r in rows]
                report["versions"] = _versions()  # TensorFlow may have been imported since
                _write_json(out, report)
                what = " ".join(str(x) for x in (row.part, row.variant, row.batch and f"batch {row.batch}") if x)
                rate = f"{row.images_per_s:.3g} img/s" if row.status == "ok" else "skipped"
                if row.reference_ratio is not None:
                    rate += f", {row.reference_ratio:.2f}x the reference step"
                progress.write(f"bench: {what}: {rate}", file=sys.stderr)
                progress.update()
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    from rich.console import Console

    Console(width=max(Console().width, TABLE_MIN_WIDTH)).print(render_table(rows))
    peak = "n/a" if device.peak_tflops is None else f"{device.peak_tflops:g} TFLOP/s"
    print(f"device: {device.name} ({report['backend']}); peak {peak} [{device.peak_source}]; report: {out}")
    return report
