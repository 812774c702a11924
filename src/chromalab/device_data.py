"""Training input under the JAX backend, without TensorFlow: the training split lives on the accelerator.

The split (L and its contrast variants, ab; float16 as stored) is read from the records once
(chromalab.records) and placed on the device. Each step then receives only the indices of its batch, from
the epoch's permutation (chromalab.epochs), plus one (seed, epoch, step, row) tuple per photo; the gather,
the choice of contrast variant, the flips and the cast to float32 run inside the compiled train step
(`attach` wraps the model's train_step). Augmentation randomness comes from (seed, epoch, step, row) alone,
so a resumed run repeats an uninterrupted one.

When the split would take more than `train.device_data_max_gb`, or the batch is split over several devices
(Keras shards every input along its first axis), the records are streamed instead: each step's photos are
read by random access from the shards (the same permutation, so the same batches), in a background thread,
and the same compiled augmentation applies.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from chromalab.epochs import epoch_order, steps_per_epoch
from chromalab.tfrecords import decode_photo, load_split_arrays, read_dataset_info, read_split, split_paths

GIB = 2**30


@dataclass(frozen=True)
class Augment:
    flip_lr: bool
    flip_ud: bool
    n_choices: int  # L channels to draw from: 1 = the original only


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


def _row_info(seed: int, epoch: int, step: int, batch: int) -> np.ndarray:
    """(seed, epoch, step, row) per photo of the batch: all the augmentation's randomness derives from it."""
    rows = np.empty((batch, 4), np.int32)
    rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = seed, epoch, step, np.arange(batch)
    return rows


def augment_batch(data, augment: Augment):
    """Inside the compiled step: (L stack, ab, [indices,] rows) → (L [B,S,S,1], ab [B,S,S,2]) float32."""
    import jax
    import jax.numpy as jnp

    if len(data) == 4:  # on the device: gather this step's photos from the whole split
        L_src, ab_src, index, rows = data
        lum, ab = jnp.take(L_src, index, axis=0), jnp.take(ab_src, index, axis=0)
    else:  # streamed: the batch itself
        lum, ab, rows = data

    def draws(row):
        key = jax.random.key(row[0])
        for value in row[1:]:
            key = jax.random.fold_in(key, value)
        pick, lr, ud = jax.random.split(key, 3)
        return (jax.random.randint(pick, (), 0, augment.n_choices), jax.random.bernoulli(lr),
                jax.random.bernoulli(ud))

    choice, flip_lr, flip_ud = jax.vmap(draws)(rows)
    if augment.n_choices > 1:
        lum = jnp.take_along_axis(lum[..., : augment.n_choices], choice[:, None, None, None], axis=-1)
    else:
        lum = lum[..., :1]
    image = jnp.concatenate([lum, ab], axis=-1)  # one tensor, one flip: L and ab always flip together
    if augment.flip_lr:
        image = jnp.where(flip_lr[:, None, None, None], image[:, :, ::-1], image)
    if augment.flip_ud:
        image = jnp.where(flip_ud[:, None, None, None], image[:, ::-1], image)
    image = image.astype(jnp.float32)
    return image[..., :1], image[..., 1:]


