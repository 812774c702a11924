"""What training sees in each epoch: a function of (seed, epoch) alone, the same on every backend.

Epoch e visits the photos in `epoch_order(seed, e, n)`, and the photo at position p of that order gets
the augmentation drawn for position p from the same generator. A run resumed at epoch e therefore sees
exactly the batches an uninterrupted run would have, and TensorFlow and JAX train on the very same batches
(chromalab.train.input applies the draws with chromalab.train.augment on both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augment:
    """What may be drawn: one of `n_choices` L channels (1 = the original only), and which flips."""

    n_choices: int
    flip_lr: bool
    flip_ud: bool


def _generator(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def epoch_order(seed: int, epoch: int, n_photos: int) -> np.ndarray:
    """The order of the `n_photos` training photos in epoch `epoch` (0-based, as Keras counts)."""
    return _generator(seed, epoch).permutation(n_photos)


def steps_per_epoch(n_photos: int, batch_size: int) -> int:
    """Training batches per epoch: the partial last batch is dropped, unless that would leave none."""
    return max(n_photos // batch_size, 1)


def epoch_plan(seed: int, epoch: int, n_photos: int, batch_size: int, augment: Augment) -> tuple[np.ndarray, np.ndarray]:
    """Epoch `epoch` as (photo indices int32 [steps, B], draws int32 [steps, B, 3]).

    Each photo's draws: the L channel it trains on, a left-right and an up-down flip (0 where that flip
    is off). Fewer photos than a batch make one smaller batch.
    """
    rng = _generator(seed, epoch)
    order = rng.permutation(n_photos)  # first, so that the order is epoch_order's
    draws = np.stack([rng.integers(augment.n_choices, size=n_photos),
                      rng.integers(2, size=n_photos) * augment.flip_lr,
                      rng.integers(2, size=n_photos) * augment.flip_ud], axis=-1)
    batch = min(batch_size, n_photos)
    used = steps_per_epoch(n_photos, batch_size) * batch
    return (order[:used].reshape(-1, batch).astype(np.int32),
            draws[:used].reshape(-1, batch, 3).astype(np.int32))
