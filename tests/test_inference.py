"""chromalab.colorize.inference: a loaded colorizer computed faster, and still the same function."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from chromalab.colorize.inference import PhaseConvTranspose, for_inference
from chromalab.train.models import build_baseline, build_generator


def random_inputs(model, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *model.input_shape[1:]), dtype=np.float32)


def test_the_unet_computes_the_same_ab_with_phase_convolutions():
    model = build_generator(64, 0.25)  # random weights: every tap of every kernel matters
    fast = for_inference(model)
    replaced = [layer for layer in fast.layers if isinstance(layer, PhaseConvTranspose)]
    # the upsamplings reading at most 4 pixels per output channel (1×1 … 8×8 pixels, 64 channels); those
    # reading 16×16 pixels for 32 channels and 32×32 for 2 stay TensorFlow's
    assert [layer.name for layer in replaced] == [f"up{i}_convT" for i in range(1, 5)]
    assert type(fast.layers[-1]) is keras.layers.Conv2DTranspose
    x = random_inputs(model)
    expected = np.asarray(model.predict_on_batch(x))
    assert np.abs(expected).max() > 1e-3  # not a trivially zero output
    np.testing.assert_allclose(np.asarray(fast.predict_on_batch(x)), expected, atol=1e-5, rtol=1e-4)
    # the other layers are the model's own (no copy of their weights)
    kept = [layer for layer in fast.layers if not isinstance(layer, (PhaseConvTranspose, keras.layers.InputLayer))]
    assert {id(layer) for layer in kept} <= {id(layer) for layer in model.layers}
    assert fast.count_params() == model.count_params()


@pytest.mark.parametrize("use_bias, activation", [(True, "tanh"), (False, None)])
def test_bias_activation_and_odd_channels_are_kept(use_bias, activation):
    inputs = keras.Input((3, 5, 7))
    outputs = keras.layers.Conv2DTranspose(6, 4, strides=2, padding="same", use_bias=use_bias,
                                           activation=activation, bias_initializer="random_normal")(inputs)
    model = keras.Model(inputs, outputs)
    fast = for_inference(model)
    assert isinstance(fast.layers[-1], PhaseConvTranspose)
    x = random_inputs(model) - 0.5
    np.testing.assert_allclose(np.asarray(fast.predict_on_batch(x)), np.asarray(model.predict_on_batch(x)),
                               atol=1e-5, rtol=1e-4)


def test_other_upsamplings_and_models_without_them_are_left_alone():
    baseline = build_baseline(32, 0.125)  # nearest-neighbour upsampling: nothing to replace
    assert for_inference(baseline) is baseline
    inputs = keras.Input((4, 4, 8))
    strided3 = keras.Model(inputs, keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same")(inputs))
    assert for_inference(strided3) is strided3
