"""Stage `tfrecords`: data/images → normalised Lab TFRecords (read by chromalab.data.dataset).

The records hold exactly what the models consume, so training decodes no JPEG and converts no colour:
Lab as (L/100, a/128, b/128) in float16, plus — with `tfrecords.contrast_variants` — the seed's three
contrast augmentations of L, precomputed once here so that training picks one at random at no CPU cost.
float16 keeps a 256 px photo at 768 KiB (1.5 MiB with the variants) and is exact to about 0.03 Lab units.

Layout of `data/tfrecords`: `train-00000-of-00008.tfrecord`, …, `test-00000-of-00001.tfrecord`,
`val-00000-of-00001.tfrecord` (manifest order, `tfrecords.shard_size` photos per shard) and `dataset.json` (counts, size, normalisation, variant
names, shard names, and a content hash that training logs as the dataset's identity).

The files are standard TFRecords of tf.train.Example, written by chromalab.data.records without TensorFlow.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import exposure
from tqdm import tqdm

from chromalab.color import rgb_to_lab_norm
from chromalab.config import Params
from chromalab.data.dataset import FORMAT_VERSION, INFO_FILE, NORMALISATION, STORAGE_DTYPE
from chromalab.data.formats import MANIFEST, MANIFEST_FIELDS, FETCHED_SPLITS
from chromalab.data.records import RecordWriter, encode_example
from chromalab.devices import available_cores
from chromalab.entry import end_with_parent
from chromalab.errors import ChromalabError
from chromalab.files import READ_ERRORS, staged_dir

MANIFEST_COLUMNS = MANIFEST_FIELDS[:4]  # what this stage reads of the manifest (not `source`)
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
    except READ_ERRORS as exc:
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
        if row["split"] not in FETCHED_SPLITS:
            raise ChromalabError(
                f"{manifest} line {line}: split {row['split']!r} is not one of {', '.join(FETCHED_SPLITS)}: "
                "re-run the images stage"
            )
        if row["photo_id"] in seen:
            raise ChromalabError(f"{manifest} line {line}: photo {row['photo_id']} is listed twice: re-run the images stage")
        seen.add(row["photo_id"])
        photos.append(ManifestPhoto(row["photo_id"], row["split"], Path(images_dir) / row["file"], row["sha256"]))
    for split in FETCHED_SPLITS:
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
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_end_with_parent, initargs=(os.getpid(),))
    try:
        yield functools.partial(_map_spawning_deaf_to_ctrl_c, pool)
    finally:
        # After an error, report it now rather than after encoding every remaining photo.
        pool.shutdown(wait=True, cancel_futures=True)


def _map_spawning_deaf_to_ctrl_c(pool: ProcessPoolExecutor, *items) -> Iterator:
    """pool.map of encode_photo. The pool starts its workers here, as tasks come: each with SIGINT blocked
    (a thread's mask survives exec; CPython's resource tracker starts the same way), so that a Ctrl-C during
    its imports (about a second) stays pending until `_end_with_parent` drops it, instead of killing it with a
    traceback of its own. A Ctrl-C meanwhile still stops this process, once the mask is back."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows has no signal masks
        return pool.map(encode_photo, *items, chunksize=POOL_CHUNKSIZE)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.map(encode_photo, *items, chunksize=POOL_CHUNKSIZE)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _end_with_parent(parent: int) -> None:
    """In a pool worker: end when the stage's process does, even killed with -9, which closes no queue
    (elsewhere than Linux a worker still ends once it finds its queue gone). Ctrl-C reaches every process of
    the terminal's group: the stage stops its pool, so a worker need not print its own traceback. Ignoring
    SIGINT drops one pending since the worker started (`_map_spawning_deaf_to_ctrl_c`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    end_with_parent(parent)


def _example(photo_id: str, size: int, lab: bytes, variants: bytes) -> bytes:
    """One photo as a serialised tf.train.Example (chromalab.data.records: no TensorFlow needed to write)."""
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
    by_split = {split: [p for p in photos if p.split == split] for split in FETCHED_SPLITS}
    shards = {split: shard_names(split, len(rows), shard_size) for split, rows in by_split.items()}
    workers = workers or min(available_cores(), len(photos))

    with staged_dir(out_dir) as build_dir:
        one_size = _OneSize()
        with _photo_encoder(workers) as encode:
            for split in FETCHED_SPLITS:
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
