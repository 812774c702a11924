"""The training rows: chromalab's training step, the TensorFlow tutorial's step beside it, and real training (the loop)
at the same settings, each timed after WARMUP_STEPS untimed steps, with its FLOPs and utilisation."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import keras
import numpy as np

from chromalab.bench.device import utilisation
from chromalab.bench.report import Measurement, cpu_time
from chromalab.config import BaselineParams, GanParams, Params
from chromalab.train.models import (baseline_train_step_flops, build_discriminator, build_generator,
                              gan_train_step_flops)
from chromalab.data.dataset import read_dataset_info
from chromalab.train.build import build_for_training

LOOP = "loop"  # the variant of a training row that times real training, input included
WARMUP_STEPS = 2  # step 1 traces and compiles; step 2 can still retrace once the optimizer has its slots
TIMING_ROUNDS = 2  # chromalab's GAN step and the reference alternate; each keeps its fastest round
REFERENCE_VARIANT = "reference"


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
    of a fixed size (chromalab.train.input drops the partial one): fed from a Python generator instead,
    the step is traced for batches of unknown size, and runs slower on a CPU (README, "Measured figures
    behind the code"). JAX, which may run without TensorFlow here, gets a generator; it compiles for fixed shapes."""
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
    from chromalab.train.input import training_input
    from chromalab.train.epochs import steps_per_epoch

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
