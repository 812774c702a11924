"""Which epoch training keeps (chromalab.train.callbacks.EpochRecorder): the lowest val ΔE00, validated every
train.val_every epochs and at the last, never a GAN pretraining epoch, ties keeping the earlier, and a resumed
run measured against the best its checkpoint had seen. Scripted scores and a tiny net: no training."""

from __future__ import annotations

from types import SimpleNamespace

import keras
import numpy as np
import pytest

from chromalab.errors import ChromalabError
from chromalab.train import callbacks
from chromalab.train.checkpoint import Checkpoint


@pytest.fixture
def scripted(monkeypatch):
    """`scores` {epoch: val ΔE00} that the recorder's validation of epoch `epoch` gets; MLflow and sheets off."""
    script = SimpleNamespace(scores={}, epoch=0)
    monkeypatch.setattr(callbacks, "val_delta_e00", lambda net, L, true_ab, batch: script.scores[script.epoch])
    monkeypatch.setattr(callbacks, "sample_sheet", lambda *args: np.zeros((2, 2, 3), np.uint8))
    monkeypatch.setattr(callbacks, "predict_ab", lambda net, L, batch: np.zeros((*L.shape[:-1], 2), np.float32))
    monkeypatch.setattr("chromalab.track.runs.log_epoch", lambda metrics, step: None)
    monkeypatch.setattr("chromalab.track.runs.log_sample_sheet", lambda sheet, step: None)
    return script


def recorder(folder, state, *, total_epochs, val_every=1, keep_after=0, history=None):
    inputs = keras.Input((4,))
    net = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    train = SimpleNamespace(val_every=val_every, sample_every=1000, checkpoint_every=1000)
    zeros = np.zeros((1, 4, 4, 1), np.float32)
    made = callbacks.EpochRecorder(checkpoint=Checkpoint(folder), state=state, history=history or [],
                                   train_params=train, total_epochs=total_epochs, samples=(zeros, zeros),
                                   images_per_epoch=1, validation=(zeros, zeros), batch_size=1, keep_after=keep_after)
    made.set_model(net)
    return made


def run_epochs(made, scripted, epochs):
    for epoch in epochs:
        scripted.epoch = epoch + 1
        made.on_epoch_begin(epoch)
        made.on_epoch_end(epoch, {"loss": 1.0})


def test_the_lowest_val_delta_e00_after_pretraining_is_kept_ties_keeping_the_earlier(tmp_path, scripted):
    # epochs 1-2 are the GAN's pretraining: validated, lower than any later, never kept
    scripted.scores.update({1: 1.0, 2: 0.5, 3: 6.0, 4: 5.0, 5: 5.0, 6: 7.0})
    state = {"fingerprint": "f", "status": "running", "epoch": 0}
    made = recorder(tmp_path, state, total_epochs=6, keep_after=2)
    run_epochs(made, scripted, range(6))
    assert (state["best_epoch"], state["best_val_delta_e00"]) == (4, 5.0)
    assert [row["val_delta_e00"] for row in made.history_rows] == [1.0, 0.5, 6.0, 5.0, 5.0, 7.0]
    assert (tmp_path / "best-epoch-00004.weights.h5").is_file()


def test_a_resumed_run_compares_against_the_best_its_checkpoint_had_seen(tmp_path, scripted):
    scripted.scores.update({5: 4.5, 6: 3.9})
    state = {"fingerprint": "f", "status": "running", "epoch": 4, "best_epoch": 2, "best_val_delta_e00": 4.0,
             "best_weights": "best-epoch-00002.weights.h5"}
    made = recorder(tmp_path, state, total_epochs=6)
    run_epochs(made, scripted, [4])
    assert (state["best_epoch"], state["best_val_delta_e00"]) == (2, 4.0)  # 4.5 is worse than before the kill
    run_epochs(made, scripted, [5])
    assert (state["best_epoch"], state["best_val_delta_e00"]) == (6, 3.9)


@pytest.mark.parametrize(("logs", "score", "named"), [({"loss": float("nan")}, 5.0, "loss was nan at epoch 3"),
                                                      ({"loss": 1.0}, float("inf"), "val_delta_e00 was inf")])
def test_a_diverged_epoch_stops_training_in_one_line_before_its_checkpoint(tmp_path, scripted, logs, score, named):
    # training went on for every remaining epoch on NaN weights, then failed at export with no best epoch kept
    scripted.scores.update({1: 6.0, 2: 5.5, 3: score})
    state = {"fingerprint": "f", "status": "running", "epoch": 0}
    made = recorder(tmp_path, state, total_epochs=6, keep_after=0)
    made.train_params.checkpoint_every = 1
    run_epochs(made, scripted, range(2))
    scripted.epoch = 3
    made.on_epoch_begin(2)
    with pytest.raises(ChromalabError, match=named) as err:
        made.on_epoch_end(2, logs)
    assert "learning_rate" in str(err.value) and "\n" not in str(err.value)
    assert state["epoch"] == 2 and state["best_epoch"] == 2  # the last good checkpoint stays the one to resume


