"""What happens at the end of each epoch: history, sample sheets, checkpoints, and MLflow, in an order that a kill
cannot break."""

from __future__ import annotations

import datetime
import math
import sys
import time

import keras
import numpy as np

from chromalab.color import gray_rgb, lab_norm_to_rgb
from chromalab.entry import raise_if_stopped
from chromalab.errors import ChromalabError
from chromalab.train.checkpoint import Checkpoint
from chromalab.train.validation import VAL_DELTA_E00, colorizer, predict_ab, val_delta_e00


def sample_sheet(L: np.ndarray, pred_ab: np.ndarray, true_ab: np.ndarray) -> np.ndarray:
    """One row per photo: gray input | prediction | truth, as uint8 RGB."""
    rows = []
    for l_img, p_ab, t_ab in zip(L, pred_ab, true_ab):
        panels = (gray_rgb(l_img), lab_norm_to_rgb(l_img, p_ab), lab_norm_to_rgb(l_img, t_ab))
        rows.append(np.concatenate(panels, axis=1))
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


class EpochRecorder(keras.callbacks.Callback):
    """Each epoch's row joins the history; every `checkpoint_every` epochs (and at the last) a checkpoint is
    saved and only then are the rows and sample sheets since the previous one sent to MLflow.

    Every `val_every` epochs (when `fit` validates) and at the last, the row also gets val_delta_e00 (mean
    ΔE00 on the val split, `validation`); the lowest so far after epoch `keep_after` keeps its weights
    (Checkpoint.save_best), which the stage exports: the GAN's is chosen from its adversarial epochs, since a
    generator pretrained on the reconstruction alone is not what the stage trains. It joins the row before the
    checkpoint, so history and MLflow hold it like any metric.

    MLflow therefore never holds an epoch that a kill could lose: a resumed run re-trains those epochs and
    logs each step once. (MLflow has no API to delete logged metric values, and deleting rows from its
    database behind its back would not work for a tracking server.) The price: the MLflow UI lags by up to
    `checkpoint_every` epochs; the console shows every epoch.
    """

    def __init__(self, *, checkpoint: Checkpoint, state: dict, history: list[dict], train_params,
                 total_epochs: int, samples: tuple[np.ndarray, np.ndarray], images_per_epoch: int,
                 validation: tuple[np.ndarray, np.ndarray], batch_size: int, keep_after: int = 0):
        super().__init__()
        self.keep_after = keep_after  # epochs up to this one are validated but never kept (the GAN's pretraining)
        self.checkpoint = checkpoint
        self.state = state
        self.history_rows = history
        self.train_params = train_params
        self.total_epochs = total_epochs
        self.samples = samples
        self.images_per_epoch = images_per_epoch
        self.validation = validation
        self.batch_size = batch_size
        self._colorizer: keras.Model | None = None  # built at the first use, once `fit` has set self.model
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
        # float16's loss scaling skips a non-finite step, whose loss still counts in the epoch's: the val score tells
        if not isinstance(getattr(self.model, "optimizer", None), keras.optimizers.LossScaleOptimizer):
            self._stop_if_diverged(row)  # before validating: an epoch whose loss diverged is never the best
        if done % self.train_params.val_every == 0 or done == self.total_epochs:
            row[VAL_DELTA_E00] = self._validate(done)
            self._stop_if_diverged({"epoch": done, VAL_DELTA_E00: row[VAL_DELTA_E00]})
        self.history_rows.append(row)
        self._unlogged.append(row)
        if done % self.train_params.sample_every == 0 or done == self.total_epochs:
            L, ab = self.samples
            self._unlogged_sheets.append((sample_sheet(L, predict_ab(self.colorizer, L, len(L)), ab), done))
        if done % self.train_params.checkpoint_every == 0 or done == self.total_epochs:
            self.state["epoch"] = done
            self.checkpoint.keep_sheets(self._unlogged_sheets, self.state)
            self.checkpoint.save(self.model, self.state, self.history_rows)
            self.log_rows(self._unlogged)
            for sheet, step in self._unlogged_sheets:
                runs.log_sample_sheet(sheet, step)
            self._unlogged, self._unlogged_sheets = [], []

    def _stop_if_diverged(self, row: dict) -> None:
        """A loss or val score gone NaN or infinite stays so: stop now, before the checkpoint, rather than train the
        remaining epochs on NaN weights and fail at export for want of a best epoch."""
        broken = next((key for key, value in row.items() if not math.isfinite(value)), None)
        if broken is not None:
            raise ChromalabError(f"training diverged: {broken} was {row[broken]} at epoch {row['epoch']}; lower this "
                                 "model's learning_rate in params.yaml, then re-run")

    @property
    def colorizer(self) -> keras.Model:
        if self._colorizer is None:
            self._colorizer = colorizer(self.model)
        return self._colorizer

    def _validate(self, done: int) -> float:
        """Epoch `done`'s val ΔE00; a new lowest keeps its weights (strictly lower: ties keep the earlier)."""
        score = val_delta_e00(self.colorizer, *self.validation, self.batch_size)
        if done > self.keep_after and score < self.state.get("best_val_delta_e00", float("inf")):
            self.checkpoint.save_best(self.colorizer, self.state, done, score)
        return score

    @staticmethod
    def log_rows(rows: list[dict]) -> None:
        from chromalab.track import runs

        for row in rows:
            runs.log_epoch({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    def log_checkpoint_mlflow_lacks(self, run_id: str) -> None:
        """After a kill between a checkpoint and its MLflow logging: log the checkpoint's rows and sample
        sheets MLflow lacks."""
        import mlflow

        from chromalab.track import runs

        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "epoch_seconds")}
        self.log_rows([row for row in self.history_rows if row["epoch"] not in logged])
        shown = runs.sample_sheet_steps(run_id)
        for sheet, step in self.checkpoint.sheets(self.state):
            if step not in shown:
                runs.log_sample_sheet(sheet, step)


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


class StopWhenAsked(keras.callbacks.Callback):
    """Raises a Ctrl-C or SIGTERM that chromalab.entry.stops_deferred held back, between batches, where
    stopping is safe (the checkpoint is kill-safe anyway; MLflow's threads and TensorFlow's destructors are not
    places to raise in). Keep it last among the callbacks, so that an epoch's records are complete."""

    def on_train_batch_end(self, batch, logs=None):
        raise_if_stopped()

    def on_test_batch_end(self, batch, logs=None):
        raise_if_stopped()

    def on_epoch_end(self, epoch, logs=None):
        raise_if_stopped()
