"""`chromalab bench`: how fast the pipeline runs on this device, and how much of the device it uses.

Measured, each on its own (a JSON report plus a table):
- `gan`, `baseline`: training throughput of one pix2pix step / one baseline step on synthetic batches held
  in memory, at the chosen image size, width, precision and batch sizes. The first WARMUP_STEPS steps
  (tracing, XLA compilation, optimizer slots) are not timed; the clock stops only once the last step's
  losses have been computed (on JAX, work is asynchronous: the logs are read back, which waits for them).
  Model FLOPs utilisation = FLOPs per image (from the layer shapes: chromalab.train.models) × images/s ÷ the
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
  one fused kernel (chromalab.train.optimizers.FusedAdam) where Keras' Adam makes ~10 passes over 57 M parameters.
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

The modules: device.py (the device and its peak: PEAK_TFLOPS, utilisation), steps.py (the gan, reference and loop
rows: WARMUP_STEPS, TIMING_ROUNDS), pipeline.py (the tfrecords, input and colorize rows: BENCH_PHOTOS,
COLORIZE_PHOTOS), report.py (Measurement, the JSON report, the table); this one checks the options and runs the plan.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import keras
from tqdm import tqdm

from chromalab.bench.device import PEAK_TFLOPS, Device, GpuPeak, cpu_name, detect_device, spec_peak, utilisation
from chromalab.bench.pipeline import (BENCH_PHOTOS, BENCH_TEST_PHOTOS, BENCH_VAL_PHOTOS, INPUT_VARIANTS, PHOTO_SEED,
                                      time_colorize, time_input_pipeline, time_tfrecords_stage)
from chromalab.bench.report import TRAINING_PARTS, Measurement, library_versions, write_report_json, render_table
from chromalab.bench.steps import LOOP, WARMUP_STEPS, time_training_loop, time_training_step, training_model
from chromalab.colorize import limit_model_threads
from chromalab.config import Params, image_size_problem
from chromalab.devices import available_cores
from chromalab.errors import ChromalabError
from chromalab.bench.samples import write_images_stage

__all__ = ["PARTS", "PEAK_TFLOPS", "PRECISIONS", "Device", "GpuPeak", "Measurement", "detect_device", "render_table",
           "run_bench", "spec_peak", "utilisation"]

PARTS = ("gan", "baseline", "loop", "input", "tfrecords", "colorize")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
REPORT_FORMAT = 1
TABLE_MIN_WIDTH = 150  # rich assumes 80 columns when not on a terminal: too narrow for the table


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
    if image_size_problem(image_size):
        raise ChromalabError(f"image size {image_size_problem(image_size)}")
    unknown = sorted(set(only or ()) - set(PARTS))
    if unknown:
        raise ChromalabError(f"--only {', '.join(unknown)}: choose among {', '.join(PARTS)}")
    if records is not None:
        from chromalab.data.dataset import read_dataset_info as check_records

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
                                            seed=PHOTO_SEED, quality=Params().images.jpeg_quality,
                                            n_val=BENCH_VAL_PHOTOS)
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
        "versions": library_versions(),
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
                report["versions"] = library_versions()  # TensorFlow may have been imported since
                write_report_json(out, report)
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
