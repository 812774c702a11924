"""The order training sees the photos in: a function of (seed, epoch) alone, on every backend.

A run resumed at epoch e therefore sees exactly the batches an uninterrupted run would have, and the
augmentation of step s of epoch e is drawn from (seed, e, s) alone for the same reason.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the `n` training photos in epoch `epoch` (0-based) of a run seeded `seed`."""
    return np.random.default_rng([seed, epoch]).permutation(n)
