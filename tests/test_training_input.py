"""The training input on both backends (chromalab.train.input): one plan of each epoch (chromalab.train.epochs),
one augmentation (chromalab.train.augment), so that TensorFlow's tf.data, JAX's on-device feed and JAX's streamed
feed hand `fit` the very same batches, and a resumed run repeats an uninterrupted one.

What the batches hold (each photo flipped with its ab, contrast variants drawn) is tests/test_tfrecords.py's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from chromalab.bench.samples import write_images_stage
from chromalab.train.augment import augment_batch
from chromalab.train.epochs import ZOOM_STEPS, Augment, epoch_order, epoch_plan
from conftest import jax_env

SEED, BATCH, N_TRAIN = 3, 4, 10
AUGMENTATION = {"flip_lr": True, "flip_ud": True, "contrast_aug": True, "zoom": 0.25}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from chromalab.config import parse_params
    from chromalab.data.tfrecords import run_tfrecords

    root = tmp_path_factory.mktemp("feed")
    write_images_stage(root / "images", n_train=N_TRAIN, n_test=2, size=32)
    run_tfrecords(parse_params({"tfrecords": {"shard_size": 3}}), root / "images", root / "tfrecords", workers=1)
    return root / "tfrecords"


def test_epoch_order_and_draws_depend_on_seed_and_epoch_only():
    assert np.array_equal(epoch_order(7, 3, 50), np.random.default_rng([7, 3]).permutation(50))
    assert not np.array_equal(epoch_order(7, 3, 50), epoch_order(7, 4, 50))
    augment = Augment(4, flip_lr=True, flip_ud=False)
    indices, draws = epoch_plan(7, 3, 50, 16, augment)
    assert indices.shape == (3, 16) and draws.shape == (3, 16, 6)  # the partial last batch dropped
    assert np.array_equal(indices.ravel(), epoch_order(7, 3, 50)[:48])
    again = epoch_plan(7, 3, 50, 16, augment)
    assert np.array_equal(indices, again[0]) and np.array_equal(draws, again[1])
    assert set(draws[..., 0].ravel()) == {0, 1, 2, 3} and set(draws[..., 1].ravel()) == {0, 1}
    assert not draws[..., 2].any()  # flip_ud off: never drawn as a flip
    assert not draws[..., 3:].any()  # zoom off: never zoomed
    zoomed = epoch_plan(7, 3, 50, 16, Augment(4, flip_lr=True, flip_ud=False, zoom=0.25))[1]
    assert np.array_equal(zoomed[..., :3], draws[..., :3])  # turning the zoom on keeps every other draw
    assert zoomed[..., 3:].min() >= 0 and zoomed[..., 3:].max() <= ZOOM_STEPS and len(np.unique(zoomed[..., 3])) > 40
    small, _ = epoch_plan(7, 0, 5, 16, augment)
    assert small.shape == (1, 5)  # fewer photos than a batch: one smaller batch


def test_zoom_resamples_a_window_inside_the_photo_L_and_ab_alike():
    size = 32
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    # Ramps of the column (L, b) and the row (a): bilinear resampling of a ramp is exact, so each output pixel
    # says which input point it read.
    lum = np.broadcast_to(columns[None, ..., None], (4, size, size, 1))
    ab = np.broadcast_to(np.stack([rows, columns], axis=-1)[None], (4, size, size, 2))
    draws = np.zeros((4, 6), np.int32)
    draws[1:, 3:] = [[ZOOM_STEPS, 0, 0], [ZOOM_STEPS, ZOOM_STEPS, ZOOM_STEPS], [ZOOM_STEPS // 2, ZOOM_STEPS, 0]]
    L, ab_out = (np.asarray(x) for x in augment_batch(lum, ab, draws, Augment(1, False, False, zoom=0.25)))
    np.testing.assert_array_equal(L[0], lum[0])  # a zoom of 1 leaves the photo as it was
    for row, (scale, x, y) in enumerate([(1, 0, 0), (1.25, 0, 0), (1.25, 1, 1), (1.125, 1, 0)]):
        shrink = 1 / scale
        span = (size - 1) * (1 - shrink)  # the window's corner moves from 0 (left/top) to span (right/bottom)
        np.testing.assert_allclose(L[row, ..., 0], shrink * columns + x * span, atol=1e-4)
        np.testing.assert_allclose(ab_out[row, ..., 1], L[row, ..., 0], atol=1e-6)  # ab is zoomed with its L
        np.testing.assert_allclose(ab_out[row, ..., 0], shrink * rows + y * span, atol=1e-4)
    assert L[2].max() == pytest.approx(size - 1, abs=1e-4)  # to the bottom-right edge and no further


JAX_BATCHES = textwrap.dedent("""
    import itertools, sys
    from chromalab.entry import skip_unused_extras; skip_unused_extras()
    import numpy as np
    from chromalab.train.input import jax_training_feed
    records, out = sys.argv[1], sys.argv[2]
    options = dict(flip_lr=True, flip_ud=True, contrast_aug=True, zoom=0.25, seed={seed})
    device = jax_training_feed(records, {batch}, max_gb=1.0, **options)
    streamed = jax_training_feed(records, {batch}, max_gb=1e-9, **options)
    assert device.on_device and not streamed.on_device
    arrays = {{}}
    for name, feed, first, steps in (("device", device, 0, 4), ("streamed", streamed, 0, 4), ("resumed", device, 1, 2)):
        for i, (L, ab) in enumerate(itertools.islice(feed.batches(first), steps)):
            arrays[f"{{name}}_{{i}}_L"], arrays[f"{{name}}_{{i}}_ab"] = np.asarray(L), np.asarray(ab)
    np.savez(out, **arrays)
""").format(seed=SEED, batch=BATCH)


def test_tensorflow_and_jax_train_on_the_same_batches(records, tmp_path):
    from chromalab.train.input import make_dataset

    out = tmp_path / "jax.npz"
    done = subprocess.run([sys.executable, "-c", JAX_BATCHES, str(records), str(out)], env=jax_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    jax_batches = np.load(out)
    tf_batches = [(L.numpy(), ab.numpy()) for L, ab in
                  make_dataset(records, "train", BATCH, training=True, seed=SEED, epochs=2, **AUGMENTATION)]
    assert len(tf_batches) == 4  # 2 epochs of 10 photos in batches of 4
    flipped = 0
    for step, (L, ab) in enumerate(tf_batches):
        assert L.shape == (BATCH, 32, 32, 1) and L.dtype == np.float32
        for feed in ("device", "streamed"):  # the zoom's bilinear sums may round the last bit apart
            np.testing.assert_allclose(jax_batches[f"{feed}_{step}_L"], L, rtol=0, atol=1e-6, err_msg=f"{feed} {step}")
            np.testing.assert_allclose(jax_batches[f"{feed}_{step}_ab"], ab, rtol=0, atol=1e-6, err_msg=f"{feed} {step}")
        if step >= 2:  # a run resumed at epoch 1 gets epoch 1's batches
            np.testing.assert_array_equal(jax_batches[f"resumed_{step - 2}_L"], jax_batches[f"device_{step}_L"])
        flipped += int(epoch_plan(SEED, step // 2, N_TRAIN, BATCH, Augment(4, True, True))[1][step % 2][:, 1:].any())
    assert flipped  # the comparison covers flipped (and zoomed) photos, not only untouched ones
