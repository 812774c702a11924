"""The order training sees the photos in: a function of (seed, epoch) alone, on every backend.

A run resumed at epoch e therefore sees exactly the batches an uninterrupted run would have, and the
augmentation of step s of epoch e is drawn from (seed, e, s) alone for the same reason. Both inputs use this
module: tf.data (chromalab.tfrecords.make_dataset) and the JAX on-device feed (chromalab.device_data).
"""

from __future__ import annotations

import numpy as np


def epoch_order(seed: int, epoch: int, n_photos: int) -> np.ndarray:
    """The order of the `n_photos` training photos in epoch `epoch` (0-based, as Keras counts)."""
    return np.random.default_rng([seed, epoch]).permutation(n_photos)


def steps_per_epoch(n_photos: int, batch_size: int) -> int:
    """Training batches per epoch: the partial last batch is dropped, unless that would leave none."""
    return max(n_photos // batch_size, 1)
