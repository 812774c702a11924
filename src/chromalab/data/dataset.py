"""The dataset the tfrecords stage writes, as its readers see it: dataset.json, the shards, each photo.

Lab as (L/100, a/128, b/128) in float16 (STORAGE_DTYPE), and with `tfrecords.contrast_variants` the seed's
three contrast augmentations of L as extra channels. The files are standard TFRecords of tf.train.Example:
read here without TensorFlow (chromalab.data.records), or as a tf.data pipeline (`records_dataset`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chromalab.color import AB_SCALE, L_SCALE
from chromalab.data.records import REDO, decode_example, read_records
from chromalab.errors import ChromalabError

if TYPE_CHECKING:
    import tensorflow as tf

INFO_FILE = "dataset.json"
FORMAT_VERSION = 2  # 2: a val split beside train and test (training validates on it, not on test)
# Little-endian float16, as tf.io.decode_raw(..., tf.float16) reads it on every platform.
STORAGE_DTYPE = np.dtype("<f2")
NORMALISATION = {"L": L_SCALE, "a": AB_SCALE, "b": AB_SCALE, "dtype": "float16", "layout": "HWC"}




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


def check_split(info: dict, split: str) -> str:
    if split not in info["shards"]:
        raise ChromalabError(f"unknown split {split!r}: choose one of {', '.join(info['shards'])}")
    return split


def split_paths(data_dir: Path, info: dict, split: str) -> list[Path]:
    """The shard files of `split`, in order; each must exist."""
    paths = [Path(data_dir) / name for name in info["shards"][check_split(info, split)]]
    for path in paths:
        if not path.is_file():
            raise ChromalabError(f"{path} is missing: re-run the tfrecords stage (`dvc repro tfrecords`)")
    return paths


def decode_photo(data: bytes, info: dict, path: Path, number: int) -> tuple[str, np.ndarray, np.ndarray]:
    """One record → (photo_id, L stack float16 [S,S,1+V], ab float16 [S,S,2]), as `_records` gives it.

    NumPy only: the JAX backend reads the records with this (chromalab.data.records), TensorFlow not needed.
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
    n_photos, size = int(info["counts"][check_split(info, split)]), int(info["image_size"])
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


def records_dataset(data_dir: Path, info: dict, split: str) -> "tf.data.Dataset":
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


def load_split_arrays(data_dir: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Photo ids, L [N,S,S,1] and ab [N,S,S,2] float32 of `split`, in file order (no augmentation)."""
    ids, lum, ab = read_split(data_dir, split, n_l_channels=1)
    return ids, lum.astype(np.float32), ab.astype(np.float32)
