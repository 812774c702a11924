"""What happens at the end of each epoch: history, sample sheets, checkpoints, and MLflow, in an order that a kill
cannot break."""

from __future__ import annotations

import datetime
import sys
import time

import keras
import numpy as np
from keras import ops

from chromalab.color import lab_norm_to_rgb
from chromalab.train.checkpoint import Checkpoint


def sample_sheet(L: np.ndarray, pred_ab: np.ndarray, true_ab: np.ndarray) -> np.ndarray:
    """One row per photo: gray input | prediction | truth, as uint8 RGB."""
    rows = []
    for l_img, p_ab, t_ab in zip(L, pred_ab, true_ab):
        gray = np.repeat(np.clip(l_img, 0, 1), 3, axis=-1)
        rows.append(np.concatenate([gray, lab_norm_to_rgb(l_img, p_ab), lab_norm_to_rgb(l_img, t_ab)], axis=1))
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


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
        from chromalab.track import runs

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
                runs.log_sample_sheet(sheet, step)
            self._unlogged, self._unlogged_sheets = [], []

    @staticmethod
    def log_rows(rows: list[dict]) -> None:
        from chromalab.track import runs

        for row in rows:
            runs.log_epoch({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    def log_checkpointed_rows_mlflow_lacks(self, run_id: str) -> None:
        """After a kill between a checkpoint and its MLflow logging: log the checkpoint's rows MLflow lacks."""
        import mlflow

        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "epoch_seconds")}
        self.log_rows([row for row in self.history_rows if row["epoch"] not in logged])


def duration(seconds: float) -> str:
    """3h07m, 12m05s, 41s: how a person reads a run's length."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RunProgress(keras.callbacks.Callback):
    """One line per epoch under Keras' own: where the run stands and when, at this pace, it will end.

    The projection is the mean time of the epochs this process has trained, times the epochs left; from the
    second epoch on the first is left out of the mean, since it also traced or compiled the step. Once, after
    the first epoch, a run projected beyond LONG_RUN_S on a machine without a GPU says so, and where a short
    run is.
    """

    LONG_RUN_S = 3 * 3600

    def __init__(self, label: str, total_epochs: int, *, has_gpu: bool, clock=time.monotonic, out=None):
        super().__init__()
        self.label, self.total_epochs, self.has_gpu = label, total_epochs, has_gpu
        self.clock, self.out = clock, out
        self._started = self._first_epoch = self._first_seconds = None

    def _say(self, line: str) -> None:
        print(line, file=self.out or sys.stderr, flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        if self._started is None:
            self._started, self._first_epoch = self.clock(), epoch

    def on_epoch_end(self, epoch, logs=None):
        done, elapsed = epoch + 1, self.clock() - self._started
        trained = done - self._first_epoch
        if trained == 1:
            self._first_seconds = elapsed
        per_epoch = elapsed if trained == 1 else (elapsed - self._first_seconds) / (trained - 1)
        left = per_epoch * (self.total_epochs - done)
        ends = datetime.datetime.now() + datetime.timedelta(seconds=left)
        self._say(f"{self.label}: epoch {done}/{self.total_epochs}, {duration(elapsed)} elapsed, "
                  f"~{duration(left)} left (ends ~{ends:%Y-%m-%d %H:%M})")
        if trained == 1 and not self.has_gpu and elapsed + left > self.LONG_RUN_S:
            self._say(f"{self.label}: at this pace the whole run takes ~{duration(elapsed + left)} on this machine, "
                      "which has no GPU; the README's \"A small run on a CPU\" runs the pipeline in minutes")
