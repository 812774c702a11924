"""chromalab.train.checkpoint without training: what a checkpoint must match to be resumed, what it restores,
and that a save failing midway leaves the previous checkpoint whole. (test_training resumes real runs.)"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from chromalab.config import parse_params
from chromalab.train.checkpoint import Checkpoint, params_fingerprint

RUN = {"gan": {"epochs": 10}, "baseline": {"epochs": 10}}


def fingerprint(changes: dict | None = None, model: str = "gan", dataset: str = "data", code: str = "code") -> str:
    raw = {group: dict(values) for group, values in RUN.items()}
    for group, values in (changes or {}).items():
        raw.setdefault(group, {}).update(values)
    return params_fingerprint(parse_params(raw), model, dataset, code)


def test_the_fingerprint_holds_what_the_model_trains_on_and_nothing_else():
    before = fingerprint()
    changed = [fingerprint({"gan": {"epochs": 11}}), fingerprint({"train": {"flip_ud": True}}),
               fingerprint({"base": {"seed": 1}}), fingerprint(dataset="other data"), fingerprint(code="edited")]
    assert before not in changed and len(set(changed)) == len(changed)
    # the other model's params and the stages after training leave a GAN checkpoint resumable
    assert fingerprint({"baseline": {"epochs": 11}, "evaluate": {"n_worst": 2}}) == before
    assert fingerprint(model="baseline") != before


def net_with_dropout() -> keras.Model:
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dropout(0.5, seed=3)(inputs)))
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 8)), np.zeros((4, 2)), epochs=1, verbose=0)
    return model


def checkpointed(folder, model, epoch=4) -> tuple[Checkpoint, dict]:
    checkpoint = Checkpoint(folder)
    state = {"fingerprint": "f", "status": "running", "epoch": epoch}
    checkpoint.save(model, state, [{"epoch": epoch, "loss": 0.5}])
    return checkpoint, json.loads(checkpoint.state_file.read_text())


def test_only_a_running_checkpoint_of_the_same_fingerprint_with_all_its_files_is_resumable(tmp_path):
    checkpoint, state = checkpointed(tmp_path, net_with_dropout())
    assert checkpoint.resumable(state, "f")
    assert not checkpoint.resumable(state, "other params")
    assert not checkpoint.resumable({**state, "status": "complete"}, "f")
    assert not checkpoint.resumable({**state, "sheets": ["sheet-00004.npy"]}, "f")  # MLflow lacks that sheet
    (tmp_path / state["history"]).unlink()
    assert not checkpoint.resumable(state, "f")
    assert not checkpoint.resumable(None, "f")


def test_a_start_killed_before_its_first_checkpoint_reuses_its_run_only_for_the_same_fingerprint():
    started = {"fingerprint": "f", "status": "running", "epoch": 0, "mlflow_run_id": "run-1"}
    assert Checkpoint.started_run(started, "f") == "run-1"
    assert Checkpoint.started_run(started, "other params") is None
    assert Checkpoint.started_run({**started, "weights": "epoch-00005.weights.h5"}, "f") is None  # a checkpoint


def test_restore_brings_back_weights_optimizer_step_and_the_dropout_seed_state(tmp_path):
    model = net_with_dropout()
    checkpoint, state = checkpointed(tmp_path, model)
    expected = [np.array(v) for v in model.variables]
    model.fit(np.ones((4, 8)), np.zeros((4, 2)), epochs=2, verbose=0)  # weights, step and seed move on
    assert any(not np.array_equal(a, np.array(v)) for a, v in zip(expected, model.variables))
    checkpoint.restore(model, state)
    for want, variable in zip(expected, model.variables, strict=True):
        np.testing.assert_array_equal(np.array(variable), want, err_msg=variable.path)


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_resumable(tmp_path, monkeypatch):
    model = net_with_dropout()
    checkpoint, previous = checkpointed(tmp_path, model)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_weights", disk_full)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(model, {"fingerprint": "f", "status": "running", "epoch": 8}, [{"epoch": 8}])
    assert json.loads(checkpoint.state_file.read_text()) == previous and checkpoint.resumable(previous, "f")


def test_a_checkpoint_keeps_the_sample_sheets_mlflow_has_yet_to_get(tmp_path):
    checkpoint, state = Checkpoint(tmp_path), {"fingerprint": "f", "status": "running", "epoch": 5}
    sheets = [(np.full((2, 3, 3), 10, np.uint8), 3), (np.full((2, 3, 3), 20, np.uint8), 5)]
    checkpoint.keep_sheets(sheets, state)
    checkpoint.save(net_with_dropout(), state, [{"epoch": 5}])
    kept = checkpoint.sheets(json.loads(checkpoint.state_file.read_text()))
    assert [(image.tolist(), epoch) for image, epoch in kept] == [(image.tolist(), epoch) for image, epoch in sheets]
    assert checkpoint.resumable(state, "f")


def test_a_finished_shared_checkpoint_on_a_machine_without_dvc_is_kept_not_a_traceback(tmp_path, monkeypatch):
    """A finished checkpoint-<fp> is left until DVC's cache holds its outputs; on a machine without DVC (the GPU
    check's) the next training asked DVC's cache about it and died on `import dvc`. No DVC: nothing is in its
    cache, and the folder stays."""
    import sys
    from pathlib import Path

    from chromalab.train.stage import _remove_checkpoints_dvc_keeps

    class BlockDvc:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "dvc":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in [m for m in sys.modules if m == "dvc" or m.startswith("dvc.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BlockDvc(), *sys.meta_path])
    for name in ("DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".gpu-check").mkdir()
    monkeypatch.chdir(tmp_path / ".gpu-check")
    output = Path("model.keras")
    output.write_bytes(b"weights")
    folder = tmp_path / "models/gan/checkpoint-fp"
    Checkpoint(folder).mark_complete("fp", "run", [output])
    assert not Checkpoint(folder).kept_by_dvc(tmp_path)
    _remove_checkpoints_dvc_keeps(folder.parent)
    assert (folder / "delivered/model.keras").read_bytes() == b"weights"


def test_a_folder_inside_the_workspace_keeps_its_own_checkpoint_only_a_dvc_temporary_copy_shares_one(tmp_path,
                                                                                                     monkeypatch):
    """The GPU check trains in .gpu-check/ below the checkout, which is no temporary copy of DVC's: its checkpoint
    went into the checkout's models/ as a shared checkpoint-<fp>, left there once trained."""
    from pathlib import Path

    from chromalab.train.stage import _checkpoint_folder

    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / ".gpu-check").mkdir()
    (tmp_path / ".dvc/tmp/exps/run/abc").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / ".gpu-check")
    assert _checkpoint_folder(Path("models"), "gan", "fp") == (Path("models/gan/checkpoint"), False)
    monkeypatch.chdir(tmp_path / ".dvc/tmp/exps/run/abc")
    assert _checkpoint_folder(Path("models"), "gan", "fp") == (tmp_path.resolve() / "models/gan/checkpoint-fp", True)
