"""Under KERAS_BACKEND=jax nothing imports TensorFlow: the whole pipeline runs where it is not installed.

One subprocess (JAX's start-up and compiles are the cost) makes `import tensorflow` fail, then runs
images → tfrecords → train gan → train baseline → evaluate → colorize through the `chromalab` CLI.
The on-device input itself (order, augmentation, streaming) is checked in-process with NumPy arrays.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from chromalab.epochs import epoch_permutation
from chromalab.samples import write_images_stage
from conftest import jax_env

# `import tensorflow` fails as where TensorFlow is not installed; then each argv runs through the CLI.
BLOCKED_PIPELINE = textwrap.dedent("""
    import json, sys

    class HideTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ImportError("No module named 'tensorflow' (blocked by the test)")
            return None

    sys.meta_path.insert(0, HideTensorFlow())
    from chromalab.cli import main

    for argv in json.loads(sys.argv[1]):
        try:
            main(argv)
        except SystemExit as exc:
            if exc.code:
                raise SystemExit(f"chromalab {' '.join(argv)} failed: exit {exc.code}")
    import keras
    print("RESULT", json.dumps({"backend": keras.backend.backend(),
                                "tensorflow_imported": any(m.split(".")[0] == "tensorflow" for m in sys.modules)}))
""")

TINY = {
    "base": {"image_size": 32},
    "tfrecords": {"shard_size": 4},
    "train": {"val_every": 2, "checkpoint_every": 2, "sample_every": 2, "n_samples": 2},
    "baseline": {"epochs": 2, "batch_size": 4, "width": 0.25},
    "gan": {"epochs": 3, "batch_size": 4, "width": 0.125},
}


def test_pipeline_runs_under_jax_with_tensorflow_blocked(tmp_path):
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    write_images_stage(tmp_path / "data/images", n_train=10, n_test=3, size=32)
    photo = tmp_path / "data/images/test/photo0010.jpg"
    steps = [["tfrecords"], ["train", "gan"], ["train", "baseline"], ["evaluate"],
             ["colorize", str(photo), "-o", str(tmp_path / "coloured")]]
    done = subprocess.run([sys.executable, "-c", BLOCKED_PIPELINE, json.dumps(steps)], cwd=tmp_path,
                          env=jax_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    assert result == {"backend": "jax", "tensorflow_imported": False}
    history = (tmp_path / "reports/gan/history.csv").read_text().splitlines()
    assert len(history) == 1 + 3 and "val_ssim" in history[0]
    metrics = json.loads((tmp_path / "reports/evaluate/metrics.json").read_text())
    assert set(metrics) == {"gray_floor", "baseline", "gan"}
    assert all(np.isfinite(v) for scores in metrics.values() for v in scores.values())
    assert (tmp_path / "coloured/photo0010_color.jpg").is_file()


# --- the feed itself, in this process (NumPy in, JAX arrays out) ----------------------------------------


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from chromalab.config import parse_params
    from chromalab.tfrecords import run_tfrecords

    root = tmp_path_factory.mktemp("feed")
    write_images_stage(root / "images", n_train=10, n_test=2, size=32)
    run_tfrecords(parse_params({"tfrecords": {"shard_size": 3}}), root / "images", root / "tfrecords", workers=1)
    return root / "tfrecords"


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert np.array_equal(epoch_permutation(7, 3, 50), np.random.default_rng([7, 3]).permutation(50))
    assert not np.array_equal(epoch_permutation(7, 3, 50), epoch_permutation(7, 4, 50))
    assert sorted(epoch_permutation(7, 3, 50)) == list(range(50))


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
    order = epoch_permutation(3, 1, 10)[:4]
    np.testing.assert_array_equal(L1, lum[order][..., :1].astype(np.float32))
    np.testing.assert_array_equal(ab1, ab[order].astype(np.float32))
    # With it: each photo flipped (L and ab together) and/or given one of its contrast variants.
    L0, ab0 = run[0]
    order = epoch_permutation(3, 0, 10)[:4]
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
