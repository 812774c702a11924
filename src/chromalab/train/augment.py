"""The training augmentation, written once in keras.ops: the tf.data input runs it under TensorFlow, the JAX
input on the device. Its randomness is all in `draws` (chromalab.train.epochs.epoch_plan), so both backends
produce the very same batches for the same params."""

from __future__ import annotations

from keras import ops

from chromalab.train.epochs import ZOOM_STEPS, Augment


def augment_batch(l_stack, ab, draws, augment: Augment):
    """(L stack [B,S,S,C], ab [B,S,S,2], draws int32 [B,6]) → (L [B,S,S,1], ab [B,S,S,2]) float32.

    Row b trains on L channel draws[b, 0] (the original or one of its contrast variants), flipped left-right
    if draws[b, 1] and up-down if draws[b, 2], zoomed as draws[b, 3:] say (`zoom_batch`); ab is flipped and
    zoomed with its L, always.
    """
    l_stack, ab = ops.cast(l_stack, "float32"), ops.cast(ab, "float32")
    if augment.n_choices > 1:
        # A one-hot weighted sum picks the channel exactly (x·1 + 0 + …) and keeps the channel axis static.
        pick = ops.one_hot(draws[:, 0], augment.n_choices, dtype="float32")
        lum = ops.sum(l_stack[..., : augment.n_choices] * pick[:, None, None, :], axis=-1, keepdims=True)
    else:
        lum = l_stack[..., :1]
    image = ops.concatenate([lum, ab], axis=-1)  # one tensor, one flip: L and ab always flip together
    for enabled, column, axis in ((augment.flip_lr, 1, 2), (augment.flip_ud, 2, 1)):
        if enabled:
            flip = ops.reshape(draws[:, column] > 0, (-1, 1, 1, 1))
            image = ops.where(flip, ops.flip(image, axis=axis), image)
    if augment.zoom > 0:
        image = zoom_batch(image, draws[:, 3:], augment.zoom)
    return image[..., :1], image[..., 1:]


def zoom_batch(image, draws, zoom: float):
    """Each row of `image` [B,S,S,C] zoomed in by 1 + zoom·draws[b, 0]/ZOOM_STEPS at x, y = draws[b, 1:] (0 = the
    left/top edge, ZOOM_STEPS = the right/bottom), bilinear; the window never leaves the photo.

    pix2pix's random jitter (resize to 286, crop 256) in one resampling: a generator that over-fits a
    thousand photos sees a new framing of each, every epoch.
    """
    size = ops.cast(ops.shape(image)[1], "float32")
    draws = ops.cast(draws, "float32") / ZOOM_STEPS
    shrink = 1 / (1 + zoom * draws[:, 0])  # input pixels per output pixel
    span = (size - 1) * (1 - shrink)  # how far the window can move and stay inside
    x, y, zero = span * draws[:, 1], span * draws[:, 2], ops.zeros_like(shrink)
    # Output pixel (u, v) reads input (shrink·u + x, shrink·v + y): Keras' [a0 a1 a2 b0 b1 b2 c0 c1].
    transform = ops.stack([shrink, zero, x, zero, shrink, y, zero, zero], axis=1)
    return ops.image.affine_transform(image, transform, interpolation="bilinear", fill_mode="nearest")
