"""The GAN recipe's levers (issue 24): GroupNorm generator, spectral norm and DiffAugment for the
discriminator, the SSIM+L1 reconstruction, and the NoGAN phases with a step count per net."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from chromalab.train import losses
from chromalab.train.diffaugment import DiffAugment
from chromalab.train.gan import ADVERSARIAL, PRETRAIN, WARMUP, Pix2Pix, phase_plan
from chromalab.train.models import build_discriminator, build_generator, forward_flops
from chromalab.train.optimizers import FusedAdam

TINY = 0.125


def test_group_norm_generator_normalises_only_maps_larger_than_2x2():
    generator = build_generator(32, TINY, norm="group")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in generator.layers)
    normalised = [layer for layer in generator.layers if isinstance(layer, keras.layers.GroupNormalization)]
    sizes = {layer.name: layer.input.shape[1] for layer in normalised}
    # 32 px: down 16, 8, 4, 2, 1 and up 2, 4, 8, 16; down1 has none, as in pix2pix
    assert sizes == {"down2_gn": 8, "down3_gn": 4, "up2_gn": 4, "up3_gn": 8, "up4_gn": 16}
    for layer in normalised:
        assert layer.input.shape[-1] % layer.groups == 0


def test_group_norm_generator_colours_a_photo_alike_in_any_batch():
    """BatchNorm in training mode mixes the batch into each photo's colours; GroupNorm does not."""
    keras.utils.set_random_seed(0)
    L = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 1)).astype("float32")
    outputs = {}
    for norm in ("batch", "group"):
        generator = build_generator(32, TINY, norm=norm)
        for layer in generator.layers:  # dropout off: compare the normalisation alone
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
        alone = np.asarray(generator(L[:1], training=True))
        in_batch = np.asarray(generator(L, training=True))[:1]
        outputs[norm] = np.abs(alone - in_batch).max()
    assert outputs["group"] < 1e-5 < outputs["batch"]


def test_spectral_norm_discriminator_wraps_every_convolution_and_costs_the_same():
    plain = build_discriminator(32, TINY)
    spectral = build_discriminator(32, TINY, spectral_norm=True, diffaug=True)
    wrapped = [layer for layer in spectral.layers if isinstance(layer, keras.layers.SpectralNormalization)]
    convs = [layer for layer in plain.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(wrapped) == len(convs) == 5
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in spectral.layers)
    assert forward_flops(spectral) == forward_flops(plain)
    L, ab = np.zeros((2, 32, 32, 1), "float32"), np.zeros((2, 32, 32, 2), "float32")
    assert spectral([L, ab]).shape == plain([L, ab]).shape


def test_diffaugment_shifts_and_cuts_each_image_in_training_only():
    import tensorflow as tf

    layer = DiffAugment(seed=1)
    images = tf.Variable(np.ones((8, 32, 32, 3), "float32"))
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), 1.0)
    with tf.GradientTape() as tape:
        seen = layer(images, training=True)
        total = tf.reduce_sum(seen)
    seen = np.asarray(seen)
    assert set(np.unique(seen)) <= {0.0, 1.0}
    zeros = (seen[..., 0] == 0).mean(axis=(1, 2))
    # every image loses its cut-out square (up to a quarter of it) and its shifted-in border
    assert np.all(zeros > 0.05) and len(set(np.round(zeros, 4))) > 1  # each image draws its own
    assert np.all(seen[..., 0] == seen[..., 2])  # one transform for all channels of an image
    gradient = np.asarray(tape.gradient(total, images))
    np.testing.assert_array_equal(gradient, (gradient > 0).astype("float32"))  # the fake's gradient flows through
    assert gradient.sum() > 0


def test_ssim_l1_reconstruction_is_the_weighted_sum():
    rng = np.random.default_rng(0)
    real = rng.uniform(-0.5, 0.5, (2, 32, 32, 2)).astype("float32")
    fake = (real + rng.normal(0, 0.1, real.shape)).astype("float32")
    l1 = np.abs(real - fake).mean()
    ssim = np.asarray(losses.ssim(real, fake)).mean()
    mix, reported_l1 = losses.reconstruction_loss(real, fake, "ssim_l1")
    assert float(mix) == pytest.approx(0.84 * (1 - ssim) + 0.16 * l1, rel=1e-5)
    assert float(reported_l1) == pytest.approx(l1, rel=1e-5)
    total, adversarial, _ = losses.generator_loss(None, real, fake, 100.0, "ssim_l1")
    assert float(total) == pytest.approx(float(mix)) and float(adversarial) == 0.0


@pytest.mark.parametrize("pretrain, warmup, epochs, start, plan", [
    (0, 0, 10, 0, [(ADVERSARIAL, 0, 10)]),
    (4, 2, 10, 0, [(PRETRAIN, 0, 4), (WARMUP, 4, 6), (ADVERSARIAL, 6, 10)]),
    (4, 2, 10, 5, [(WARMUP, 5, 6), (ADVERSARIAL, 6, 10)]),
    (4, 0, 10, 8, [(ADVERSARIAL, 8, 10)]),
])
def test_phase_plan(pretrain, warmup, epochs, start, plan):
    assert phase_plan(pretrain, warmup, epochs, start) == plan


def test_each_phase_trains_only_its_nets():
    """Pretraining moves G alone, the warm-up D alone (G and its BatchNorm statistics untouched), then both."""
    keras.utils.set_random_seed(0)
    generator, discriminator = build_generator(32, TINY), build_discriminator(32, TINY, diffaug=True)
    gan = Pix2Pix(generator, discriminator, 100.0, recon="ssim_l1")
    gan.compile(optimizer=FusedAdam(2e-4, beta_1=0.5))
    rng = np.random.default_rng(0)
    L = rng.uniform(0, 1, (8, 32, 32, 1)).astype("float32")
    ab = rng.uniform(-0.3, 0.3, (8, 32, 32, 2)).astype("float32")

    def snapshot(net):
        return [np.asarray(v).copy() for v in net.weights]

    def moved(before, net):
        return any(not np.array_equal(a, b) for a, b in zip(before, snapshot(net)))

    for phase, g_moves, d_moves in ((PRETRAIN, True, False), (WARMUP, False, True), (ADVERSARIAL, True, True)):
        g0, d0 = snapshot(generator), snapshot(discriminator)
        gan.phase = phase
        epochs = 2 if phase == PRETRAIN else 1
        logs = gan.fit(L, ab, batch_size=4, epochs=epochs, verbose=0).history
        assert (moved(g0, generator), moved(d0, discriminator)) == (g_moves, d_moves), phase
        assert (logs["d_loss"][-1] == 0.0) == (phase == PRETRAIN)
    optimizer = gan.optimizer

    def counts(net):
        return {float(optimizer._updates[optimizer._get_variable_index(v)]) for v in net.trainable_variables}

    assert counts(generator) == {6.0}  # pretraining's 4 steps, then 2 adversarial
    assert counts(discriminator) == {4.0}  # the warm-up's 2, then 2 adversarial
