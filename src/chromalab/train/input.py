"""What `fit` trains and validates on, under either backend: the same batches for the same params.

Each epoch's photo order and augmentation draws come from chromalab.train.epochs (a function of (seed, epoch)
alone) and are applied by chromalab.train.augment (keras.ops), so a resumed run repeats an uninterrupted one
and the two backends agree batch for batch.

- TensorFlow: tf.data over the records (`make_dataset`); the split is cached decoded in memory.
- JAX, no TensorFlow: the split is read once (chromalab.data.dataset) and placed on the accelerator; each
  step hands over the indices and draws of its batch, and a compiled function gathers and augments there.
  When the split would take more than `train.device_data_max_gb`, or several devices share each batch
  (Keras shards every input along its first axis), the records are streamed instead: each step's photos
  are read by random access from the shards in a background thread, and augmented the same way.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from chromalab.data.dataset import (check_split, decode_photo, load_split_arrays, read_dataset_info, read_split,
                                    records_dataset, split_paths)
from chromalab.errors import ChromalabError
from chromalab.train.augment import augment_batch
from chromalab.train.epochs import Augment, epoch_plan, steps_per_epoch

GIB = 2**30
VALIDATION_SPLIT = "val"


def augment_for(data_dir: Path, info: dict, flip_lr: bool, flip_ud: bool, contrast_aug: bool) -> Augment:
    """The augmentation the params ask for, on what the records (`info`: their dataset.json) hold."""
    n_variants = len(info["variants"])
    if contrast_aug and not n_variants:
        warnings.warn(f"{data_dir} was built without contrast variants (tfrecords.contrast_variants: false), "
                      "so contrast_aug has nothing to pick from", stacklevel=3)
    return Augment(1 + n_variants if contrast_aug else 1, flip_lr, flip_ud)


def epoch_plans(seed: int, n_photos: int, batch_size: int, augment: Augment, epochs: range) -> Iterator[tuple]:
    """(epoch, step, photo indices, draws) for every step of `epochs`."""
    for epoch in epochs:
        indices, draws = epoch_plan(seed, epoch, n_photos, batch_size, augment)
        for step in range(len(indices)):
            yield epoch, step, indices[step], draws[step]


# --- TensorFlow: tf.data ------------------------------------------------------------------------------------


def make_dataset(data_dir: Path, split: str, batch_size: int, *, training: bool, flip_lr: bool = True,
                 flip_ud: bool = False, contrast_aug: bool = True, seed: int = 0, epochs: int = 1,
                 initial_epoch: int = 0, cache: bool = True) -> "tf.data.Dataset":  # noqa: F821
    """Batches of (L [B,S,S,1], ab [B,S,S,2]) float32 from `split`.

    training: the batches of epochs `initial_epoch` … `epochs - 1` (as in Keras' `fit`; pass `fit` the
    `steps_per_epoch`), one after the other, as chromalab.train.epochs plans them. Otherwise: file order,
    no augmentation, every photo. `cache` keeps the decoded float16 records in memory, so later epochs read
    no file.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ChromalabError(f"batch_size must be at least 1, got {batch_size}")
    info = read_dataset_info(data_dir)
    n_photos = int(info["counts"][check_split(info, split)])
    records = records_dataset(data_dir, info, split)
    if training:
        if not 0 <= initial_epoch < epochs:
            raise ChromalabError(f"make_dataset: need 0 <= initial_epoch < epochs, got {initial_epoch} and {epochs}")
        augment = augment_for(data_dir, info, flip_lr, flip_ud, contrast_aug)
        dataset = _training_batches(records, n_photos, batch_size, augment, seed, range(initial_epoch, epochs), cache)
    else:
        dataset = records.map(lambda photo_id, l_stack, ab: (tf.cast(l_stack[..., :1], tf.float32),
                                                             tf.cast(ab, tf.float32)))
        dataset = (dataset.cache() if cache else dataset).batch(batch_size)
    # Across workers, shard by example: sharding by file fails when a split has fewer files than workers.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _training_batches(records, n_photos: int, batch_size: int, augment: Augment, seed: int, epochs: range,
                      cache: bool) -> "tf.data.Dataset":  # noqa: F821
    import tensorflow as tf

    plans = [epoch_plan(seed, epoch, n_photos, batch_size, augment) for epoch in epochs]
    indices = np.concatenate([plan[0] for plan in plans])
    draws = np.concatenate([plan[1] for plan in plans])
    # The whole split as one element, so that any step can gather its photos by index.
    whole = records.map(lambda photo_id, l_stack, ab: (l_stack[..., : augment.n_choices], ab)).batch(n_photos)
    whole = whole.cache() if cache else whole

    def steps(l_all, ab_all):
        def one_step(index, step_draws):
            return augment_batch(tf.gather(l_all, index), tf.gather(ab_all, index), step_draws, augment)

        return tf.data.Dataset.from_tensor_slices((indices, draws)).map(one_step, num_parallel_calls=tf.data.AUTOTUNE)

    dataset = whole.flat_map(steps)
    return dataset.apply(tf.data.experimental.assert_cardinality(len(indices)))


# --- JAX: the split on the device, or streamed ---------------------------------------------------------------


class ArrayBatches(keras.utils.PyDataset):
    """Validation batches (L, ab) float32 from arrays in memory, every photo, in order."""

    def __init__(self, L: np.ndarray, ab: np.ndarray, batch_size: int):
        super().__init__()
        self.L, self.ab, self.batch_size = L, ab, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.L) / self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.L[rows], self.ab[rows]


