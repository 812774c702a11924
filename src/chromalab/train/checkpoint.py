"""A training run's checkpoint: complete or absent, whatever moment a kill picks.

The folder (git-ignored, not a DVC output: DVC leaves it in place) holds each checkpoint's files under its epoch's name,
`epoch-00005.weights.h5` and `epoch-00005.history.csv`, and `state.json`, which names them. state.json is
replaced last (atomically), and only then are the previous epoch's files removed: a kill at any point leaves
a state.json that names files which are whole, so the resumed run starts from the last complete checkpoint.

The best validation so far (lowest val ΔE00) keeps the colorizer's weights in `best-epoch-00009.weights.h5`,
written when that validation ends; state.json names it (with `best_epoch`, `best_val_delta_e00`) from the
next checkpoint on, so a resumed run compares against the best its checkpoint had seen, and its file is
there: an older best file goes only when a checkpoint that names a newer one is written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from chromalab.config import Params, flatten
from chromalab.errors import ChromalabError
from chromalab.files import atomic_file, atomic_path, dvc_recorded_outputs, staged_dir, write_text_atomic

STATE_FILE = "state.json"
DELIVERED = "delivered"  # a finished run's outputs, kept until the next run (`Checkpoint.deliver_again`)


def params_fingerprint(params: Params, model_name: str, dataset_hash: str, code: str) -> str:
    """What a checkpoint must match to be resumed: this model's params, the dataset and the code training runs
    (`chromalab.code.code_hash`; a run resumed across a change to it would be half old code's, yet DVC would
    record it as today's)."""
    own = {k: v for k, v in flatten(params).items() if k.split(".")[0] in ("base", "train", model_name)}
    blob = json.dumps({"params": own, "dataset": dataset_hash, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng_states(model: keras.Model) -> list:
    """The layers' random-seed states (dropout), in model order: `variables` beyond the saved `weights`."""
    saved = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in saved]


@dataclass
class Checkpoint:
    """The weights file holds the model's and the optimizer's variables (its step count included); state.json
    adds the dropout layers' seed states, which `save_weights` leaves out, so resumed dropout masks match."""

    folder: Path

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    def load_state(self) -> dict | None:
        if not self.state_file.is_file():
            return None
        try:
            return json.loads(self.state_file.read_text())
        except json.JSONDecodeError:
            return None  # a torn write can't happen (atomic), but a hand-edited file can

    def save(self, model: keras.Model, state: dict, history: list[dict]) -> None:
        """Checkpoint epoch `state["epoch"]`: its files first, then state.json naming them, then cleanup."""
        stamp = f"epoch-{int(state['epoch']):05d}"
        state["weights"], state["history"] = f"{stamp}.weights.h5", f"{stamp}.history.csv"
        state["rng_states"] = [np.asarray(v).tolist() for v in _rng_states(model)]
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / state["weights"]) as tmp:
            model.save_weights(tmp, overwrite=True)
        write_history(self.folder / state["history"], history)
        write_text_atomic(self.state_file, json.dumps(state, indent=2))  # now this checkpoint is the one
        keep = {state["weights"], state["history"], STATE_FILE, state.get("best_weights"), *state.get("sheets", [])}
        for stale in self.folder.iterdir():  # the previous checkpoint's files, and any a kill left half-written
            if stale.name not in keep:
                _remove(stale)

    def write_state(self, state: dict) -> None:
        """state.json as `state` says, with no new weights: a start naming its MLflow run (a run killed before
        its first checkpoint starts again from epoch 0 in that same run, `started_run`), or how far the
        finishing of a trained run got (`finished_steps`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.state_file, json.dumps(state, indent=2))

    @staticmethod
    def started_run(state: dict | None, fingerprint: str) -> str | None:
        """The MLflow run of a start of these params and data that was killed before its first checkpoint."""
        if state and state.get("fingerprint") == fingerprint and state.get("status") == "running" \
                and not state.get("weights"):
            return state.get("mlflow_run_id")
        return None

    def keep_sheets(self, sheets: list[tuple[np.ndarray, int]], state: dict) -> None:
        """Sample sheets (image, epoch) that MLflow has yet to get, as files named in `state`: the next `save`
        keeps them with its checkpoint, so a kill before they reach MLflow does not lose them."""
        state["sheets"] = []
        for sheet, epoch in sheets:
            name = f"sheet-{epoch:05d}.npy"
            with atomic_file(self.folder / name) as f:
                np.save(f, sheet)
            state["sheets"].append(name)

    def sheets(self, state: dict) -> list[tuple[np.ndarray, int]]:
        """The sample sheets the checkpoint of `state` kept, as (image, epoch)."""
        return [(np.load(self.folder / name), int(name.removeprefix("sheet-").removesuffix(".npy")))
                for name in state.get("sheets", [])]

    def save_best(self, colorizer: keras.Model, state: dict, epoch: int, score: float) -> None:
        """Keep `colorizer`'s weights as the best so far (epoch `epoch`, val ΔE00 `score`): the file now, its
        name in `state` (so in state.json from the next `save` on)."""
        name = f"best-epoch-{epoch:05d}.weights.h5"
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / name) as tmp:
            colorizer.save_weights(tmp, overwrite=True)
        state.update(best_weights=name, best_epoch=epoch, best_val_delta_e00=score)

    def best_weights(self, state: dict) -> Path | None:
        """The best validation's weights file, or None before the first validation."""
        return self.folder / state["best_weights"] if state.get("best_weights") else None

    def restore(self, model: keras.Model, state: dict) -> None:
        """Weights, optimizer state (with its step count: the learning-rate schedule follows it) and RNG states."""
        model.optimizer.build(model.trainable_variables)  # create the slots the checkpoint fills
        model.load_weights(self.folder / state["weights"])
        variables, values = _rng_states(model), state.get("rng_states", [])
        if len(variables) != len(values):
            raise ChromalabError(f"{self.state_file} holds {len(values)} RNG states but the model has "
                                 f"{len(variables)}: delete {self.folder} to start afresh")
        for variable, value in zip(variables, values):
            variable.assign(np.asarray(value, dtype=variable.dtype))

    def history(self, state: dict) -> list[dict]:
        return read_history(self.folder / state["history"])

    def resumable(self, state: dict | None, fingerprint: str) -> bool:
        """A running checkpoint of these params and data whose files (the best validation's too) are all there."""
        named = ("weights", "history", "best_weights") if state and state.get("best_weights") else ("weights", "history")
        return bool(state and state.get("fingerprint") == fingerprint and state.get("status") == "running"
                    and all((self.folder / str(state.get(key))).is_file() for key in named)
                    and all((self.folder / name).is_file() for name in state.get("sheets", [])))

    def reset(self) -> None:
        """Empty the folder, keeping the folder itself: a lock on it (a shared one's) must stay the same."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for item in self.folder.iterdir():
            _remove(item)

    def mark_complete(self, fingerprint: str, run_id: str, outputs: list[Path]) -> None:
        """Training is over and its `outputs` are written: copies of them stay here, with their MD5s, and the
        checkpoint's files go. DVC deletes a stage's outputs before it runs the stage again, so a kill after this
        and before DVC records them in dvc.lock would otherwise cost the whole training (`deliver_again`)."""
        with staged_dir(self.folder / DELIVERED) as kept:
            for path in outputs:
                shutil.copy2(path, kept / path.name)
        write_text_atomic(self.state_file, json.dumps({
            "status": "complete", "fingerprint": fingerprint, "mlflow_run_id": run_id,
            "delivered": {path.as_posix(): _md5(path) for path in outputs}}, indent=2))
        for item in self.folder.iterdir():
            if item.name not in (STATE_FILE, DELIVERED):
                _remove(item)

    def deliver_again(self, fingerprint: str, outputs: list[Path]) -> bool:
        """Put back the `outputs` of the finished run of `fingerprint` if dvc.lock does not record them (killed
        before DVC wrote it); False, and nothing done, if there is no such run or DVC recorded it: a stage DVC
        runs again after it recorded the run was forced (`dvc repro -f`), and trains afresh."""
        state = self.load_state() or {}
        delivered = state.get("delivered") or {}
        if not (state.get("status") == "complete" and state.get("fingerprint") == fingerprint
                and set(delivered) == {path.as_posix() for path in outputs}
                and all(_md5(self.folder / DELIVERED / path.name) == delivered[path.as_posix()] for path in outputs)):
            return False
        if _recorded_by_dvc(delivered):
            return False
        for path in outputs:
            with atomic_path(path) as tmp:
                shutil.copy2(self.folder / DELIVERED / path.name, tmp)
        return True


    def kept_by_dvc(self, repo: Path) -> bool:
        """Whether this is a finished run whose outputs are all in the DVC cache of `repo`: DVC keeps them (its run
        cache restores them for these params), so the copies here have done their job."""
        state = self.load_state() or {}
        delivered = state.get("delivered") or {}
        return state.get("status") == "complete" and bool(delivered) and _in_dvc_cache(repo, delivered.values())


def _in_dvc_cache(repo: Path, md5s) -> bool:
    try:  # only where a temporary copy's checkpoint is left: DVC's import
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
    except ImportError:  # no DVC (the GPU check's machine, whose work folder lies below the checkout): no cache
        return False
    try:
        with Repo(str(repo)) as dvc_repo:
            return all(md5 and Path(dvc_repo.cache.local.oid_to_path(md5)).is_file() for md5 in md5s)
    except (DvcException, AttributeError):  # no DVC repository there, or no local cache
        return False


def _recorded_by_dvc(md5s: dict[str, str]) -> bool:
    """Whether dvc.lock records each of these outputs with this MD5."""
    recorded = dvc_recorded_outputs()
    return all(recorded.get(path) == md5 for path, md5 in md5s.items())


def _md5(path: Path) -> str | None:
    """The MD5 DVC records for a file (3.x: of its bytes), or None where there is no such file."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()
    except OSError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


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
