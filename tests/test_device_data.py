"""JAX's training input (chromalab.device_data): the epoch order, the on-device and streamed feeds, resuming.

That the whole pipeline runs under JAX with `import tensorflow` failing is tests/test_gpu_check.py's
reduced check (one JAX process per stage is the cost, paid once there).
"""

from __future__ import annotations

import numpy as np
import pytest

from chromalab.epochs import epoch_order
from chromalab.samples import write_images_stage


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from chromalab.config import parse_params
    from chromalab.tfrecords import run_tfrecords

    root = tmp_path_factory.mktemp("feed")
    write_images_stage(root / "images", n_train=10, n_test=2, size=32)
    run_tfrecords(parse_params({"tfrecords": {"shard_size": 3}}), root / "images", root / "tfrecords", workers=1)
    return root / "tfrecords"


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert np.array_equal(epoch_order(7, 3, 50), np.random.default_rng([7, 3]).permutation(50))
    assert not np.array_equal(epoch_order(7, 3, 50), epoch_order(7, 4, 50))
    assert sorted(epoch_order(7, 3, 50)) == list(range(50))


def _feed(records, **options):
    from chromalab.device_data import jax_training_feed

    settings = {"flip_lr": True, "flip_ud": True, "contrast_aug": True, "seed": 3, "max_gb": 1.0, **options}
    return jax_training_feed(records, 4, **settings)


def _take(feed, initial_epoch: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    import itertools

    from chromalab.device_data import augment_batch

    batches = itertools.islice(feed.batches(initial_epoch), steps)
    return [tuple(np.asarray(x) for x in augment_batch(b, feed.augment)) for b in batches]


def test_device_and_streamed_feeds_give_the_same_batches_and_a_resume_repeats_them(records):
    from chromalab.tfrecords import read_split

    device, streamed = _feed(records), _feed(records, max_gb=1e-9)
    assert device.on_device and not streamed.on_device and device.steps_per_epoch == 2  # 10 photos, batch 4
    run = _take(device, 0, 4)  # epochs 0 and 1
    for ours, theirs in zip(run, _take(streamed, 0, 4)):
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])
    for ours, resumed in zip(run[2:], _take(device, 1, 2)):  # resumed at epoch 1
        np.testing.assert_array_equal(ours[0], resumed[0])
    # Without augmentation a batch is exactly the records in the epoch's order.
    plain = _feed(records, flip_lr=False, flip_ud=False, contrast_aug=False)
    _, lum, ab = read_split(records, "train")
    (L1, ab1), = _take(plain, 1, 1)
    order = epoch_order(3, 1, 10)[:4]
    np.testing.assert_array_equal(L1, lum[order][..., :1].astype(np.float32))
    np.testing.assert_array_equal(ab1, ab[order].astype(np.float32))
    # With it: each photo flipped (L and ab together) and/or given one of its contrast variants.
    L0, ab0 = run[0]
    order = epoch_order(3, 0, 10)[:4]
    flips = 0
    for i, photo in enumerate(order):
        matched = [(v, fl, fu) for v in range(4) for fl in (0, 1) for fu in (0, 1)
                   if np.array_equal(_flip(lum[photo][..., v:v + 1], fl, fu), L0[i].astype(np.float16))
                   and np.array_equal(_flip(ab[photo], fl, fu), ab0[i].astype(np.float16))]
        assert matched, f"batch row {i} is not photo {photo} under any variant and flip"
        flips += matched[0][1] + matched[0][2]
    assert flips > 0


def _flip(image: np.ndarray, lr: int, ud: int) -> np.ndarray:
    return image[::-1 if ud else 1, ::-1 if lr else 1]
