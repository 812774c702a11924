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
from chromalab.train.epochs import Augment, epoch_order, epoch_plan
from conftest import jax_env

SEED, BATCH, N_TRAIN = 3, 4, 10
AUGMENTATION = {"flip_lr": True, "flip_ud": True, "contrast_aug": True}


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
    assert indices.shape == (3, 16) and draws.shape == (3, 16, 3)  # the partial last batch dropped
    assert np.array_equal(indices.ravel(), epoch_order(7, 3, 50)[:48])
    again = epoch_plan(7, 3, 50, 16, augment)
    assert np.array_equal(indices, again[0]) and np.array_equal(draws, again[1])
    assert set(draws[..., 0].ravel()) == {0, 1, 2, 3} and set(draws[..., 1].ravel()) == {0, 1}
    assert not draws[..., 2].any()  # flip_ud off: never drawn as a flip
    small, _ = epoch_plan(7, 0, 5, 16, augment)
    assert small.shape == (1, 5)  # fewer photos than a batch: one smaller batch


JAX_BATCHES = textwrap.dedent("""
    import itertools, sys
    from chromalab.entry import skip_unused_extras; skip_unused_extras()
    import numpy as np
    from chromalab.train.input import jax_training_feed
    records, out = sys.argv[1], sys.argv[2]
    options = dict(flip_lr=True, flip_ud=True, contrast_aug=True, seed={seed})
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
        for feed in ("device", "streamed"):
            np.testing.assert_array_equal(jax_batches[f"{feed}_{step}_L"], L, err_msg=f"{feed} step {step}")
            np.testing.assert_array_equal(jax_batches[f"{feed}_{step}_ab"], ab, err_msg=f"{feed} step {step}")
        if step >= 2:  # a run resumed at epoch 1 gets epoch 1's batches
            np.testing.assert_array_equal(jax_batches[f"resumed_{step - 2}_L"], L)
        flipped += int(epoch_plan(SEED, step // 2, N_TRAIN, BATCH, Augment(4, True, True))[1][step % 2][:, 1:].any())
    assert flipped  # the comparison covers flipped photos, not only untouched ones
