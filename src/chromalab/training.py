"""Stage `train@<model>`: fit the baseline CNN or the pix2pix GAN on the Lab TFRecords.

Both models go through `model.fit`: the baseline with a compiled loss, the GAN as chromalab.gan.Pix2Pix.
A killed run resumes from its last checkpoint (weights, optimizer state, dropout RNG state, epoch, history and
the same MLflow run) and continues exactly as an uninterrupted run would: epoch e's photo order and
augmentation depend only on (seed, e) (chromalab.epochs.epoch_order), the learning-rate schedule on the
optimizer's restored step count, and MLflow only ever holds checkpointed epochs (EpochRecorder). Changed params
start afresh.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import ops

from chromalab import losses
from chromalab.color import lab_norm_to_rgb
from chromalab.config import MODEL_NAMES, Params, flatten
from chromalab.devices import gpu_names, hide_gpus_from_tensorflow, precision_policy, xla_choice
from chromalab.errors import ChromalabError
from chromalab.files import atomic_file, write_text_atomic
from chromalab.gan import VALIDATION_METRICS, Pix2Pix, validation_trackers
from chromalab.models import build_baseline, build_discriminator, build_generator
from chromalab.optimizers import FusedAdam

# --- device, precision, distribution ------------------------------------------------------------


UPSTREAM_MULTI_WORKER_BUG = "keras-team/keras#20585"


def cluster_from_tf_config() -> tuple[list[str], int] | None:
    """TF_CONFIG's tasks as (addresses, this process's index), the chief first, then the workers in order."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster = config["cluster"]
        tasks = [(kind, index) for kind in ("chief", "worker") for index in range(len(cluster.get(kind, [])))]
        addresses = [cluster[kind][index] for kind, index in tasks]
        process_id = tasks.index((config["task"]["type"], int(config["task"]["index"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise ChromalabError(
            f"TF_CONFIG does not name this process in its cluster ({type(exc).__name__}: {exc}): set it to "
            '{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": N}}'
        ) from None
    return addresses, process_id


def make_strategy():
    """Data parallelism: across the processes TF_CONFIG names, or across several local devices; else None.

    JAX: keras.distribution.DataParallel over every device of every process; TF_CONFIG's first task is
    JAX's coordinator. TensorFlow: MirroredStrategy on several local GPUs; its multi-worker strategy
    can't run `fit` in Keras 3 (keras-team/keras#20585), so TF_CONFIG is refused there.
    """
    cluster = cluster_from_tf_config()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        if cluster is not None:
            raise ChromalabError(
                f"multi-worker training (TF_CONFIG) fails under the TensorFlow backend ({UPSTREAM_MULTI_WORKER_BUG}): "
                "run each worker with KERAS_BACKEND=jax, or unset TF_CONFIG (several local GPUs still work)"
            )
        import tensorflow as tf

        if len(tf.config.list_logical_devices("GPU")) > 1:
            return tf.distribute.MirroredStrategy()
        return None
    if backend != "jax":
        return None
    import jax

    if cluster is not None and not jax.distributed.is_initialized():
        addresses, process_id = cluster
        # Before any JAX computation; on CPU the processes exchange gradients through gloo (JAX's default).
        keras.distribution.initialize(",".join(addresses), len(addresses), process_id)
    if len(keras.distribution.list_devices()) > 1:
        # Each process feeds only its own rows of every global batch (chromalab.device_data), so Keras must
        # not shard the input again (it can only shard tf.data, which JAX runs do not use).
        return keras.distribution.DataParallel(auto_shard_dataset=False)
    return None


def replica_count(strategy) -> int:
    """How many model replicas share each global batch."""
    if strategy is None:
        return 1
    if isinstance(strategy, keras.distribution.DataParallel):
        return int(strategy.device_mesh.devices.size)
    return strategy.num_replicas_in_sync


def is_chief(strategy) -> bool:
    """Process 0 of a multi-process (JAX) run; any single-process run."""
    if isinstance(strategy, keras.distribution.DataParallel):
        import jax

        return jax.process_index() == 0
    return True


@contextmanager
def chief_logs_to_mlflow(strategy):
    """Other workers train in lockstep but log to a throwaway store (as Keras has them save to temp dirs)."""
    if is_chief(strategy):
        yield
        return
    from chromalab.tracking import store_override

    with tempfile.TemporaryDirectory(prefix="chromalab-worker-") as scratch, \
            store_override(f"sqlite:///{scratch}/mlflow.db"):
        yield


# --- checkpoints ------------------------------------------------------------------------------


def params_fingerprint(params: Params, model_name: str, dataset_hash: str) -> str:
    """What a checkpoint must match to be resumed: this model's params and the dataset."""
    own = {k: v for k, v in flatten(params).items() if k.split(".")[0] in ("base", "train", model_name)}
    blob = json.dumps({"params": own, "dataset": dataset_hash}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng_states(model: keras.Model) -> list:
    """The layers' random-seed states (dropout), in model order: `variables` beyond the saved `weights`."""
    saved = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in saved]


@dataclass
class Checkpoint:
    """A folder DVC keeps in place (`persist: true`): state.weights.h5 + state.json + history.csv.

    The weights file holds the model's and the optimizer's variables (its step count included); state.json
    adds the dropout layers' seed states, which `save_weights` leaves out, so resumed dropout masks match.
    """

    folder: Path

    @property
    def weights(self) -> Path:
        return self.folder / "state.weights.h5"

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def load_state(self) -> dict | None:
        if not self.state_file.is_file():
            return None
        try:
            return json.loads(self.state_file.read_text())
        except json.JSONDecodeError:
            return None  # a torn write can't happen (atomic), but a hand-edited file can

    def save(self, model: keras.Model, state: dict, history: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state["rng_states"] = [np.asarray(v).tolist() for v in _rng_states(model)]
        tmp_weights = self.folder / ".tmp-state.weights.h5"
        model.save_weights(tmp_weights, overwrite=True)
        os.replace(tmp_weights, self.weights)
        write_history(self.folder / "history.csv", history)
        # state.json last: it is what says "this checkpoint is complete".
        write_text_atomic(self.state_file, json.dumps(state, indent=2))

    def restore(self, model: keras.Model, state: dict) -> None:
        """Weights, optimizer state (with its step count: the learning-rate schedule follows it) and RNG states."""
        model.optimizer.build(model.trainable_variables)  # create the slots the checkpoint fills
        model.load_weights(self.weights)
        variables, values = _rng_states(model), state.get("rng_states", [])
        if len(variables) != len(values):
            raise ChromalabError(f"{self.state_file} holds {len(values)} RNG states but the model has "
                                 f"{len(variables)}: delete {self.folder} to start afresh")
        for variable, value in zip(variables, values):
            variable.assign(np.asarray(value, dtype=variable.dtype))

    def history(self) -> list[dict]:
        return read_history(self.folder / "history.csv")

    def reset(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)


def write_history(path: Path, rows: list[dict]) -> None:
    columns = ["epoch"] + sorted({k for row in rows for k in row} - {"epoch"})
    with atomic_file(path, text=True) as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
            for row in csv.DictReader(f)
        ]


# --- sample sheet -----------------------------------------------------------------------------


def sample_sheet(L: np.ndarray, pred_ab: np.ndarray, true_ab: np.ndarray) -> np.ndarray:
    """One row per photo: gray input | prediction | truth, as uint8 RGB."""
    rows = []
    for l_img, p_ab, t_ab in zip(L, pred_ab, true_ab):
        gray = np.repeat(np.clip(l_img, 0, 1), 3, axis=-1)
        rows.append(np.concatenate([gray, lab_norm_to_rgb(l_img, p_ab), lab_norm_to_rgb(l_img, t_ab)], axis=1))
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


# --- the callback that ties epochs to checkpoints, history, MLflow and the sample sheet --------


class EpochRecorder(keras.callbacks.Callback):
    """Each epoch's row joins the history; every `checkpoint_every` epochs (and at the last) a checkpoint is
    saved and only then are the rows and sample sheets since the previous one sent to MLflow.

    MLflow therefore never holds an epoch that a kill could lose: a resumed run re-trains those epochs and
    logs each step once. (MLflow has no API to delete logged metric values, and deleting rows from its
    database behind its back would not work for a tracking server.) The price: the MLflow UI lags by up to
    `checkpoint_every` epochs; the console shows every epoch.
    """

    def __init__(self, *, checkpoint: Checkpoint, state: dict, history: list[dict], train_params,
                 total_epochs: int, samples: tuple[np.ndarray, np.ndarray], images_per_epoch: int):
        super().__init__()
        self.checkpoint = checkpoint
        self.state = state
        self.history_rows = history
        self.train_params = train_params
        self.total_epochs = total_epochs
        self.samples = samples
        self.images_per_epoch = images_per_epoch
        self._epoch_start = 0.0
        self._unlogged: list[dict] = []
        self._unlogged_sheets: list[tuple[np.ndarray, int]] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        from chromalab import tracking

        done = epoch + 1
        seconds = time.perf_counter() - self._epoch_start
        row = {"epoch": done, **{k: float(v) for k, v in (logs or {}).items()},
               "epoch_seconds": seconds, "images_per_second": self.images_per_epoch / seconds}
        self.history_rows.append(row)
        self._unlogged.append(row)
        if done % self.train_params.sample_every == 0 or done == self.total_epochs:
            L, ab = self.samples
            generator = getattr(self.model, "generator", self.model)
            # Under JAX a plain call runs op by op, each op compiled at its first use (seconds for a U-Net);
            # predict_on_batch compiles the whole call once. TensorFlow's eager ops need no compile.
            pred = generator.predict_on_batch(L) if keras.backend.backend() == "jax" else generator(L, training=False)
            pred = np.asarray(ops.convert_to_numpy(pred), dtype=np.float32)
            self._unlogged_sheets.append((sample_sheet(L, pred, ab), done))
        if done % self.train_params.checkpoint_every == 0 or done == self.total_epochs:
            self.state["epoch"] = done
            self.checkpoint.save(self.model, self.state, self.history_rows)
            self.log_rows(self._unlogged)
            for sheet, step in self._unlogged_sheets:
                tracking.log_sample_sheet(sheet, step)
            self._unlogged, self._unlogged_sheets = [], []

    @staticmethod
    def log_rows(rows: list[dict]) -> None:
        from chromalab import tracking

        for row in rows:
            tracking.log_epoch({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    def log_checkpointed_rows_mlflow_lacks(self, run_id: str) -> None:
        """After a kill between a checkpoint and its MLflow logging: log the checkpoint's rows MLflow lacks."""
        import mlflow

        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "epoch_seconds")}
        self.log_rows([row for row in self.history_rows if row["epoch"] not in logged])


# --- the stage --------------------------------------------------------------------------------


class ConstantThenLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """pix2pix's schedule: `rate` until the last `decay_steps` steps, then linearly down to zero.

    A function of the optimizer's step count, which the checkpoint restores: a resumed run continues the
    same curve.
    """

    def __init__(self, rate: float, total_steps: int, decay_steps: int):
        self.rate, self.total_steps, self.decay_steps = float(rate), int(total_steps), int(decay_steps)

    def __call__(self, step):
        remaining = ops.cast(self.total_steps, "float32") - ops.cast(step, "float32")
        return self.rate * ops.clip(remaining / self.decay_steps, 0.0, 1.0)

    def get_config(self) -> dict:
        return {"rate": self.rate, "total_steps": self.total_steps, "decay_steps": self.decay_steps}


def learning_rate(p, steps_per_epoch: int):
    """The model's rate: constant, or constant then decaying to zero over its last `decay_epochs`."""
    if not p.n_decay_epochs:
        return p.learning_rate
    return ConstantThenLinearDecay(p.learning_rate, p.epochs * steps_per_epoch, p.n_decay_epochs * steps_per_epoch)


def build_for_training(model_name: str, params: Params, image_size: int, jit_compile: bool,
                       steps_per_epoch: int = 1) -> keras.Model:
    if model_name == "baseline":
        p = params.baseline
        model = build_baseline(image_size, width=p.width, dropout=p.dropout)
        loss = losses.ssim_loss if p.loss == "ssim" else losses.ms_ssim_loss
        optimizer = keras.optimizers.RMSprop(learning_rate(p, steps_per_epoch))
        model.compile(optimizer=optimizer, loss=loss, metrics=list(validation_trackers().values()),
                      jit_compile=jit_compile)
        return model
    p = params.gan
    gan = Pix2Pix(build_generator(image_size, width=p.width), build_discriminator(image_size, width=p.width),
                  l1_lambda=p.l1_lambda)
    # Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer itself (auto_scale_loss).
    # FusedAdam: Keras' Adam in one kernel per variable on TensorFlow (a third of a CPU step, otherwise).
    gan.compile(optimizer=FusedAdam(learning_rate(p, steps_per_epoch), beta_1=p.beta_1),
                jit_compile=jit_compile)
    return gan


def _final_metrics(model: keras.Model, val_ds, history: list[dict], params: Params, model_name: str,
                   train_seconds: float) -> dict:
    scores = model.evaluate(val_ds, verbose=0, return_dict=True)
    last = history[-1] if history else {}
    out = {f"test_{k}": float(v) for k, v in scores.items() if k in VALIDATION_METRICS}
    out.update({k: v for k, v in last.items() if k not in ("epoch",) and not k.startswith("val_")})
    out["epochs"] = params.model(model_name).epochs
    out["train_seconds_this_run"] = round(train_seconds, 2)
    return out


def run_train(params: Params, model_name: str, *, data_dir: Path = Path("data/tfrecords"),
              models_root: Path = Path("models"), reports_root: Path = Path("reports"),
              strategy=None) -> dict:
    """Train `model_name` ("baseline" | "gan"); writes models/<m>/model.keras and reports/<m>/*."""
    from chromalab import tracking

    if model_name not in MODEL_NAMES:
        raise ChromalabError(f"unknown model {model_name!r}: choose one of {', '.join(MODEL_NAMES)}")
    tracking.check_tracking_server()  # before any training time is spent
    # Before the backend does any work: JAX's processes must connect first.
    strategy = strategy or make_strategy()
    if isinstance(strategy, keras.distribution.DataParallel):
        keras.distribution.set_distribution(strategy)  # fit, evaluate and predict shard their batches by it
    with chief_logs_to_mlflow(strategy):
        return _train(params, model_name, data_dir, models_root, reports_root, strategy)


def _train(params: Params, model_name: str, data_dir: Path, models_root: Path, reports_root: Path,
           strategy) -> dict:
    from chromalab import datasets, registry, tracking
    from chromalab.device_data import training_input
    from chromalab.epochs import steps_per_epoch
    from chromalab.tfrecords import load_split_arrays, read_dataset_info

    info = read_dataset_info(data_dir)
    image_size = int(info["image_size"])
    if image_size != params.base.image_size:
        raise ChromalabError(
            f"{data_dir} holds {image_size} px photos but base.image_size is {params.base.image_size}: "
            "run `dvc repro` so images and tfrecords follow the param"
        )
    mp = params.model(model_name)
    train_p = params.train
    hide_gpus_from_tensorflow()
    gpus = gpu_names()
    policy = precision_policy(train_p.mixed_precision, gpus)
    keras.mixed_precision.set_global_policy(policy)
    jit_compile = xla_choice(train_p.xla, keras.backend.backend(), gpus, replica_count(strategy))
    keras.utils.set_random_seed(params.base.seed)

    model_dir = models_root / model_name
    reports_dir = reports_root / model_name
    checkpoint = Checkpoint(model_dir / "checkpoint")
    dataset_hash = str(info.get("content_hash", ""))
    fingerprint = params_fingerprint(params, model_name, dataset_hash)
    state = checkpoint.load_state()
    if state and state.get("fingerprint") == fingerprint and state.get("status") == "running":
        initial_epoch = int(state["epoch"])
        history = [row for row in checkpoint.history() if row["epoch"] <= initial_epoch]
        print(f"resuming {model_name} from its checkpoint at epoch {initial_epoch}/{mp.epochs}", file=sys.stderr)
    else:
        if state:
            print(f"{checkpoint.folder}: params or data changed since the checkpoint; starting afresh",
                  file=sys.stderr)
        checkpoint.reset()
        state, initial_epoch, history = {"fingerprint": fingerprint, "status": "running", "epoch": 0}, 0, []

    global_batch = mp.batch_size * replica_count(strategy)
    n_train = int(info["counts"]["train"])
    steps = steps_per_epoch(n_train, global_batch)
    # JAX: the split on the device (chromalab.device_data), no TensorFlow; TensorFlow: tf.data. Only the
    # epochs still to run; no training data when the last checkpoint is the final epoch.
    data = training_input(data_dir, global_batch, train_p, params.base.seed, epochs=mp.epochs,
                          initial_epoch=initial_epoch, distributed=strategy is not None)
    train_ds, val_ds = data.train, data.validation
    _, sample_L, sample_ab = load_split_arrays(data_dir, "test")
    samples = (sample_L[: train_p.n_samples], sample_ab[: train_p.n_samples])

    with strategy.scope() if strategy is not None else nullcontext():
        model = build_for_training(model_name, params, image_size, jit_compile, steps)
    data.prepare(model)
    if initial_epoch:
        checkpoint.restore(model, state)

    with tracking.model_run(model_name, params, dataset_hash=dataset_hash, stage=f"train@{model_name}",
                            run_id=state.get("mlflow_run_id")) as run:
        state["mlflow_run_id"] = run.info.run_id
        datasets.log_dataset_inputs(info, data_dir)
        recorder = EpochRecorder(checkpoint=checkpoint, state=state, history=history, train_params=train_p,
                                 total_epochs=mp.epochs, samples=samples, images_per_epoch=n_train)
        if initial_epoch:
            recorder.log_checkpointed_rows_mlflow_lacks(run.info.run_id)
        started = time.perf_counter()
        if train_ds is not None:
            # The input orders and augments the photos (chromalab.epochs), not fit.
            model.fit(train_ds, epochs=mp.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                      validation_data=val_ds, validation_freq=train_p.val_every, callbacks=[recorder],
                      shuffle=False, verbose=1 if sys.stdout.isatty() else 2)
        train_seconds = time.perf_counter() - started
        metrics = _final_metrics(model, val_ds, history, params, model_name, train_seconds)
        metrics["mlflow_run_id"] = run.info.run_id  # evaluate logs into this run; `dvc exp show` links to it
        if isinstance(strategy, keras.distribution.DataParallel):
            # Training is over and every process holds the whole model: predicting on local arrays (the
            # model log's signature) must not be split across processes, which Keras allows only for tf.data.
            keras.distribution.set_distribution(None)
        tracking.log_epoch({f"final_{k}": v for k, v in metrics.items() if isinstance(v, float)}, mp.epochs)

        trained = model.generator if model_name == "gan" else model
        # An inference model: same layers, no compile state, so it loads without chromalab's losses.
        deliverable = keras.Model(trained.inputs, trained.outputs, name=trained.name)
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp_model = model_dir / ".tmp-model.keras"
        deliverable.save(tmp_model)
        os.replace(tmp_model, model_dir / "model.keras")
        tracking.log_keras_model(deliverable, sample_L[:1])
        registry.register_trained_model(model_name, model_dir / "model.keras", dataset_hash)

    reports_dir.mkdir(parents=True, exist_ok=True)
    write_history(reports_dir / "history.csv", history)
    write_text_atomic(reports_dir / "train_metrics.json", json.dumps(metrics, indent=2))
    # Done: the next `dvc repro -f` trains from scratch in a fresh MLflow run.
    checkpoint.reset()
    write_text_atomic(checkpoint.state_file, json.dumps({"status": "complete", "fingerprint": fingerprint,
                                                          "mlflow_run_id": run.info.run_id}, indent=2))
    return metrics
