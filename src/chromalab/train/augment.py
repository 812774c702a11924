"""The training augmentation, written once in keras.ops: the tf.data input runs it under TensorFlow, the JAX
input on the device. Its randomness is all in `draws` (chromalab.train.epochs.epoch_plan), so both backends
produce the very same batches for the same params."""

from __future__ import annotations

from keras import ops

from chromalab.train.epochs import Augment


def augment_batch(l_stack, ab, draws, augment: Augment):
    """(L stack [B,S,S,C], ab [B,S,S,2], draws int32 [B,3]) → (L [B,S,S,1], ab [B,S,S,2]) float32.

    Row b trains on L channel draws[b, 0] (the original or one of its contrast variants), flipped left-right
    if draws[b, 1] and up-down if draws[b, 2]; ab is flipped with its L, always.
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
    return image[..., :1], image[..., 1:]
