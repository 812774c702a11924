"""FusedAdam: Keras' Adam arithmetic through TensorFlow's one-pass kernel (chromalab.train.optimizers)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from chromalab.train import optimizers
from chromalab.train.optimizers import FusedAdam


def _train(optimizer: keras.optimizers.Optimizer) -> tuple[keras.Model, list[np.ndarray]]:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    model.fit(x, x.sum(axis=1, keepdims=True), batch_size=16, epochs=3, verbose=0, shuffle=False)
    return model, [np.asarray(v) for v in model.weights + model.optimizer.variables]


@pytest.mark.parametrize("fused", [True, False], ids=["fused kernel", "keras.ops (as under JAX)"])
def test_fused_adam_takes_the_same_steps_as_keras_adam(fused, monkeypatch):
    """Same weights, moments and step count as keras.optimizers.Adam after 12 steps with a decaying rate
    (β₁ = 0.5 as pix2pix): the fused kernel and the per-variable step counts change the speed, not the
    arithmetic, while every variable steps on every batch."""
    if not fused:
        monkeypatch.setattr(optimizers, "_can_fuse", lambda gradient, variable: False)
    schedule = lambda: keras.optimizers.schedules.ExponentialDecay(1e-2, 3, 0.5)  # noqa: E731
    _, reference = _train(keras.optimizers.Adam(schedule(), beta_1=0.5))
    model, ours = _train(FusedAdam(schedule(), beta_1=0.5))
    counts = [np.asarray(c) for c in model.optimizer._updates]
    ours = ours[: len(ours) - len(counts)]  # the counts are the optimizer's last variables
    assert len(ours) == len(reference) and int(model.optimizer.iterations) == 12 and all(c == 12 for c in counts)
    for mine, theirs in zip(ours, reference):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours[0], _train(keras.optimizers.SGD())[1][0])  # the comparison can tell optimizers apart


def test_a_net_that_starts_late_gets_adams_first_step():
    """A variable left alone (None gradient) for 50 steps is not moved, and its first update is a fresh Adam's
    first step (lr·sign(g)), not the uncorrected one a shared step count gives (~30× too far at β₂ = 0.999)."""
    early, late = keras.Variable(np.zeros(3, "float32")), keras.Variable(np.zeros(3, "float32"))
    optimizer = FusedAdam(1e-3, beta_1=0.5)
    optimizer.build([early, late])
    gradient = np.array([0.5, -2.0, 0.1], "float32")
    for _ in range(50):
        optimizer.apply([gradient, None], [early, late])
    np.testing.assert_array_equal(np.asarray(late), 0.0)
    optimizer.apply([gradient, gradient], [early, late])
    np.testing.assert_allclose(np.asarray(late), -1e-3 * np.sign(gradient), rtol=1e-3)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the fused kernel is TensorFlow's")
def test_the_update_is_one_fused_kernel_per_variable():
    """The traced update holds one ResourceApplyAdam per variable and none of Keras' element-wise update ops."""
    import tensorflow as tf

    variables = [keras.Variable(np.ones((4, 3), "float32")), keras.Variable(np.zeros(3, "float32"))]
    optimizer = FusedAdam(1e-3)
    optimizer.build(variables)
    grads = [tf.ones((4, 3)), tf.ones(3)]
    graph = tf.function(lambda: optimizer.apply(grads, variables)).get_concrete_function().graph
    ops = [op.type for op in graph.get_operations()]
    assert ops.count("ResourceApplyAdam") == 2 and "Sqrt" not in ops, ops
