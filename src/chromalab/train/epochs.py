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
    """What may be drawn: one of `n_choices` L channels (1 = the original only), which flips, and a zoom into
    the photo by up to `zoom` (0.25 = up to 1.25×, at a random place; 0 = none)."""

    n_choices: int
    flip_lr: bool
    flip_ud: bool
    zoom: float = 0.0


# The zoom's draws (its amount and where it lands) are whole numbers out of this, so that draws stay int32.
ZOOM_STEPS = 1024


def _generator(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def epoch_order(seed: int, epoch: int, n_photos: int) -> np.ndarray:
    """The order of the `n_photos` training photos in epoch `epoch` (0-based, as Keras counts)."""
    return _generator(seed, epoch).permutation(n_photos)


def steps_per_epoch(n_photos: int, batch_size: int) -> int:
    """Training batches per epoch: the partial last batch is dropped, unless that would leave none."""
    return max(n_photos // batch_size, 1)


def epoch_plan(seed: int, epoch: int, n_photos: int, batch_size: int, augment: Augment) -> tuple[np.ndarray, np.ndarray]:
    """Epoch `epoch` as (photo indices int32 [steps, B], draws int32 [steps, B, 6]).

    Each photo's draws: the L channel it trains on, a left-right and an up-down flip (0 where that flip
    is off), then the zoom's amount, x and y, each 0 … ZOOM_STEPS (0 where the zoom is off). Fewer photos
    than a batch make one smaller batch.
    """
    rng = _generator(seed, epoch)
    order = rng.permutation(n_photos)  # first, so that the order is epoch_order's
    draws = np.stack([rng.integers(augment.n_choices, size=n_photos),
                      rng.integers(2, size=n_photos) * augment.flip_lr,
                      rng.integers(2, size=n_photos) * augment.flip_ud,
                      # drawn after the rest, so that turning the zoom on leaves the other draws as they were
                      *rng.integers(ZOOM_STEPS + 1, size=(3, n_photos)) * (augment.zoom > 0)], axis=-1)
    batch = min(batch_size, n_photos)
    used = steps_per_epoch(n_photos, batch_size) * batch
    return (order[:used].reshape(-1, batch).astype(np.int32),
            draws[:used].reshape(-1, batch, draws.shape[-1]).astype(np.int32))