def test_under_loss_scaling_only_a_diverged_val_score_stops_training(tmp_path, scripted):
    # float16's loss scaling skips a step whose loss is not finite, so the epoch's mean loss may be NaN or inf
    # while the weights are sound
    scripted.scores.update({1: 6.0, 2: float("nan")})
    state = {"fingerprint": "f", "status": "running", "epoch": 0}
    made = recorder(tmp_path, state, total_epochs=6)
    made.model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), loss="mse")
    made.on_epoch_begin(0)
    scripted.epoch = 1
    made.on_epoch_end(0, {"loss": float("inf")})
    assert state["best_epoch"] == 1
    scripted.epoch = 2
    made.on_epoch_begin(1)
    with pytest.raises(ChromalabError, match="val_delta_e00 was nan at epoch 2"):
        made.on_epoch_end(1, {"loss": 1.0})


def test_validation_runs_every_val_every_epochs_and_at_the_last(tmp_path, scripted):
    """7 epochs validated every 3: epochs 3, 6 and 7, the last of which may be the best and exported."""
    scripted.scores.update({3: 5.0, 6: 4.0, 7: 3.0})
    state = {"fingerprint": "f", "status": "running", "epoch": 0}
    made = recorder(tmp_path, state, total_epochs=7, val_every=3)
    run_epochs(made, scripted, range(7))
    assert [row["epoch"] for row in made.history_rows if "val_delta_e00" in row] == [3, 6, 7]
    assert state["best_epoch"] == 7 and state["epoch"] == 7  # the last epoch is checkpointed too


def test_val_delta_e00_is_the_mean_over_val_photos_of_each_photos_ciede2000_as_evaluate_scores_test():
    """The rule that picks the exported epoch is the one the evaluate stage reports: every val photo counted
    (in batches that do not divide the split), dropout off, ΔE00 on real Lab units."""
    from skimage import color as skcolor

    from chromalab.evaluate.metrics import photo_metrics
    from chromalab.train.validation import val_delta_e00

    rng = np.random.default_rng(5)
    L = rng.uniform(0.2, 0.9, (5, 16, 16, 1)).astype(np.float32)
    true_ab = rng.uniform(-0.3, 0.3, (5, 16, 16, 2)).astype(np.float32)
    inputs = keras.Input((16, 16, 1))
    dropped = keras.layers.Dropout(0.5)(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    net = keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="tanh")(dropped))
    pred = np.asarray(net(L, training=False))
    by_hand = [skcolor.deltaE_ciede2000(np.concatenate([L[i] * 100, true_ab[i] * 128], -1),
                                        np.concatenate([L[i] * 100, pred[i] * 128], -1)).mean() for i in range(5)]
    assert by_hand[4] != pytest.approx(by_hand[0])  # the last photo, alone in its batch, weighs in the mean
    assert val_delta_e00(net, L, true_ab, batch_size=2) == pytest.approx(np.mean(by_hand), rel=1e-5)
    scored = [photo_metrics(L[i], true_ab[i], pred[i])["delta_e00"] for i in range(5)]
    assert val_delta_e00(net, L, true_ab, batch_size=2) == pytest.approx(np.mean(scored), rel=1e-5)


@pytest.mark.parametrize(("model_name", "kept_after"), [("gan", 5), ("baseline", 0)])
def test_training_keeps_no_epoch_of_the_gans_pretraining_or_warm_up(monkeypatch, model_name, kept_after):
    """The GAN's generator is trained on the reconstruction alone for pretrain_epochs, then held while the
    discriminator warms up: the exported epoch must come from the adversarial phase the stage is about."""
    from chromalab.config import parse_params
    from chromalab.train import stage

    made = {}
    monkeypatch.setattr(stage, "EpochRecorder", lambda **kwargs: made.update(kwargs))
    params = parse_params({"gan": {"epochs": 10, "pretrain_epochs": 3, "warmup_epochs": 2}, "baseline": {"epochs": 10}})
    validation = SimpleNamespace(L=np.zeros((1, 4, 4, 1)), ab=np.zeros((1, 4, 4, 2)), batch_size=1)
    resume = SimpleNamespace(checkpoint=None, state={}, history=[], epoch=0)
    stage._fit(None, SimpleNamespace(train=None), None, resume, params, model_name, 1, validation, 1, False)
    assert made["keep_after"] == kept_after