def split_nbytes(info: dict, split: str, n_choices: int) -> int:
    """Bytes the split takes as float16 arrays: L channels kept plus ab."""
    size = int(info["image_size"])
    return int(info["counts"][split]) * size * size * (n_choices + 2) * 2


@dataclass
class JaxTrainingFeed:
    """An endless iterator of augmented batches from `initial_epoch` on, for `fit` under JAX."""

    data_dir: Path
    batch: int
    steps_per_epoch: int
    seed: int
    augment: Augment
    on_device: bool
    n_photos: int

    def batches(self, initial_epoch: int = 0) -> Iterator[tuple]:
        plans = epoch_plans(self.seed, self.n_photos, self.batch, self.augment, _endless(initial_epoch))
        return self._device_batches(plans) if self.on_device else self._streamed_batches(plans)

    def _device_batches(self, plans: Iterator[tuple]) -> Iterator[tuple]:
        import jax

        _, lum, ab = read_split(self.data_dir, "train", n_l_channels=self.augment.n_choices)
        # Once, for the whole run: from here on a step hands over only indices and draws.
        L_src, ab_src = jax.device_put(lum), jax.device_put(ab)
        del lum, ab
        augment = self.augment

        @jax.jit
        def gather_and_augment(L_all, ab_all, index, draws):
            return augment_batch(keras.ops.take(L_all, index, axis=0), keras.ops.take(ab_all, index, axis=0),
                                 draws, augment)

        for _, _, index, draws in plans:
            yield gather_and_augment(L_src, ab_src, index, draws)

    def _streamed_batches(self, plans: Iterator[tuple]) -> Iterator[tuple]:
        import jax

        from chromalab.data.records import RecordIndex

        info = read_dataset_info(self.data_dir)
        index = RecordIndex(split_paths(self.data_dir, info, "train"))
        # Several processes: each feeds its own rows of the global batch (Keras assembles the global array).
        count, rank = jax.process_count(), jax.process_index()
        local = slice(rank * self.batch // count, (rank + 1) * self.batch // count)
        augment = jax.jit(lambda lum, ab, draws: augment_batch(lum, ab, draws, self.augment))

        def read(photos: np.ndarray, draws: np.ndarray) -> tuple:
            stacks = [decode_photo(index.read(int(i)), info, *index.location(int(i)))[1:] for i in photos[local]]
            lum = np.stack([s[0][..., : self.augment.n_choices] for s in stacks])
            L, ab = augment(lum, np.stack([s[1] for s in stacks]), draws[local])
            return np.asarray(L), np.asarray(ab)  # local rows, on the host: Keras places the global batch

        with ThreadPoolExecutor(1, thread_name_prefix="chromalab-records") as reader:
            pending = reader.submit(read, *next(plans)[2:])
            try:
                for plan in plans:  # read the next batch while the device trains on this one
                    current, pending = pending, reader.submit(read, *plan[2:])
                    yield current.result()
            finally:
                index.close()


def _endless(first: int) -> Iterator[int]:
    epoch = first
    while True:
        yield epoch
        epoch += 1


def jax_training_feed(data_dir: Path, batch_size: int, *, flip_lr: bool, flip_ud: bool, contrast_aug: bool,
                      seed: int, max_gb: float, distributed: bool = False) -> JaxTrainingFeed:
    """The JAX feed for `data_dir`'s training split: on the device if it fits `max_gb` and one device trains."""
    info = read_dataset_info(data_dir)
    n_photos = int(info["counts"]["train"])
    augment = augment_for(data_dir, info, flip_lr, flip_ud, contrast_aug)
    nbytes = split_nbytes(info, "train", augment.n_choices)
    on_device = not distributed and nbytes <= max_gb * GIB
    if not on_device:
        why = "several devices share each batch" if distributed else \
            f"the split takes {nbytes / GIB:.1f} GiB > train.device_data_max_gb = {max_gb:g}"
        print(f"training data: streamed from {data_dir} ({why})", file=sys.stderr)
    batch = min(batch_size, n_photos)  # as tf.data: fewer photos than a batch make one smaller batch
    return JaxTrainingFeed(Path(data_dir), batch, steps_per_epoch(n_photos, batch_size), seed, augment,
                           on_device, n_photos)


# --- either backend ----------------------------------------------------------------------------------------


@dataclass
class TrainingInput:
    """What `fit` trains on (None when no epoch is left) and validates on."""

    train: object
    validation: object


def training_input(data_dir: Path, global_batch: int, train_params, seed: int, *, epochs: int,
                   initial_epoch: int = 0, distributed: bool = False) -> TrainingInput:
    """Epochs `initial_epoch` … `epochs - 1` of the training split, and the val split for validation (never
    test: what chooses among epochs must not be what scores the result)."""
    p = train_params
    remaining = initial_epoch < epochs
    if keras.backend.backend() == "jax":
        feed = jax_training_feed(data_dir, global_batch, flip_lr=p.flip_lr, flip_ud=p.flip_ud,
                                 contrast_aug=p.contrast_aug, seed=seed, max_gb=p.device_data_max_gb,
                                 distributed=distributed)
        _, L, ab = load_split_arrays(data_dir, VALIDATION_SPLIT)
        return TrainingInput(feed.batches(initial_epoch) if remaining else None, ArrayBatches(L, ab, global_batch))
    train = make_dataset(data_dir, "train", global_batch, training=True, flip_lr=p.flip_lr, flip_ud=p.flip_ud,
                         contrast_aug=p.contrast_aug, seed=seed, epochs=epochs,
                         initial_epoch=initial_epoch) if remaining else None
    return TrainingInput(train, make_dataset(data_dir, VALIDATION_SPLIT, global_batch, training=False))
