"""The GAN recipe's levers (issue 24): GroupNorm generator, spectral norm and DiffAugment for the
discriminator, the SSIM+L1 reconstruction, the NoGAN phases with a step count per net, and the exported
generator's chroma curve."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from chromalab.config import GanParams
from chromalab.train import losses
from chromalab.train.diffaugment import DiffAugment
from chromalab.train.gan import ADVERSARIAL, PRETRAIN, WARMUP, Pix2Pix, phase_plan
from chromalab.train.models import build_discriminator, build_generator, forward_flops, with_chroma_curve
from chromalab.train.optimizers import FusedAdam
from repo import ROOT

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


def test_the_chroma_curve_moves_chroma_away_from_its_pivot_and_keeps_hue(tmp_path):
    """C → C (1 - k + k C / pivot): gray stays gray, the pivot stays, chroma above it grows and below it
    shrinks, each pixel's hue (the direction of ab) unchanged; saved, it loads with a plain load_model."""
    inputs = keras.Input((1, 4, 2))
    net = keras.Model(inputs, keras.layers.Identity()(inputs), name="net")
    chroma = np.array([0.0, 10.0, 20.0, 50.0])
    ab = np.array([[0.0, 0.0], [6.0, -8.0], [20.0, 0.0], [-30.0, 40.0]]) / 128  # chroma 0, 10, 20, 50
    ab = ab.reshape(1, 1, 4, 2).astype("float32")
    assert with_chroma_curve(net, 20.0, 0.0) is net
    for k in (0.5, 1.0):
        curved = with_chroma_curve(net, 20.0, k)
        out = np.asarray(curved(ab))[0, 0] * 128
        expected = chroma * (1 - k + k * chroma / 20.0)
        np.testing.assert_allclose(np.hypot(out[:, 0], out[:, 1]), expected, atol=1e-3)
        np.testing.assert_allclose(out[1:] / expected[1:, None], ab[0, 0, 1:] * 128 / chroma[1:, None],
                                   atol=1e-5)
    curved.save(tmp_path / "curved.keras")
    loaded = keras.saving.load_model(tmp_path / "curved.keras")
    np.testing.assert_allclose(np.asarray(loaded(ab)), np.asarray(curved(ab)), atol=1e-7)


@pytest.mark.parametrize("expand", [0.0, 0.75])
def test_the_exported_colorizer_takes_a_plain_batch_of_L_without_warnings(expand):
    """Validation, evaluate and colorize call the exported net on an [N,S,S,1] array; a net built on the trained
    model's input list instead of its one input made Keras warn "the structure of `inputs` doesn't match" at
    every validation, in every user's training log."""
    from chromalab.train.validation import colorizer

    net = with_chroma_curve(colorizer(build_generator(32, width=0.125, norm="group")), 17.0, expand)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ab = net(np.zeros((2, 32, 32, 1), "float32"), training=False)
    assert tuple(ab.shape) == (2, 32, 32, 2)


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


def ema_follows_the_generator(folder: str) -> dict:
    """Train one step per `fit` (adversarial ×3, warm-up ×1, adversarial ×1) and replay the average in NumPy
    from the generator's weights after each step. Runs under either backend (the JAX test calls it in a
    subprocess); returns what the tests compare."""
    from chromalab.train.validation import colorizer

    keras.utils.set_random_seed(0)
    gan = Pix2Pix(build_generator(32, TINY), build_discriminator(32, TINY), 100.0, ema=0.9)
    gan.compile(optimizer=FusedAdam(1e-2, beta_1=0.5))  # a large rate: each step moves the weights visibly
    rng = np.random.default_rng(0)
    L = rng.uniform(0, 1, (4, 32, 32, 1)).astype("float32")
    ab = rng.uniform(-0.3, 0.3, (4, 32, 32, 2)).astype("float32")
    trainable = [w.trainable for w in gan.generator.weights]
    expected, updates = [np.asarray(w).copy() for w in gan.generator.weights], 0
    for phase in (ADVERSARIAL,) * 3 + (WARMUP, ADVERSARIAL):
        gan.phase = phase
        gan.fit(L, ab, batch_size=4, epochs=1, verbose=0)
        if phase == ADVERSARIAL:
            decay = min(0.9, (1 + updates) / (10 + updates))
            expected = [decay * e + (1 - decay) * np.asarray(w) if t else np.asarray(w).copy()
                        for e, w, t in zip(expected, gan.generator.weights, trainable)]
            updates += 1
    averaged = [np.asarray(w) for w in gan.generator_ema.weights]
    gan.save_weights(f"{folder}/gan.weights.h5")
    fresh = Pix2Pix(build_generator(32, TINY), build_discriminator(32, TINY), 100.0, ema=0.9)
    fresh.load_weights(f"{folder}/gan.weights.h5")
    val = gan.evaluate(L, ab, batch_size=4, verbose=0, return_dict=True)
    return {
        "max_error": max(float(np.abs(a - e).max()) for a, e in zip(averaged, expected)),
        "max_gap_to_trained": max(float(np.abs(a - np.asarray(w)).max())
                                  for a, w in zip(averaged, gan.generator.weights)),
        "updates": float(np.asarray(gan.ema_updates)),
        "colorizer_is_the_average": bool(np.allclose(np.asarray(colorizer(gan)(L)),
                                                     np.asarray(gan.generator_ema(L)), atol=1e-6)),
        "val_mae_is_the_average's": bool(np.isclose(
            val["mae"], np.abs(np.asarray(gan.generator_ema(L)) - ab).mean(), rtol=1e-4)),
        "reload_exact": all(np.array_equal(np.asarray(a), np.asarray(b))
                            for a, b in zip(fresh.weights, gan.weights)),
    }


def _assert_ema_follows(result: dict) -> None:
    assert result["max_error"] < 1e-5  # exactly the recursion, warm-up included; the warm-up step skipped
    assert result["max_gap_to_trained"] > 1e-3  # and not simply the trained weights
    assert result["updates"] == 4.0
    assert result["colorizer_is_the_average"] and result["val_mae_is_the_average's"]
    assert result["reload_exact"]  # a checkpoint holds the average and its count


def test_ema_is_the_moving_average_of_the_trained_generator(tmp_path):
    _assert_ema_follows(ema_follows_the_generator(str(tmp_path)))


def test_ema_under_jax_is_the_same_average(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import jax_env

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_gan_levers as t; "
            "print(json.dumps(t.ema_follows_the_generator(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)],
                          env=jax_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_ema_follows(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_readmes_seed_recipe_line_sets_every_lever_of_the_recipe_back_to_the_seeds():
    """params.yaml's recipe + the README's `seed-recipe` overrides = GanParams' defaults (pix2pix's), apart from
    what the seed's tutorial itself chose: 1,500 epochs at batch 1 and a constant rate. A lever added to the
    recipe without its `-S` in that line would make the line reproduce something other than the seed."""
    line = re.search(r"dvc exp run -n seed-recipe (.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    overrides = dict(re.findall(r"-S gan\.(\w+)=(\S+)", line))
    gan = yaml.safe_load((ROOT / "params.yaml").read_text())["gan"]
    seed = GanParams(**{**gan, **{key: yaml.safe_load(value) for key, value in overrides.items()}})
    assert (seed.epochs, seed.batch_size, seed.decay_epochs) == (1500, 1, 0)
    tutorial_choices = {"epochs", "batch_size", "decay_epochs"}
    differing = {name for name in GanParams.model_fields if name not in tutorial_choices
                 and getattr(seed, name) != getattr(GanParams(), name)}
    assert not differing, f"the README's seed-recipe line leaves these at the recipe's values: {sorted(differing)}"