@dataclass
class JaxTrainingFeed:
    """What `fit` needs: an endless batch iterator from `initial_epoch`, steps per epoch, and the model hook."""

    data_dir: Path
    batch: int
    steps_per_epoch: int
    seed: int
    augment: Augment
    on_device: bool
    n_photos: int

    def batches(self, initial_epoch: int = 0) -> Iterator[tuple]:
        return self._device_batches(initial_epoch) if self.on_device else self._streamed_batches(initial_epoch)

    def _epoch_indices(self, epoch: int) -> list[np.ndarray]:
        order = epoch_order(self.seed, epoch, self.n_photos).astype(np.int32)
        return [order[s * self.batch:(s + 1) * self.batch] for s in range(self.steps_per_epoch)]

    def _device_batches(self, initial_epoch: int) -> Iterator[tuple]:
        import jax

        _, lum, ab = read_split(self.data_dir, "train", n_l_channels=self.augment.n_choices)
        # Once, for the whole run: from here on a step hands over only indices.
        L_src, ab_src = jax.device_put(lum), jax.device_put(ab)
        del lum, ab
        epoch = initial_epoch
        while True:
            for step, index in enumerate(self._epoch_indices(epoch)):
                yield L_src, ab_src, index, _row_info(self.seed, epoch, step, self.batch)
            epoch += 1

    def _streamed_batches(self, initial_epoch: int) -> Iterator[tuple]:
        import jax

        from chromalab.records import RecordIndex

        info = read_dataset_info(self.data_dir)
        index = RecordIndex(split_paths(self.data_dir, info, "train"))
        # Several processes: each feeds its own rows of the global batch (Keras assembles the global array).
        count, rank = jax.process_count(), jax.process_index()
        local = slice(rank * self.batch // count, (rank + 1) * self.batch // count)

        def read(epoch: int, step: int, photos: np.ndarray) -> tuple:
            stacks = [decode_photo(index.read(int(i)), info, *index.location(int(i)))[1:] for i in photos[local]]
            lum = np.stack([s[0][..., : self.augment.n_choices] for s in stacks])
            ab = np.stack([s[1] for s in stacks])
            return lum, ab, _row_info(self.seed, epoch, step, self.batch)[local]

        def plan() -> Iterator[tuple[int, int, np.ndarray]]:
            epoch = initial_epoch
            while True:
                for step, photos in enumerate(self._epoch_indices(epoch)):
                    yield epoch, step, photos
                epoch += 1

        with ThreadPoolExecutor(1, thread_name_prefix="chromalab-records") as reader:
            steps = plan()
            pending = reader.submit(read, *next(steps))
            try:
                for nxt in steps:  # read the next batch while the device trains on this one
                    current, pending = pending, reader.submit(read, *nxt)
                    yield current.result()
            finally:
                index.close()

    def attach(self, model: keras.Model) -> None:
        """Make `model`'s compiled train step augment the batches this feed hands it."""
        augment = self.augment
        inner = model.train_step

        def train_step(state, data):
            return inner(state, augment_batch(data, augment))

        if getattr(model, "_compile_loss", None) is not None or getattr(model, "_compile_metrics", None) is not None:
            # Keras builds a compiled loss/metrics from the first batch's shapes, which are this feed's own:
            # build them from a batch of the model's (L, ab) shapes instead.
            size = int(model.inputs[0].shape[1])
            example = (np.zeros((1, size, size, 1), np.float32), np.zeros((1, size, size, 2), np.float32))
            model._symbolic_build(data_batch=example)
        model.train_step = train_step


def jax_training_feed(data_dir: Path, batch_size: int, *, flip_lr: bool, flip_ud: bool, contrast_aug: bool,
                      seed: int, max_gb: float, distributed: bool = False) -> JaxTrainingFeed:
    """The JAX feed for `data_dir`'s training split: on the device if it fits `max_gb` and one device trains."""
    info = read_dataset_info(data_dir)
    n_photos = int(info["counts"]["train"])
    n_variants = len(info["variants"])
    n_choices = 1 + n_variants if contrast_aug else 1
    batch = min(batch_size, n_photos)  # as tf.data: fewer photos than a batch make one smaller batch
    nbytes = split_nbytes(info, "train", n_choices)
    on_device = not distributed and nbytes <= max_gb * GIB
    if not on_device:
        why = "several devices share each batch" if distributed else \
            f"the split takes {nbytes / GIB:.1f} GiB > train.device_data_max_gb = {max_gb:g}"
        print(f"training data: streamed from {data_dir} ({why})", file=sys.stderr)
    return JaxTrainingFeed(Path(data_dir), batch, steps_per_epoch(n_photos, batch_size), seed,
                           Augment(flip_lr, flip_ud, n_choices), on_device, n_photos)


def validation_batches(data_dir: Path, batch_size: int) -> ArrayBatches:
    _, L, ab = load_split_arrays(data_dir, "test")
    return ArrayBatches(L, ab, batch_size)


@dataclass
class TrainingInput:
    """What `fit` trains on under the current backend: data, validation data, and `prepare(model)`, to call
    on the compiled model before `fit` (steps per epoch: chromalab.epochs.steps_per_epoch on both)."""

    train: object
    validation: object
    feed: JaxTrainingFeed | None = None

    def prepare(self, model: keras.Model) -> None:
        if self.feed is not None:
            self.feed.attach(model)


def training_input(data_dir: Path, global_batch: int, train_params, seed: int, *, epochs: int,
                   initial_epoch: int = 0, distributed: bool = False) -> TrainingInput:
    """JAX: this module's feed (no TensorFlow); TensorFlow: tf.data (chromalab.tfrecords.make_dataset).

    Both feed epochs `initial_epoch` … `epochs - 1` in chromalab.epochs' order; `train` is None when none is left.
    """
    p = train_params
    if keras.backend.backend() == "jax":
        feed = jax_training_feed(data_dir, global_batch, flip_lr=p.flip_lr, flip_ud=p.flip_ud,
                                 contrast_aug=p.contrast_aug, seed=seed, max_gb=p.device_data_max_gb,
                                 distributed=distributed)
        train = feed.batches(initial_epoch) if initial_epoch < epochs else None
        return TrainingInput(train, validation_batches(data_dir, global_batch), feed)
    from chromalab.tfrecords import make_dataset

    train = make_dataset(data_dir, "train", global_batch, training=True, flip_lr=p.flip_lr, flip_ud=p.flip_ud,
                         contrast_aug=p.contrast_aug, seed=seed, epochs=epochs,
                         initial_epoch=initial_epoch) if initial_epoch < epochs else None
    return TrainingInput(train, make_dataset(data_dir, "test", global_batch, training=False))
