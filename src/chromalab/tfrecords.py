"""Stage `tfrecords`: data/images → normalised Lab TFRecords, and the readers that training uses.

The records hold exactly what the models consume, so training decodes no JPEG and converts no colour:
Lab as (L/100, a/128, b/128) in float16, plus — with `tfrecords.contrast_variants` — the seed's three
contrast augmentations of L, precomputed once here so that training picks one at random at no CPU cost.
float16 keeps a 256 px photo at 768 KiB (1.5 MiB with the variants) and is exact to about 0.03 Lab units.

Layout of `data/tfrecords`: `train-00000-of-00008.tfrecord`, …, `test-00000-of-00001.tfrecord` (manifest
order, `tfrecords.shard_size` photos per shard) and `dataset.json` (counts, size, normalisation, variant
names, shard names, and a content hash that training logs as the dataset's identity).

The files are standard TFRecords of tf.train.Example, written and read by chromalab.records without
TensorFlow (the JAX backend reads them with `read_split`); under the TensorFlow backend `make_dataset`
reads them with tf.data. TensorFlow is imported only inside the tf.data functions.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import multiprocessing
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage import exposure
from tqdm import tqdm

from chromalab.color import AB_SCALE, L_SCALE, rgb_to_lab_norm
from chromalab.config import Params
from chromalab.devices import available_cores
from chromalab.errors import ChromalabError
from chromalab.files import staged_dir
from chromalab.epochs import epoch_order, steps_per_epoch
from chromalab.records import REDO, RecordWriter, decode_example, encode_example, read_records

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS = ("train", "test")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("photo_id", "split", "file", "sha256")  # the images stage also writes `source`
INFO_FILE = "dataset.json"
FORMAT_VERSION = 1
# Little-endian float16, as tf.io.decode_raw(..., tf.float16) reads it on every platform.
STORAGE_DTYPE = np.dtype("<f2")
NORMALISATION = {"L": L_SCALE, "a": AB_SCALE, "b": AB_SCALE, "dtype": "float16", "layout": "HWC"}
# The seed's three augmentations, in the order of the `l_variants` channels.
VARIANT_NAMES = ("equalize_hist", "contrast_stretch_2_98", "equalize_adapthist")
STRETCH_PERCENTILES = (2, 98)
POOL_CHUNKSIZE = 4  # photos per worker task: amortises the inter-process round trip, keeps progress smooth


@dataclass(frozen=True)
class ManifestPhoto:
    photo_id: str
    split: str
    path: Path
    sha256: str


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def contrast_variants(l_norm: np.ndarray) -> np.ndarray:
    """The seed's contrast augmentations of normalised L [H, W] (in [0, 1]) → [H, W, 3] in [0, 1].

    Histogram equalisation, contrast stretching to the 2nd–98th percentiles, adaptive equalisation
    (CLAHE, scikit-image's defaults), in the order of VARIANT_NAMES.
    """
    lum = np.clip(np.asarray(l_norm, dtype=np.float64), 0.0, 1.0)
    low, high = np.percentile(lum, STRETCH_PERCENTILES)
    return np.stack(
        [
            exposure.equalize_hist(lum),
            exposure.rescale_intensity(lum, in_range=(low, high), out_range=(0.0, 1.0)),
            exposure.equalize_adapthist(lum),
        ],
        axis=-1,
    )


def encode_photo(path: str, sha256: str, with_variants: bool) -> tuple[int, bytes, bytes]:
    """One JPEG → (size, Lab float16 bytes [S,S,3], L variants float16 bytes [S,S,V]). Runs in a worker."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ChromalabError(f"{path}: cannot read it ({exc.strerror}): re-run the images stage") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ChromalabError(f"{path}: its content does not match the sha256 in {MANIFEST}: re-run the images stage")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ChromalabError(f"{path}: not a readable image ({reason}): delete it and re-run the images stage") from None
    height, width = rgb.shape[:2]
    if height != width:
        raise ChromalabError(f"{path}: {width}x{height} is not square: re-run the images stage")
    lab = rgb_to_lab_norm(rgb)
    variants = contrast_variants(lab[..., 0]) if with_variants else np.zeros((height, width, 0))
    return height, lab.astype(STORAGE_DTYPE).tobytes(), variants.astype(STORAGE_DTYPE).tobytes()


def read_manifest(images_dir: Path) -> list[ManifestPhoto]:
    """The images stage's manifest, checked: known splits, unique ids, no empty split."""
    manifest = Path(images_dir) / MANIFEST
    if not manifest.is_file():
        raise ChromalabError(f"{manifest} not found: run the images stage first (`dvc repro images`)")
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ChromalabError(f"{manifest}: no column(s) {', '.join(missing)}: re-run the images stage")
        rows = list(reader)
    photos, seen = [], set()
    for line, row in enumerate(rows, start=2):
        if row["split"] not in SPLITS:
            raise ChromalabError(
                f"{manifest} line {line}: split {row['split']!r} is not one of {', '.join(SPLITS)}: "
                "re-run the images stage"
            )
        if row["photo_id"] in seen:
            raise ChromalabError(f"{manifest} line {line}: photo {row['photo_id']} is listed twice: re-run the images stage")
        seen.add(row["photo_id"])
        photos.append(ManifestPhoto(row["photo_id"], row["split"], Path(images_dir) / row["file"], row["sha256"]))
    for split in SPLITS:
        if not any(p.split == split for p in photos):
            raise ChromalabError(
                f"{manifest}: the {split} split has no photos: check split.n_{split} and re-run the split and images stages"
            )
    return photos


def content_hash(photos: list[ManifestPhoto], variant_names: tuple[str, ...]) -> str:
    """The dataset's identity: every photo's split, id and file hash, in order, plus what was stored of it."""
    digest = hashlib.sha256()
    recipe = {"format": FORMAT_VERSION, "normalisation": NORMALISATION, "variants": list(variant_names)}
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for photo in photos:
        digest.update(f"\n{photo.split}\t{photo.photo_id}\t{photo.sha256}".encode())
    return digest.hexdigest()


def shard_names(split: str, count: int, shard_size: int) -> list[str]:
    n_shards = math.ceil(count / shard_size)
    return [f"{split}-{i:05d}-of-{n_shards:05d}.tfrecord" for i in range(n_shards)]


@contextmanager
def _photo_encoder(workers: int) -> Iterator[Callable]:
    """An ordered `map` of encode_photo: in this process for one worker, else over a process pool."""
    if workers == 1:
        yield functools.partial(map, encode_photo)
        return
    # spawn, not fork: the parent may already run TensorFlow's threads, which fork does not carry safely.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield functools.partial(pool.map, encode_photo, chunksize=POOL_CHUNKSIZE)
    finally:
        # After an error, report it now rather than after encoding every remaining photo.
        pool.shutdown(wait=True, cancel_futures=True)


def _example(photo_id: str, size: int, lab: bytes, variants: bytes) -> bytes:
    """One photo as a serialised tf.train.Example (chromalab.records: no TensorFlow needed to write)."""
    return encode_example({"photo_id": photo_id.encode(), "size": [size], "lab": lab, "l_variants": variants})


class _OneSize:
    """Every photo must have the first photo's size: the models take one fixed input shape."""

    def __init__(self) -> None:
        self.size: int | None = None
        self.first: Path | None = None

    def check(self, size: int, path: Path) -> None:
        if self.size is None:
            self.size, self.first = size, path
        elif size != self.size:
            raise ChromalabError(
                f"{path} is {size}x{size} px but {self.first} is {self.size}x{self.size}: all photos must have "
                "one size; re-run the images stage"
            )


def _write_split(encode: Callable, photos: list[ManifestPhoto], names: list[str], shard_size: int,
                 with_variants: bool, out_dir: Path, one_size: _OneSize) -> None:
    """Encode `photos` (one split) in order into the shards `names`."""
    split = photos[0].split
    results = encode([str(p.path) for p in photos], [p.sha256 for p in photos], [with_variants] * len(photos))
    with tqdm(total=len(photos), desc=f"tfrecords {split}", unit="photo") as progress:
        for index, name in enumerate(names):
            shard = photos[index * shard_size:(index + 1) * shard_size]
            with RecordWriter(out_dir / name) as writer:
                # zip takes from `shard` first, so it never pulls a result that belongs to the next shard.
                for photo, (size, lab, variants) in zip(shard, results):
                    one_size.check(size, photo.path)
                    writer.write(_example(photo.photo_id, size, lab, variants))
                    progress.update()


def run_tfrecords(params: Params, images_dir: Path = Path("data/images"), out_dir: Path = Path("data/tfrecords"),
                  *, workers: int | None = None) -> dict:
    """Convert the images stage's photos into Lab TFRecords + dataset.json in `out_dir`; returns dataset.json.

    `workers`: encoding processes (default: every available core). The folder is built beside `out_dir`
    and renamed into place, so an interrupted run leaves the previous dataset untouched.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    photos = read_manifest(images_dir)
    with_variants = params.tfrecords.contrast_variants
    variant_names = VARIANT_NAMES if with_variants else ()
    shard_size = params.tfrecords.shard_size
    by_split = {split: [p for p in photos if p.split == split] for split in SPLITS}
    shards = {split: shard_names(split, len(rows), shard_size) for split, rows in by_split.items()}
    workers = workers or min(available_cores(), len(photos))

    with staged_dir(out_dir) as build_dir:
        one_size = _OneSize()
        with _photo_encoder(workers) as encode:
            for split in SPLITS:
                _write_split(encode, by_split[split], shards[split], shard_size, with_variants, build_dir, one_size)
        info = {
            "format": FORMAT_VERSION,
            "image_size": one_size.size,
            "channels": {"lab": 3, "l_variants": len(variant_names)},
            "normalisation": NORMALISATION,
            "variants": list(variant_names),
            "counts": {split: len(rows) for split, rows in by_split.items()},
            "shard_size": shard_size,
            "shards": shards,
            "content_hash": content_hash(photos, variant_names),
        }
        (build_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    megabytes = sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6
    counts = ", ".join(f"{n} {split}" for split, n in info["counts"].items())
    print(f"tfrecords: {counts} photos at {info['image_size']} px → {out_dir} ({megabytes:.1f} MB)", file=sys.stderr)
    return info


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def read_dataset_info(data_dir: Path = Path("data/tfrecords")) -> dict:
    """The dataset.json the tfrecords stage wrote."""
    path = Path(data_dir) / INFO_FILE
    if not path.is_file():
        raise ChromalabError(f"{path} not found: run the tfrecords stage first (`dvc repro tfrecords`)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ChromalabError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}): re-run the tfrecords stage") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_VERSION:
        raise ChromalabError(f"{path} is not format {FORMAT_VERSION} of this project's dataset: re-run the tfrecords stage")
    return info


def _check_split(info: dict, split: str) -> str:
    if split not in info["shards"]:
        raise ChromalabError(f"unknown split {split!r}: choose one of {', '.join(info['shards'])}")
    return split


def split_paths(data_dir: Path, info: dict, split: str) -> list[Path]:
    """The shard files of `split`, in order; each must exist."""
    paths = [Path(data_dir) / name for name in info["shards"][_check_split(info, split)]]
    for path in paths:
        if not path.is_file():
            raise ChromalabError(f"{path} is missing: re-run the tfrecords stage (`dvc repro tfrecords`)")
    return paths


def decode_photo(data: bytes, info: dict, path: Path, number: int) -> tuple[str, np.ndarray, np.ndarray]:
    """One record → (photo_id, L stack float16 [S,S,1+V], ab float16 [S,S,2]), as `_records` gives it.

    NumPy only: the JAX backend reads the records with this (chromalab.records), TensorFlow not needed.
    """
    size, n_variants = int(info["image_size"]), len(info["variants"])
    try:
        example = decode_example(data)
        (photo_id,), (lab,), (variants,) = example["photo_id"], example["lab"], example["l_variants"]
        lab = np.frombuffer(lab, STORAGE_DTYPE).reshape(size, size, 3)
        variants = np.frombuffer(variants, STORAGE_DTYPE).reshape(size, size, n_variants)
    except (KeyError, ValueError, TypeError) as exc:
        raise ChromalabError(f"{path}: record {number} is not a {size} px photo of this dataset ({exc}): {REDO}") from None
    return photo_id.decode(), np.concatenate([lab[..., :1], variants], axis=-1), lab[..., 1:]


def read_split(data_dir: Path, split: str, n_l_channels: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Photo ids, L stack float16 [N,S,S,C] (original L, then variants; the first `n_l_channels`) and ab
    float16 [N,S,S,2] of `split` in file order, read without TensorFlow, every record's checksums checked."""
    info = read_dataset_info(data_dir)
    n_photos, size = int(info["counts"][_check_split(info, split)]), int(info["image_size"])
    channels = 1 + len(info["variants"]) if n_l_channels is None else n_l_channels
    ids: list[str] = []
    lum = np.empty((n_photos, size, size, channels), STORAGE_DTYPE)
    ab = np.empty((n_photos, size, size, 2), STORAGE_DTYPE)
    for path in split_paths(data_dir, info, split):
        for number, data in enumerate(read_records(path), start=1):
            if len(ids) == n_photos:
                raise ChromalabError(f"{path}: more records than the {n_photos} {split} photos dataset.json counts: {REDO}")
            photo_id, l_stack, photo_ab = decode_photo(data, info, path, number)
            lum[len(ids)], ab[len(ids)] = l_stack[..., :channels], photo_ab
            ids.append(photo_id)
    if len(ids) != n_photos:
        raise ChromalabError(f"{data_dir}: {len(ids)} {split} records but dataset.json counts {n_photos}: {REDO}")
    return ids, lum, ab


def _records(data_dir: Path, info: dict, split: str) -> "tf.data.Dataset":
    """(photo_id, L stack float16 [S,S,1+V] = original L then its variants, ab float16 [S,S,2]), in file order."""
    import tensorflow as tf

    paths = split_paths(data_dir, info, split)
    size, n_variants = int(info["image_size"]), len(info["variants"])
    features = {
        "photo_id": tf.io.FixedLenFeature([], tf.string),
        "lab": tf.io.FixedLenFeature([], tf.string),
        "l_variants": tf.io.FixedLenFeature([], tf.string),
    }

    def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(record, features)
        lab = tf.reshape(tf.io.decode_raw(example["lab"], tf.float16), [size, size, 3])
        variants = tf.reshape(tf.io.decode_raw(example["l_variants"], tf.float16), [size, size, n_variants])
        return example["photo_id"], tf.concat([lab[..., :1], variants], axis=-1), lab[..., 1:]

    # Sequential reading keeps file order; the stated count makes len(dataset) known and is checked at the end.
    records = tf.data.TFRecordDataset([str(p) for p in paths])
    records = records.apply(tf.data.experimental.assert_cardinality(int(info["counts"][split])))
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def make_dataset(data_dir: Path, split: str, batch_size: int, *, training: bool, flip_lr: bool = True,
                 flip_ud: bool = False, contrast_aug: bool = True, seed: int = 0, epochs: int = 1,
                 initial_epoch: int = 0, cache: bool = True,
                 drop_remainder: bool | None = None) -> "tf.data.Dataset":
    """Batches of (L [B,S,S,1], ab [B,S,S,2]) float32 from `split`.

    training: the batches of epochs `initial_epoch` … `epochs - 1` (as in Keras' `fit`; pass `fit` the
    `steps_per_epoch`), one after the other. Epoch e visits the photos in `epoch_order(seed, e, n)`; each
    photo's random left-right / up-down flip (L and ab together) and, with `contrast_aug`, its L channel
    drawn uniformly from the original and its precomputed variants, are seeded by (seed, e, position), so
    epoch e is the same whenever and wherever it runs. An epoch's last partial batch is dropped unless that
    would leave no batch. Otherwise: file order, no augmentation, every photo. `cache` keeps the decoded
    float16 records in memory (at 256 px: 1.5 MiB a photo with contrast_aug, 0.75 MiB without), so later
    epochs read no file.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ChromalabError(f"batch_size must be at least 1, got {batch_size}")
    info = read_dataset_info(data_dir)
    n_photos = int(info["counts"][_check_split(info, split)])
    n_variants = len(info["variants"])
    if training and contrast_aug and not n_variants:
        warnings.warn(f"{data_dir} was built without contrast variants (tfrecords.contrast_variants: false), "
                      "so contrast_aug has nothing to pick from", stacklevel=2)
    # L channels to keep: the original, plus its variants only where training will draw from them.
    n_choices = 1 + n_variants if training and contrast_aug else 1
    dataset = _records(data_dir, info, split).map(lambda photo_id, l_stack, ab: (l_stack[..., :n_choices], ab))

    if training:
        if not 0 <= initial_epoch < epochs:
            raise ChromalabError(f"make_dataset: need 0 <= initial_epoch < epochs, got {initial_epoch} and {epochs}")

        def augment(l_stack: tf.Tensor, ab: tf.Tensor, seed_pair: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            pick_seed, lr_seed, ud_seed = tf.unstack(tf.random.experimental.stateless_split(seed_pair, 3))
            lum = l_stack
            if n_choices > 1:  # gather, not a slice, so the channel count stays static (1) for Keras
                choice = tf.random.stateless_uniform([1], pick_seed, minval=0, maxval=n_choices, dtype=tf.int32)
                lum = tf.gather(l_stack, choice, axis=-1)
            # One tensor, one flip: L and ab can never be flipped differently.
            image = tf.concat([lum, ab], axis=-1)
            if flip_lr:
                image = tf.image.stateless_random_flip_left_right(image, lr_seed)
            if flip_ud:
                image = tf.image.stateless_random_flip_up_down(image, ud_seed)
            image = tf.cast(image, tf.float32)
            return image[..., :1], image[..., 1:]

        # The whole split as one element, so that any epoch's order can pick photos by index.
        whole = dataset.batch(n_photos)
        if cache:
            whole = whole.cache()
        steps = steps_per_epoch(n_photos, batch_size)
        if drop_remainder is None:
            drop_remainder = n_photos >= batch_size
        orders = np.stack([epoch_order(seed, e, n_photos) for e in range(initial_epoch, epochs)])

        def one_epoch(epoch: tf.Tensor, order: tf.Tensor) -> tf.data.Dataset:
            def photos(l_all: tf.Tensor, ab_all: tf.Tensor) -> tf.data.Dataset:
                def pick(position: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                    # Stateless ops seeded by (seed, epoch, position): reproducible under parallel map.
                    seed_pair = tf.random.experimental.stateless_fold_in(
                        tf.stack([tf.constant(seed, tf.int64), epoch]), position)
                    return augment(l_all[index], ab_all[index], seed_pair)

                positions = tf.range(n_photos, dtype=tf.int64)
                return tf.data.Dataset.from_tensor_slices((positions, order)).map(
                    pick, num_parallel_calls=tf.data.AUTOTUNE)

            return whole.flat_map(photos).batch(batch_size, drop_remainder=drop_remainder)

        epoch_ids = np.arange(initial_epoch, epochs, dtype=np.int64)
        dataset = tf.data.Dataset.from_tensor_slices((epoch_ids, orders)).flat_map(one_epoch)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality((epochs - initial_epoch) * steps))
    else:
        if cache:
            dataset = dataset.cache()
        dataset = dataset.map(lambda lum, ab: (tf.cast(lum, tf.float32), tf.cast(ab, tf.float32)),
                              num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.batch(batch_size, drop_remainder=bool(drop_remainder))
    # Across workers, shard by example: sharding by file fails when a split has fewer files than workers.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE)


def load_split_arrays(data_dir: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Photo ids, L [N,S,S,1] and ab [N,S,S,2] float32 of `split`, in file order (no augmentation)."""
    ids, lum, ab = read_split(data_dir, split, n_l_channels=1)
    return ids, lum.astype(np.float32), ab.astype(np.float32)
