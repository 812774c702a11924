"""Differentiable augmentation for the discriminator (Zhao et al. 2020, "DiffAugment"): translation and cutout.

With 1,000–2,000 photos a PatchGAN learns the training pairs by heart and its gradient to the generator
turns into noise. DiffAugment shows it every pair, real and fake alike, shifted and with a square cut out;
both are differentiable (the fake's gradient flows back through them to the generator), so nothing but
the discriminator's view changes. Policy "translation,cutout" of the paper: shifts up to 1/8 of the size
(zero-filled), one square of half the size set to zero. Each image draws its own, on every call in training.

Pure `keras.ops` with a Keras SeedGenerator, so it runs under TensorFlow and JAX, and its random state is a
variable of the discriminator (checkpointed, and threaded through JAX's stateless calls).
"""

from __future__ import annotations

import keras
from keras import ops

TRANSLATION_RATIO = 0.125  # the paper's
CUTOUT_RATIO = 0.5  # the paper's


class DiffAugment(keras.layers.Layer):
    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        if not training:
            return images
        return _cutout(_translate(images, self.seed_generator), self.seed_generator)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}


def _shift_matrices(batch, size: int, max_shift: int, seed_generator):
    """[B, size, size] one-hot matrices M with (M @ x)[i] = x[i - shift], zero where that falls outside."""
    shift = keras.random.randint((batch, 1, 1), -max_shift, max_shift + 1, seed=seed_generator)
    rows = ops.arange(size)[None, :, None]
    cols = ops.arange(size)[None, None, :]
    return ops.cast(ops.equal(cols, rows - shift), "float32")


def _translate(images, seed_generator):
    """Each image shifted by up to TRANSLATION_RATIO of its size along each axis, zero-filled."""
    dtype = images.dtype
    height, width = images.shape[1], images.shape[2]
    batch = ops.shape(images)[0]
    x = ops.cast(images, "float32")
    down = _shift_matrices(batch, height, max(1, int(height * TRANSLATION_RATIO)), seed_generator)
    right = _shift_matrices(batch, width, max(1, int(width * TRANSLATION_RATIO)), seed_generator)
    x = ops.einsum("bij,bjwc->biwc", down, x)
    x = ops.einsum("bkw,bhwc->bhkc", right, x)
    return ops.cast(x, dtype)


def _cutout(images, seed_generator):
    """Each image with one square of CUTOUT_RATIO of its size set to zero, centred anywhere in it."""
    height, width = images.shape[1], images.shape[2]
    batch = ops.shape(images)[0]
    half_h, half_w = int(height * CUTOUT_RATIO) // 2, int(width * CUTOUT_RATIO) // 2
    centre_y = keras.random.randint((batch, 1, 1, 1), 0, height, seed=seed_generator)
    centre_x = keras.random.randint((batch, 1, 1, 1), 0, width, seed=seed_generator)
    ys = ops.arange(height)[None, :, None, None]
    xs = ops.arange(width)[None, None, :, None]
    inside = ops.logical_and(ops.abs(ys - centre_y) < half_h, ops.abs(xs - centre_x) < half_w)
    return images * ops.cast(ops.logical_not(inside), images.dtype)
