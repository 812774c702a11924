"""Stage `train@<model>`: fit the baseline CNN or the pix2pix GAN on the Lab TFRecords.

Both models go through `model.fit`: the baseline with a compiled loss, the GAN as chromalab.train.gan.Pix2Pix.
A killed run resumes from its last complete checkpoint (chromalab.train.checkpoint: weights, optimizer state,
dropout RNG state, epoch, history and the same MLflow run) and continues exactly as an uninterrupted run would:
epoch e's photo order and augmentation depend only on (seed, e) (chromalab.train.epochs), the learning-rate
schedule on the optimizer's restored step count, and MLflow only ever holds checkpointed epochs
(chromalab.train.callbacks.EpochRecorder). Changed params start afresh.

Training validates on the val split, never on test (the evaluate stage's): Keras' SSIM/MSE/MAE every
`train.val_every` epochs, and mean ΔE00 then and at the last epoch. The exported model.keras is the colorizer
of the validation with the lowest ΔE00 (chromalab.train.validation), not necessarily the last epoch's, the GAN's
followed by its chroma curve (`gan.chroma_expand`); train_metrics.json and the MLflow run say which
(best_epoch, best_val_delta_e00, exported).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import keras

from chromalab.code import code_hash
from chromalab.config import Params
from chromalab.devices import gpus as visible_gpus, hide_gpus_from_tensorflow, precision_policy, xla_choice
from chromalab.entry import stops_deferred
from chromalab.errors import ChromalabError
from chromalab.files import atomic_path, clear_stale_temps, held_exclusively, write_text_atomic
from chromalab.train.build import build_for_training
from chromalab.train.callbacks import EpochRecorder, RunProgress, StopWhenAsked
from chromalab.train.checkpoint import Checkpoint, params_fingerprint, write_history
from chromalab.train.distribute import chief_logs_to_mlflow, is_chief, make_strategy, replica_count
from chromalab.train.epochs import steps_per_epoch
from chromalab.train.gan import VALIDATION_METRICS, phase_plan
from chromalab.train.models import with_chroma_curve
from chromalab.train.validation import VAL_DELTA_E00, colorizer, val_delta_e00


def run_train(params: Params, model_name: str, *, data_dir: Path = Path("data/tfrecords"),
              models_root: Path = Path("models"), reports_root: Path = Path("reports"),
              strategy=None) -> dict:
    """Train `model_name` ("baseline" | "gan"); writes models/<m>/model.keras and reports/<m>/*."""
    from chromalab.track import runs

    params.model(model_name)  # an unknown model name fails here, in one line
    runs.check_tracking_server()  # before any training time is spent
    # Before the backend does any work: JAX's processes must connect first.
    strategy = strategy or make_strategy()
    if isinstance(strategy, keras.distribution.DataParallel):
        keras.distribution.set_distribution(strategy)  # fit, evaluate and predict shard their batches by it
    # one training per model folder: a second (a re-run beside a stage still stopping) would resume the same
    # checkpoint while the first replaces its files
    lock = held_exclusively(models_root / model_name, TRAINING_LOCK_WAIT_S) if is_chief(strategy) else nullcontext(True)
    with lock as held, chief_logs_to_mlflow(strategy):
        if not held:
            raise ChromalabError(f"{models_root / model_name} is being trained by another process; wait for it to "
                                 "end, or stop it, then run this again")
        return _train(params, model_name, data_dir, models_root, reports_root, strategy)


TRAINING_LOCK_WAIT_S = 60.0  # a stopped training's last checkpoint and MLflow calls finish well within this


@dataclass
class Resume:
    """Where this run starts: afresh (epoch 0) or from a checkpoint of the same params and data."""

    checkpoint: Checkpoint
    fingerprint: str
    state: dict
    epoch: int
    history: list[dict]


def _train(params: Params, model_name: str, data_dir: Path, models_root: Path, reports_root: Path,
           strategy) -> dict:
    info = _dataset_info(data_dir, params)
    for folder in (models_root / model_name, reports_root / model_name):
        clear_stale_temps(folder)  # what a killed run's writes left (the checkpoint folder clears its own)
    outputs = [models_root / model_name / "model.keras", *(reports_root / model_name / name for name in REPORTS)]
    fingerprint = params_fingerprint(params, model_name, str(info.get("content_hash", "")), code_hash(__name__))
    folder, shared = _checkpoint_folder(models_root, model_name, fingerprint)
    if is_chief(strategy):  # in the workspace too: the model's next training, wherever it runs
        _remove_checkpoints_dvc_keeps(folder.parent)
    lock = held_exclusively(folder, TRAINING_LOCK_WAIT_S) if shared and is_chief(strategy) else nullcontext(True)
    with lock as held:
        if not held:
            raise ChromalabError(f"{folder} is in use by another run of this experiment; wait for it to end, or "
                                 "stop it, then run this again")
        # only where DVC runs the stage (it sets DVC_ROOT): `chromalab train` run by hand again means train again
        if os.environ.get("DVC_ROOT") and Checkpoint(folder).deliver_again(fingerprint, outputs):
            print(f"{model_name}: the last run of these params, data and code finished, but DVC never recorded it "
                  "(run by hand, or killed before dvc.lock was written): its outputs are put back instead of "
                  f"training again (to train anew, delete {folder})", file=sys.stderr)
            metrics = json.loads(outputs[-1].read_text())
        else:
            metrics = _fit_and_deliver(params, model_name, data_dir, info, Checkpoint(folder), fingerprint, outputs,
                                   strategy)
        return metrics  # a shared folder stays until DVC's cache has its outputs (_remove_checkpoints_dvc_keeps)


def _remove_checkpoints_dvc_keeps(models_dir: Path) -> None:
    """Remove the finished checkpoint-<fingerprint> folders of temporary copies whose outputs DVC has cached.
    Each stays until then, for a re-run to put its outputs back: removed as the training ended, a kill before DVC
    stored them (the copy gone with them) cost the whole training again, and a second MLflow run."""
    from chromalab.track.runs import repo_root

    folders = sorted(models_dir.glob("checkpoint-*"))
    root = repo_root() if folders else None  # DVC's import, only where there is something to ask it
    for folder in folders:
        with held_exclusively(folder, 0) as held:  # not one another run is training or putting back
            if held and Checkpoint(folder).kept_by_dvc(root):
                shutil.rmtree(folder)


def _checkpoint_folder(models_root: Path, model_name: str, fingerprint: str) -> tuple[Path, bool]:
    """Where this training's checkpoint lives, and whether DVC's temporary copies share it: models/<m>/checkpoint,
    except in a temporary copy (`dvc exp run --temp`, `--queue`), which the next run of the experiment never sees:
    there, the real repository's models/<m>/checkpoint-<fingerprint>, one per experiment, so that a killed
    experiment resumes when it is run again."""
    from chromalab.track.runs import temp_copy_origin

    origin = temp_copy_origin(Path.cwd().resolve())
    if origin is None:  # the workspace, or a folder in it (the GPU check's): its own, as its outputs are
        return models_root / model_name / "checkpoint", False
    return origin / models_root / model_name / f"checkpoint-{fingerprint}", True


def _fit_and_deliver(params: Params, model_name: str, data_dir: Path, info: dict, checkpoint: Checkpoint,
                     fingerprint: str, outputs: list[Path], strategy) -> dict:
    """Train from `checkpoint` (or afresh), then write `outputs`: the model and the reports."""
    from chromalab.data.dataset import load_split_arrays
    from chromalab.track import datasets, runs
    from chromalab.train.input import VALIDATION_SPLIT, training_input

    jit_compile, has_gpu = _set_up_device(params, strategy)
    resume = _resume_point(params, model_name, checkpoint, fingerprint)
    epochs, global_batch = params.model(model_name).epochs, params.model(model_name).batch_size * replica_count(strategy)

    def epochs_input(start: int, stop: int):
        return training_input(data_dir, global_batch, params.train, params.base.seed, epochs=stop,
                              initial_epoch=start, distributed=strategy is not None)

    first_phase = _phases(params, model_name, resume.epoch)[:1]
    data = epochs_input(resume.epoch, first_phase[0][2] if first_phase else epochs)  # no train input if none left
    n_train = int(info["counts"]["train"])
    steps = steps_per_epoch(n_train, global_batch)
    _, val_L, val_ab = load_split_arrays(data_dir, VALIDATION_SPLIT)  # for ΔE00 and the sample sheets
    validation = Validation(val_L, val_ab, global_batch)
    with strategy.scope() if strategy is not None else nullcontext():
        model = build_for_training(model_name, params, int(info["image_size"]), jit_compile, steps)
        if not resume.epoch:  # (restore builds it) not inside fit's first step: TensorFlow traces a step that
            model.optimizer.build(model.trainable_variables)  # creates variables twice (README, "Measured figures")
    if resume.epoch:
        resume.checkpoint.restore(model, resume.state)

    def record_run(run_id: str) -> None:  # in state.json at once: a re-run killed from here on resumes this run
        resume.state["mlflow_run_id"] = run_id
        resume.checkpoint.write_state(resume.state)

    dataset_hash = str(info.get("content_hash", ""))
    with runs.model_run(model_name, params, dataset_hash=dataset_hash, stage=f"train@{model_name}",
                        run_id=resume.state.get("mlflow_run_id"), on_new_run=record_run) as run:
        datasets.log_dataset_inputs(info, data_dir)
        started = time.perf_counter()
        _fit(model, data, epochs_input, resume, params, model_name, steps, validation, n_train, has_gpu)
        exported = _best_colorizer(model, resume, params, model_name)
        metrics = _final_metrics(model, exported, data.validation, validation, resume, epochs,
                                 time.perf_counter() - started)
        metrics["mlflow_run_id"] = run.info.run_id  # evaluate logs into this run; `dvc exp show` links to it
        _deliver(exported, metrics, resume, outputs[0], strategy, val_L[:1], dataset_hash)

    _write_reports(outputs[1].parent, resume.history, metrics)
    resume.checkpoint.mark_complete(resume.fingerprint, run.info.run_id, outputs)
    return metrics


@dataclass
class Validation:
    """The val split in memory (L [N,S,S,1], ab [N,S,S,2] float32) and the batch to predict it in."""

    L: object
    ab: object
    batch_size: int


def _fit(model: keras.Model, data, epochs_input, resume: Resume, params: Params, model_name: str, steps: int,
         validation: Validation, n_train: int, has_gpu: bool) -> None:
    """The epochs still to train, each recorded (history, checkpoint, MLflow) and reported as it ends; the GAN's
    phases (chromalab.train.gan.phase_plan) one `fit` each, on the input of their own epochs."""
    epochs, n_samples = params.model(model_name).epochs, params.train.n_samples
    recorder = EpochRecorder(checkpoint=resume.checkpoint, state=resume.state, history=resume.history,
                             train_params=params.train, total_epochs=epochs,
                             samples=(validation.L[:n_samples], validation.ab[:n_samples]),
                             images_per_epoch=n_train, validation=(validation.L, validation.ab),
                             batch_size=validation.batch_size, keep_after=_phases(params, model_name, 0)[-1][1])
    if resume.epoch:
        recorder.log_checkpoint_mlflow_lacks(resume.state["mlflow_run_id"])
    if data.train is None:  # the last checkpoint was the final epoch
        return
    # Keras' own epoch line first, then where the run stands. The input orders and augments the photos
    # (chromalab.train.epochs), not fit.
    progress = [keras.callbacks.ProgbarLogger(), RunProgress(f"train@{model_name}", epochs, has_gpu=has_gpu)]
    for phase, start, stop in _phases(params, model_name, resume.epoch):
        if phase is not None:
            model.phase = phase
            print(f"train@{model_name}: epochs {start + 1}-{stop}: {phase}", file=sys.stderr)
        train = data.train if start == resume.epoch else epochs_input(start, stop).train
        with stops_deferred():  # Ctrl-C stops between batches (StopWhenAsked), never inside a library call
            model.fit(train, epochs=stop, initial_epoch=start, steps_per_epoch=steps,
                      validation_data=data.validation, validation_freq=params.train.val_every,
                      callbacks=[recorder, *progress, StopWhenAsked()], shuffle=False,
                      verbose=1 if sys.stdout.isatty() else 2)


def _phases(params: Params, model_name: str, start: int) -> list[tuple[str | None, int, int]]:
    """(phase, first epoch, end epoch) still to train: the baseline in one go, the GAN by its phases."""
    if model_name == "gan":
        p = params.gan
        return phase_plan(p.pretrain_epochs, p.warmup_epochs, p.epochs, start)
    return [(None, start, params.baseline.epochs)] if start < params.baseline.epochs else []


def _deliver(deliverable: keras.Model, metrics: dict, resume: Resume, model_file: Path, strategy, input_example,
             dataset_hash: str) -> None:
    """models/<m>/model.keras, the final metrics and the same model in the MLflow run, and its pyfunc
    colorizer as a registry version; each MLflow step once, even when a kill makes the run finish twice."""
    from chromalab.serve import pyfunc
    from chromalab.track import registry, runs

    _export(deliverable, model_file, strategy)
    # each step also looks for what it did before: a kill between its MLflow call and state.json's record
    _once(resume, "final metrics", lambda: (
        runs.log_new_metrics({f"final_{k}": v for k, v in metrics.items()
                              if isinstance(v, float) and not k.startswith("best_")}, int(metrics["epochs"])),
        runs.log_exported_checkpoint(metrics["best_epoch"], metrics["best_val_delta_e00"], metrics["exported"])))
    _once(resume, "model", lambda: runs.logged_model("model") or runs.log_keras_model(deliverable, input_example))
    _once(resume, "registered", lambda: registry.register_trained_model(
        model_file.parent.name, runs.logged_model(pyfunc.PYFUNC_NAME) or pyfunc.log_colorizer(model_file),
        dataset_hash))


def _once(resume: Resume, step: str, action) -> None:
    """`action()` unless this run did it already before a kill (state.json remembers, until training is
    marked complete)."""
    done = resume.state.setdefault("finished_steps", [])
    if step not in done:
        action()
        done.append(step)
        resume.checkpoint.write_state(resume.state)


def _dataset_info(data_dir: Path, params: Params) -> dict:
    from chromalab.data.dataset import read_dataset_info

    info = read_dataset_info(data_dir)
    if int(info["image_size"]) != params.base.image_size:
        raise ChromalabError(
            f"{data_dir} holds {info['image_size']} px photos but base.image_size is {params.base.image_size}: "
            "run `dvc repro` so images and tfrecords follow the param"
        )
    return info


def _set_up_device(params: Params, strategy) -> tuple[bool, bool]:
    """Precision policy and seeds for this run; returns whether the train step is compiled with XLA, and
    whether a GPU trains."""
    hide_gpus_from_tensorflow()
    gpus = visible_gpus()
    keras.mixed_precision.set_global_policy(precision_policy(params.train.mixed_precision, gpus))
    keras.utils.set_random_seed(params.base.seed)
    return xla_choice(params.train.xla, keras.backend.backend(), gpus, replica_count(strategy)), bool(gpus)


def _resume_point(params: Params, model_name: str, checkpoint: Checkpoint, fingerprint: str) -> Resume:
    state = checkpoint.load_state()
    if checkpoint.resumable(state, fingerprint):
        epoch = int(state["epoch"])
        history = [row for row in checkpoint.history(state) if row["epoch"] <= epoch]
        print(f"resuming {model_name} from its checkpoint at epoch {epoch}/{params.model(model_name).epochs}",
              file=sys.stderr)
        return Resume(checkpoint, fingerprint, state, epoch, history)
    fresh = {"fingerprint": fingerprint, "status": "running", "epoch": 0}
    if run_id := checkpoint.started_run(state, fingerprint):
        fresh["mlflow_run_id"] = run_id
    elif state and state.get("fingerprint") == fingerprint and state.get("status") == "complete":
        print(f"{checkpoint.folder}: the last run of these params and data finished; training them again "
              "from the start", file=sys.stderr)
    elif state:
        print(f"{checkpoint.folder}: params, data or code changed since the checkpoint; starting afresh",
              file=sys.stderr)
        if state.get("status") == "running" and state.get("mlflow_run_id"):
            from chromalab.track import runs

            runs.end_abandoned_run(state["mlflow_run_id"])
    checkpoint.reset()
    if run_id:  # named again at once: a second kill before training records the start must not lose it
        checkpoint.write_state(fresh)
    return Resume(checkpoint, fingerprint, fresh, 0, [])


def _best_colorizer(model: keras.Model, resume: Resume, params: Params, model_name: str) -> keras.Model:
    """The colorizer (sharing the training model's layers) holding the weights of the lowest val ΔE00; the
    GAN's with its chroma curve (chromalab.train.models.with_chroma_curve), the baseline as the seed's."""
    exported = colorizer(model)
    exported.load_weights(resume.checkpoint.best_weights(resume.state))  # every run validates its last epoch
    if model_name == "gan":
        exported = with_chroma_curve(exported, params.gan.chroma_pivot, params.gan.chroma_expand)
    return exported


def _final_metrics(model: keras.Model, exported: keras.Model, val_ds, validation: Validation, resume: Resume,
                   epochs: int, train_seconds: float) -> dict:
    """The val_* scores of the best checkpoint (SSIM, MSE, MAE on ab) and of the exported colorizer (ΔE00: the
    GAN's after its chroma curve, otherwise best_val_delta_e00 again), which epoch it is, and the last epoch's
    training losses. Never test: that is the evaluate stage's."""
    scores = model.evaluate(val_ds, verbose=0, return_dict=True)  # the training model now holds the best weights
    last = resume.history[-1] if resume.history else {}
    out = {f"val_{k}": float(v) for k, v in scores.items() if k in VALIDATION_METRICS}
    out[VAL_DELTA_E00] = val_delta_e00(exported, validation.L, validation.ab, validation.batch_size)
    out.update({k: v for k, v in last.items() if k not in ("epoch",) and not k.startswith("val_")})
    best_epoch = int(resume.state["best_epoch"])
    out.update(best_epoch=best_epoch, best_val_delta_e00=float(resume.state["best_val_delta_e00"]),
               exported=f"best validation ΔE00 (epoch {best_epoch})")
    out["epochs"] = epochs
    out["train_seconds_this_run"] = round(train_seconds, 2)
    return out


def _export(deliverable: keras.Model, model_file: Path, strategy) -> None:
    """Save the colorizer as an inference model (same layers, no compile state), so that it loads without
    chromalab's losses."""
    if isinstance(strategy, keras.distribution.DataParallel):
        # Training is over and every process holds the whole model: predicting on local arrays (the model
        # log's signature) must not be split across processes, which Keras allows only for tf.data.
        keras.distribution.set_distribution(None)
    with atomic_path(model_file) as tmp:
        deliverable.save(tmp)


REPORTS = ("history.csv", "train_metrics.json")  # in reports/<model>/, with models/<model>/model.keras: dvc.yaml's outs


def _write_reports(reports_dir: Path, history: list[dict], metrics: dict) -> None:
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_history(reports_dir / REPORTS[0], history)
    write_text_atomic(reports_dir / REPORTS[1], json.dumps(metrics, indent=2))
