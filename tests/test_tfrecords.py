"""The tfrecords stage and its tf.data reader, on small synthetic photos written as the images stage does."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from chromalab.color import lab_norm_to_rgb, rgb_to_lab_norm
from chromalab.config import parse_params
from chromalab.errors import ChromalabError
from chromalab.data.dataset import load_split_arrays, read_dataset_info
from chromalab.data.tfrecords import VARIANT_NAMES, contrast_variants, run_tfrecords
from chromalab.train.epochs import epoch_order
from chromalab.train.input import make_dataset

SIZE = 32
SHARD_SIZE = 4
N_TRAIN, N_TEST, N_VAL = 10, 3, 2
# float16 keeps 11 significant bits: L/100 and a/128, b/128 are off by at most ~0.03 Lab units, which over
# the whole sRGB cube (all 16.7 M colours, measured) moves a channel by at most 1.67/255 after Lab → RGB.
RGB_TOLERANCE = 2 / 255


def colourful_photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """Saturated gradients running in different directions plus noise: no photo is mirror-symmetric."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    gamma = rng.uniform(0.3, 1.5, 3)
    rgb = np.stack([x ** gamma[0], (y ** gamma[1]) * (1 - x), (1 - y) ** gamma[2] * (0.5 + 0.5 * x)], axis=-1)
    rgb += rng.normal(0.0, 0.06, rgb.shape)
    return (np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def write_images(images_dir: Path, photos: list[tuple[str, str, np.ndarray]]) -> None:
    """`photos` = (photo_id, split, rgb) → <split>/<id>.jpg + manifest.csv, like the images stage."""
    rows = []
    for photo_id, split, rgb in photos:
        path = images_dir / split / f"{photo_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path, quality=92)
        rows.append({"photo_id": photo_id, "split": split, "file": f"{split}/{photo_id}.jpg",
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "source": "synthetic"})
    with (images_dir / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["photo_id", "split", "file", "sha256", "source"])
        writer.writeheader()
        writer.writerows(rows)


def decoded_jpeg(images_dir: Path, split: str, photo_id: str) -> np.ndarray:
    return np.asarray(Image.open(images_dir / split / f"{photo_id}.jpg").convert("RGB"))


def params(**tfrecords):
    return parse_params({"tfrecords": {"shard_size": SHARD_SIZE, **tfrecords}})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One dataset for the module, built over a real process pool; test and val rows sit between train rows."""
    root = tmp_path_factory.mktemp("tfrecords")
    rng = np.random.default_rng(7)
    splits = ["train"] * 4 + ["test"] * 2 + ["val"] + ["train"] * 6 + ["test", "val"]
    photos = [(f"{rng.integers(16**8):08x}", split, colourful_photo(rng, SIZE)) for split in splits]
    write_images(root / "images", photos)
    info = run_tfrecords(params(), root / "images", root / "data" / "tfrecords", workers=2)
    ids = {split: [pid for pid, s, _ in photos if s == split] for split in ("train", "test", "val")}
    return {"root": root, "images": root / "images", "out": root / "data" / "tfrecords", "info": info, "ids": ids}


# ---------------------------------------------------------------------------------------------- the stage


def test_round_trip_reproduces_the_photos(built):
    for split in ("train", "test", "val"):
        ids, lum, ab = load_split_arrays(built["out"], split)
        assert ids == built["ids"][split]  # manifest order within the split
        assert lum.shape == (len(ids), SIZE, SIZE, 1) and ab.shape == (len(ids), SIZE, SIZE, 2)
        assert lum.dtype == ab.dtype == np.float32
        for photo_id, photo_l, photo_ab in zip(ids, lum, ab):
            source = decoded_jpeg(built["images"], split, photo_id)
            stored = rgb_to_lab_norm(source).astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(photo_l[..., 0], stored[..., 0])
            np.testing.assert_array_equal(photo_ab, stored[..., 1:])
            back = lab_norm_to_rgb(photo_l, photo_ab)
            assert np.abs(back - source / 255.0).max() <= RGB_TOLERANCE


def test_shards_are_named_and_filled_in_order(built):
    names = sorted(p.name for p in built["out"].iterdir())
    assert names == ["dataset.json", "test-00000-of-00001.tfrecord", "train-00000-of-00003.tfrecord",
                     "train-00001-of-00003.tfrecord", "train-00002-of-00003.tfrecord", "val-00000-of-00001.tfrecord"]
    per_shard = [sum(1 for _ in tf.data.TFRecordDataset(str(built["out"] / name))) for name in names[2:5]]
    assert per_shard == [SHARD_SIZE, SHARD_SIZE, N_TRAIN - 2 * SHARD_SIZE]
    example = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(str(built["out"] / names[2])))).numpy())
    features = example.features.feature
    assert features["photo_id"].bytes_list.value[0].decode() == built["ids"]["train"][0]
    assert features["size"].int64_list.value[0] == SIZE
    assert len(features["lab"].bytes_list.value[0]) == SIZE * SIZE * 3 * 2  # float16
    assert len(features["l_variants"].bytes_list.value[0]) == SIZE * SIZE * len(VARIANT_NAMES) * 2
    # Built beside the output and renamed into place: nothing temporary is left behind.
    assert sorted(p.name for p in built["out"].parent.iterdir()) == ["tfrecords"]


def test_dataset_json_describes_the_data(built):
    info = read_dataset_info(built["out"])
    assert info == built["info"]
    assert info["counts"] == {"train": N_TRAIN, "test": N_TEST, "val": N_VAL}
    assert info["format"] == 2  # 2: the val split joined train and test
    assert info["image_size"] == SIZE
    assert info["normalisation"] == {"L": 100.0, "a": 128.0, "b": 128.0, "dtype": "float16", "layout": "HWC"}
    assert info["variants"] == list(VARIANT_NAMES)
    assert info["channels"] == {"lab": 3, "l_variants": 3}
    assert info["shards"]["test"] == ["test-00000-of-00001.tfrecord"]
    assert len(info["content_hash"]) == 64


def test_variants_are_the_seeds_contrast_augmentations_of_L(built):
    ids = built["ids"]["train"]
    records = tf.data.TFRecordDataset(str(built["out"] / "train-00000-of-00003.tfrecord"))
    for photo_id, record in zip(ids, records):
        features = tf.train.Example.FromString(record.numpy()).features.feature
        stored = np.frombuffer(features["l_variants"].bytes_list.value[0], np.float16).reshape(SIZE, SIZE, 3)
        lum = rgb_to_lab_norm(decoded_jpeg(built["images"], "train", photo_id))[..., 0]
        np.testing.assert_array_equal(stored, contrast_variants(lum).astype(np.float16))
        stretched = stored[..., VARIANT_NAMES.index("contrast_stretch_2_98")]
        assert stretched.min() == 0.0 and stretched.max() == 1.0  # 2nd-98th percentiles fill [0, 1]


def test_rerun_replaces_the_dataset_identically_and_hash_follows_content(built, tmp_path):
    out = tmp_path / "tfrecords"
    first = run_tfrecords(params(), built["images"], out, workers=1)
    (out / "stale.tfrecord").write_bytes(b"old")
    second = run_tfrecords(params(), built["images"], out, workers=1)
    assert not (out / "stale.tfrecord").exists()  # the old folder was replaced, not merged into
    assert first == second == built["info"]  # same photos → same hash, whatever the worker count
    for name in built["info"]["shards"]["train"]:
        assert (out / name).read_bytes() == (built["out"] / name).read_bytes()

    plain = run_tfrecords(params(contrast_variants=False), built["images"], tmp_path / "plain", workers=1)
    assert plain["variants"] == [] and plain["content_hash"] != first["content_hash"]
    manifest = built["images"] / "manifest.csv"
    edited = tmp_path / "images"
    edited.mkdir()
    rows = list(csv.DictReader(manifest.open()))
    rows.reverse()  # same photos, other order: a different dataset for training's fingerprint
    for split in ("train", "test", "val"):
        (edited / split).symlink_to(built["images"] / split)
    with (edited / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    reordered = run_tfrecords(params(), edited, tmp_path / "reordered", workers=1)
    assert reordered["content_hash"] != first["content_hash"]


# --------------------------------------------------------------------------------------------- the reader


def batches(dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(lum.numpy(), ab.numpy()) for lum, ab in dataset]


def test_eval_dataset_is_file_order_unaugmented_and_keeps_the_last_batch(built):
    ids, lum, ab = load_split_arrays(built["out"], "train")
    dataset = make_dataset(built["out"], "train", 4, training=False, contrast_aug=True, flip_lr=True, flip_ud=True)
    assert [spec.shape.as_list() for spec in dataset.element_spec] == [[None, SIZE, SIZE, 1], [None, SIZE, SIZE, 2]]
    first, second = batches(dataset), batches(dataset)
    assert [b[0].shape[0] for b in first] == [4, 4, 2]
    assert first[0][0].dtype == first[0][1].dtype == np.float32
    assert first[0][0].shape == (4, SIZE, SIZE, 1) and first[0][1].shape == (4, SIZE, SIZE, 2)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in first]), lum)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in first]), ab)
    for (l1, ab1), (l2, ab2) in zip(first, second):
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_array_equal(ab1, ab2)


def test_training_dataset_shuffles_reproducibly_and_drops_the_partial_batch(built):
    ids, _, ab = load_split_arrays(built["out"], "train")
    options = dict(training=True, flip_lr=False, contrast_aug=False, seed=3)
    dataset = make_dataset(built["out"], "train", 4, epochs=2, **options)
    assert len(dataset) == 2 * (N_TRAIN // 4)  # two epochs of two batches each
    for augmented in (dataset, make_dataset(built["out"], "train", 4, training=True, flip_ud=True, contrast_aug=True)):
        lum_spec, ab_spec = augmented.element_spec  # static shapes: Keras builds the model from them
        assert lum_spec.shape == (4, SIZE, SIZE, 1) and ab_spec.shape == (4, SIZE, SIZE, 2)

    def order(epoch):  # photo indices, found by their (unaugmented) ab
        return [int(np.argmin(np.abs(ab - x).reshape(len(ab), -1).max(1))) for b in epoch for x in b[1]]

    both = batches(dataset)
    epoch1, epoch2 = both[:2], both[2:]
    assert [b[0].shape[0] for b in both] == [4, 4, 4, 4]
    assert order(epoch1) != order(epoch2)  # a new order each epoch
    assert order(epoch1) != list(range(8))
    # Epoch e's order is the documented rule of (seed, e) alone, the partial last batch dropped ...
    assert order(epoch2) == list(epoch_order(3, 1, N_TRAIN)[:8])
    assert list(epoch_order(3, 1, N_TRAIN)) == list(np.random.default_rng([3, 1]).permutation(N_TRAIN))
    # ... so a run resumed at epoch 1 gets exactly epoch 1's batches, augmentation included.
    for augmentation in (dict(flip_lr=False, contrast_aug=False), dict(flip_lr=True, flip_ud=True, contrast_aug=True)):
        straight = batches(make_dataset(built["out"], "train", 4, training=True, seed=3, epochs=3, **augmentation))
        resumed = batches(make_dataset(built["out"], "train", 4, training=True, seed=3, epochs=3, initial_epoch=1,
                                       **augmentation))
        assert len(resumed) == 4
        for (l1, ab1), (l2, ab2) in zip(straight[2:], resumed, strict=True):
            np.testing.assert_array_equal(l1, l2)
            np.testing.assert_array_equal(ab1, ab2)
    assert order(batches(make_dataset(built["out"], "train", 4, epochs=2, **options))[:2]) == order(epoch1)
    assert len(make_dataset(built["out"], "train", 16, training=True)) == 1  # fewer photos than a batch


def identify(sample_l, sample_ab, lum, ab, transforms):
    """(photo, transform) whose transformed L is exactly `sample_l`; the same transform must give ab."""
    for i in range(len(lum)):
        for name, transform in transforms.items():
            if np.array_equal(transform(lum[i]), sample_l):
                return i, name, np.array_equal(transform(ab[i]), sample_ab)
    raise AssertionError("a training sample matches no photo under any flip")


FLIPS = {"none": lambda x: x, "lr": lambda x: x[:, ::-1], "ud": lambda x: x[::-1], "both": lambda x: x[::-1, ::-1]}


@pytest.mark.parametrize("flip_ud", [False, True])
def test_flips_move_L_and_ab_together(built, flip_ud):
    _, lum, ab = load_split_arrays(built["out"], "train")
    for transform in list(FLIPS.values())[1:]:  # the photos are asymmetric, so every flip is visible
        assert all(not np.array_equal(transform(x), x) for x in (*lum, *ab))
    dataset = make_dataset(built["out"], "train", 2, training=True, flip_lr=True, flip_ud=flip_ud,
                           contrast_aug=False, seed=11, epochs=3)
    seen = []
    for batch_l, batch_ab in batches(dataset):
        for sample_l, sample_ab in zip(batch_l, batch_ab):
            _, flip, ab_follows = identify(sample_l, sample_ab, lum, ab, FLIPS)
            assert ab_follows, f"L was flipped ({flip}) but ab was not flipped with it"
            seen.append(flip)
    assert set(seen) == ({"none", "lr", "ud", "both"} if flip_ud else {"none", "lr"})


def test_training_picks_contrast_variants_and_evaluation_never_does(built):
    info = read_dataset_info(built["out"])
    records = tf.data.TFRecordDataset([str(built["out"] / n) for n in info["shards"]["train"]])
    stacks, abs_ = [], []
    for record in records:
        features = tf.train.Example.FromString(record.numpy()).features.feature
        lab = np.frombuffer(features["lab"].bytes_list.value[0], np.float16).reshape(SIZE, SIZE, 3)
        variants = np.frombuffer(features["l_variants"].bytes_list.value[0], np.float16).reshape(SIZE, SIZE, 3)
        stacks.append(np.concatenate([lab[..., :1], variants], -1).astype(np.float32))
        abs_.append(lab[..., 1:].astype(np.float32))
    for stack in stacks:  # all four L channels differ, so which one was used is unambiguous
        assert len({stack[..., k].tobytes() for k in range(4)}) == 4

    def chosen(dataset):
        picks = []
        for batch_l, batch_ab in batches(dataset):
            for sample_l, sample_ab in zip(batch_l, batch_ab):
                photo = next(i for i, x in enumerate(abs_) if np.array_equal(x, sample_ab))
                picks.append(next(k for k in range(4) if np.array_equal(stacks[photo][..., k:k + 1], sample_l)))
        return picks

    training = make_dataset(built["out"], "train", 2, training=True, flip_lr=False, contrast_aug=True, seed=5,
                            epochs=4)
    picks = chosen(training)
    assert set(picks) == {0, 1, 2, 3}  # the original and each variant, over 40 draws
    assert picks.count(0) < len(picks) / 2  # uniform over four, not mostly the original
    no_aug = make_dataset(built["out"], "train", 2, training=True, flip_lr=False, contrast_aug=False, seed=5,
                          epochs=2)
    assert set(chosen(no_aug)) == {0}
    evaluation = make_dataset(built["out"], "train", 2, training=False, contrast_aug=True)
    assert set(chosen(evaluation) + chosen(evaluation)) == {0}


def test_dataset_without_variants_reads_and_warns_about_contrast_aug(built, tmp_path):
    out = tmp_path / "plain"
    run_tfrecords(params(contrast_variants=False), built["images"], out, workers=1)
    _, lum, _ = load_split_arrays(built["out"], "train")
    with pytest.warns(UserWarning, match="contrast"):
        dataset = make_dataset(out, "train", 5, training=True, flip_lr=False, contrast_aug=True)
    sample_l = batches(dataset)[0][0]
    assert all(any(np.array_equal(x, y) for y in lum) for x in sample_l)


# --------------------------------------------------------------------------------------------- the errors


def test_missing_manifest_says_to_run_the_images_stage(tmp_path):
    with pytest.raises(ChromalabError, match="run the images stage first"):
        run_tfrecords(params(), tmp_path / "images", tmp_path / "tfrecords")


def small_set(images_dir: Path, sizes=(SIZE,) * 4, splits=("train", "train", "test", "val")) -> None:
    rng = np.random.default_rng(1)
    write_images(images_dir, [(f"p{i}", split, colourful_photo(rng, size))
                              for i, (size, split) in enumerate(zip(sizes, splits))])


def assert_failed_cleanly(out: Path) -> None:
    """The previous dataset is untouched and no temporary folder is left beside it."""
    assert json.loads((out / "dataset.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in out.parent.iterdir()) == ["images", "tfrecords"]


@pytest.fixture
def previous(tmp_path) -> Path:
    out = tmp_path / "tfrecords"
    out.mkdir()
    (out / "dataset.json").write_text(json.dumps({"previous": True}))
    return out


def test_unreadable_image_is_named_across_the_process_pool(tmp_path, previous):
    small_set(tmp_path / "images")
    broken = tmp_path / "images" / "train" / "p1.jpg"
    broken.write_bytes(b"this is not a JPEG")
    manifest = tmp_path / "images" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(
        next(r["sha256"] for r in csv.DictReader(manifest.open()) if r["photo_id"] == "p1"),
        hashlib.sha256(broken.read_bytes()).hexdigest()))
    with pytest.raises(ChromalabError, match=r"p1\.jpg: not a readable image"):
        run_tfrecords(params(), tmp_path / "images", previous, workers=2)
    assert_failed_cleanly(previous)


def test_changed_or_missing_image_file_is_reported(tmp_path, previous):
    small_set(tmp_path / "images")
    Image.fromarray(colourful_photo(np.random.default_rng(9), SIZE)).save(tmp_path / "images" / "test" / "p2.jpg")
    with pytest.raises(ChromalabError, match=r"p2\.jpg: its content does not match the sha256"):
        run_tfrecords(params(), tmp_path / "images", previous, workers=1)
    (tmp_path / "images" / "test" / "p2.jpg").unlink()
    with pytest.raises(ChromalabError, match=r"p2\.jpg: cannot read it"):
        run_tfrecords(params(), tmp_path / "images", previous, workers=1)
    assert_failed_cleanly(previous)


def test_photos_of_different_sizes_are_refused(tmp_path, previous):
    small_set(tmp_path / "images", sizes=(SIZE, SIZE, 2 * SIZE, SIZE))
    with pytest.raises(ChromalabError, match=r"p2\.jpg is 64x64 px but .*p0\.jpg is 32x32"):
        run_tfrecords(params(), tmp_path / "images", previous, workers=1)
    assert_failed_cleanly(previous)


def test_empty_split_is_refused(tmp_path, previous):
    small_set(tmp_path / "images", splits=("train", "train", "train", "val"))
    with pytest.raises(ChromalabError, match="the test split has no photos"):
        run_tfrecords(params(), tmp_path / "images", previous, workers=1)
    # the images of a checkout from before the val split: one line that says what to re-run
    small_set(tmp_path / "images", splits=("train", "train", "test", "test"))
    with pytest.raises(ChromalabError, match="the val split has no photos: check split.n_val") as err:
        run_tfrecords(params(), tmp_path / "images", previous, workers=1)
    assert "\n" not in str(err.value)
    assert_failed_cleanly(previous)


def test_records_of_the_format_before_val_say_to_rebuild(built, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    info = {**json.loads((built["out"] / "dataset.json").read_text()), "format": 1}
    (old / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ChromalabError, match="is not format 2 of this project's dataset: re-run the tfrecords stage") as err:
        load_split_arrays(old, "train")
    assert "\n" not in str(err.value)


def test_reader_errors(built, tmp_path):
    with pytest.raises(ChromalabError, match="run the tfrecords stage first"):
        read_dataset_info(tmp_path)
    with pytest.raises(ChromalabError, match="unknown split 'valid'"):
        make_dataset(built["out"], "valid", 4, training=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "dataset.json").write_text((built["out"] / "dataset.json").read_text())
    with pytest.raises(ChromalabError, match=r"test-00000-of-00001\.tfrecord is missing"):
        load_split_arrays(copy, "test")



# The tfrecords stage's process pool, busy, then every child of this process listed (the pool's workers and
# multiprocessing's resource tracker), and a wait for the kill.
ORPHANED_POOL = """
import os, time
from chromalab.data import tfrecords
with tfrecords._photo_encoder(2) as encode:
    pool = encode.args[0]  # partial(_map_spawning_deaf_to_ctrl_c, pool)
    for done in [pool.submit(time.sleep, 0.5) for _ in range(4)]:
        done.result()
    print(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read(), flush=True)
    time.sleep(120)
"""


def test_pool_workers_end_with_a_stage_killed_with_9():
    """kill -9 closes no queue: without more, the encoding workers would live on, idle, under PID 1."""
    import signal
    import subprocess
    import sys
    import time

    stage = subprocess.Popen([sys.executable, "-c", ORPHANED_POOL], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in stage.stdout.readline().split()]
    finally:
        stage.send_signal(signal.SIGKILL)
        stage.wait()
    assert len(children) >= 3  # two workers and the resource tracker
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)


def test_a_ctrl_c_while_the_workers_start_stops_none_of_them(tmp_path):
    """Ctrl-C reaches every process of the terminal's group, the pool's workers too. One still importing (about
    a second, before its initializer runs) must not die of it, with a traceback of its own: the stage stops its
    pool itself, with one line. Here each worker gets a SIGINT the moment it has been started."""
    import multiprocessing
    import os
    import signal

    from chromalab.data import tfrecords

    small_set(tmp_path / "images", sizes=(SIZE,) * 12, splits=("train",) * 10 + ("test", "val"))
    photos = tfrecords.read_manifest(tmp_path / "images")
    with tfrecords._photo_encoder(2) as encode:
        results = encode([str(p.path) for p in photos], [p.sha256 for p in photos], [False] * len(photos))
        workers = multiprocessing.active_children()
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
        encoded = list(results)
    assert len(workers) == 2 and len(encoded) == len(photos)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_split_with_fewer_or_more_records_than_counted_is_refused(built, tmp_path):
    """A shard short of photos would leave rows of the arrays uninitialised (np.empty): never silently."""
    shard = built["info"]["shards"]["test"][0]
    whole = (built["out"] / shard).read_bytes()
    record = len(whole) // N_TEST  # one photo size: every record has one length
    for name, data in (("fewer", whole[:-record]), ("more", whole + whole[:record])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text((built["out"] / "dataset.json").read_text())
        (tmp_path / name / shard).write_bytes(data)
    with pytest.raises(ChromalabError, match=f"2 test records but dataset.json counts {N_TEST}: re-run"):
        load_split_arrays(tmp_path / "fewer", "test")
    with pytest.raises(ChromalabError, match=f"more records than the {N_TEST} test photos dataset.json counts"):
        load_split_arrays(tmp_path / "more", "test")


def test_the_content_hash_follows_each_photos_bytes(built, tmp_path):
    """Same ids, one photo re-made (another JPEG of it): another dataset for training's fingerprint."""
    edited = tmp_path / "images"
    shutil.copytree(built["images"], edited)
    rows = list(csv.DictReader((edited / "manifest.csv").open()))
    photo = edited / rows[0]["file"]
    Image.open(photo).save(photo, quality=70)
    rows[0]["sha256"] = hashlib.sha256(photo.read_bytes()).hexdigest()
    with (edited / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    remade = run_tfrecords(params(), edited, tmp_path / "remade", workers=1)
    assert remade["counts"] == built["info"]["counts"] and remade["content_hash"] != built["info"]["content_hash"]


def test_a_split_filling_its_shards_exactly_gets_no_empty_shard():
    from chromalab.data.tfrecords import shard_names

    assert shard_names("train", 8, 4) == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    assert shard_names("val", 1, 4) == ["val-00000-of-00001.tfrecord"]
