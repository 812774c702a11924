"""Learning check: a tiny pix2pix, trained for a bounded number of steps on real photos, learns colour.

Not "it runs" but "it learns": the photos go through the project's Lab encoding (chromalab.color), the GAN
is built and compiled as the train stage builds it (training.build_for_training: U-Net + PatchGAN,
Adam(β1 = 0.5), adversarial + λ·L1), trained with `fit` (chromalab.gan's train step), and its predictions
are decoded and scored by chromalab.metrics. If any link is broken (a wrong scale, a sign, a loss that
doesn't reach the generator) the model ends no closer to the truth than a gray or flat-tinted photo.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from chromalab import metrics
from chromalab.color import rgb_to_lab_norm
from chromalab.config import parse_params
from chromalab.training import build_for_training
from chromalab.samples import real_crops

SIZE = 32
N_PHOTOS = 4  # crops of astronaut (the person), chelsea, coffee and rocket
STEPS = 600
# The width-0.25 net has 1/16 of the paper's weights per layer; 10× the paper's learning rate suits it
# (at the paper's 2e-4 it learns too, but ends at ΔE00 4.0-4.2 instead of 2.5-3.3 in these 600 steps).
TINY_GAN = {"base": {"seed": 42, "image_size": SIZE}, "gan": {"width": 0.25, "learning_rate": 2e-3}}

# The bar, from measurements (600 steps, seeds 0-7 and 42, TensorFlow on 2 CPU cores): mean ΔE00 on these
# photos is 15.9 for the gray floor, 14.2 for the best flat tint shared by all photos, 7.5 for each photo
# painted flat in its own true mean colour, 25.8 for uniform ab noise in ±0.3; the trained model ends at
# 2.5-3.3. "Below half the gray floor's ΔE00 and below the per-photo flat true tint" thus holds with over 2×
# headroom, yet nothing that ignores the image content passes it, not even knowing each photo's mean colour.
MAX_DELTA_E_FRACTION_OF_GRAY = 0.5
# Colourfulness (Hasler & Süsstrunk) is exactly 0 for the gray floor; the truth's mean is 55.9 here and the
# model's 47.8-62.9. Half the truth's leaves the same headroom and still means "moderately colourful" (≥ 28).
MIN_COLOURFULNESS_FRACTION_OF_TRUTH = 0.5


def scores(L: np.ndarray, true_ab: np.ndarray, pred_ab: np.ndarray) -> dict[str, float]:
    return metrics.summarise(metrics.photo_metrics(l, t, p) for l, t, p in zip(L, true_ab, pred_ab))


def assert_learned_colour(L: np.ndarray, true_ab: np.ndarray, pred_ab: np.ndarray) -> None:
    """The learning bar: far closer to the truth than gray or any flat tint, and colourful."""
    predicted = scores(L, true_ab, pred_ab)
    gray = scores(L, true_ab, metrics.gray_floor(true_ab))
    flat_true_tint = np.broadcast_to(true_ab.mean(axis=(1, 2), keepdims=True), true_ab.shape)
    tint = scores(L, true_ab, flat_true_tint)
    figures = (f"ΔE00 {predicted['delta_e00']:.2f} vs gray floor {gray['delta_e00']:.2f} and flat true tint "
               f"{tint['delta_e00']:.2f}; colourfulness {predicted['colourfulness']:.1f} "
               f"(truth {predicted['colourfulness_true']:.1f})")
    assert predicted["delta_e00"] < MAX_DELTA_E_FRACTION_OF_GRAY * gray["delta_e00"], figures
    assert predicted["delta_e00"] < tint["delta_e00"], figures
    assert predicted["colourfulness"] > MIN_COLOURFULNESS_FRACTION_OF_TRUTH * predicted["colourfulness_true"], figures


@pytest.fixture(scope="module")
def photos() -> tuple[np.ndarray, np.ndarray]:
    """Normalised L [N, S, S, 1] and ab [N, S, S, 2] of real colour photos."""
    lab = rgb_to_lab_norm(np.stack(real_crops(N_PHOTOS, SIZE, seed=0)))
    return lab[..., :1], lab[..., 1:]


@pytest.fixture(scope="module")
def trained_predictions(photos) -> np.ndarray:
    L, ab = photos
    params = parse_params(TINY_GAN)
    keras.utils.set_random_seed(params.base.seed)
    gan = build_for_training("gan", params, SIZE, jit_compile=False)
    # One epoch of STEPS batches, each holding every photo: Keras' per-epoch overhead is paid once.
    gan.fit(np.tile(L, (STEPS, 1, 1, 1)), np.tile(ab, (STEPS, 1, 1, 1)), batch_size=N_PHOTOS, epochs=1,
            shuffle=False, verbose=0)
    return ops.convert_to_numpy(gan.generator(L, training=False))


def test_the_bar_rejects_predictions_that_ignore_the_photo(photos):
    L, ab = photos
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, ab.shape).astype(np.float32)
    flat_true_tint = np.broadcast_to(ab.mean(axis=(1, 2), keepdims=True), ab.shape)
    for not_learned in (metrics.gray_floor(ab), noise, flat_true_tint):
        with pytest.raises(AssertionError):
            assert_learned_colour(L, ab, not_learned)


def test_a_tiny_gan_learns_colour_from_real_photos(photos, trained_predictions):
    L, ab = photos
    assert_learned_colour(L, ab, trained_predictions)


# Why the baseline (the seed's CNN, SSIM loss, RMSprop; build_for_training("baseline", …)) has no learning test
# here (issue 12), measured on the same 4 crops at 32 px, batch 4 (every photo each step), TensorFlow on 2 CPU
# cores shared with other work, seeds 0-4 and 42, ΔE00 of eval-mode predictions (floors: gray 15.9, best flat
# tint shared by all photos 13.5 on a 25 × 25 grid of a, b in ±38, each photo's own flat true tint 7.5):
#   width 0.125, lr 3e-3, 600 steps:         10.4 10.7 28.3 11.7 11.7 14.4   (at 300 steps 20.3-40.5 on seeds 1-4)
#   width 0.125, lr 3e-3 decaying to 0, 300:  15.3 34.8 15.5 15.3 14.8 32.1
#   width 0.125, lr 1e-3 (RMSprop's), 600:    13.6 14.5 15.1 17.1 19.5 18.2
#   seed 0 only: width 0.25, lr 3e-3, 600 steps 12.1; the same with batch 1: 19.8
#   64 px (gray 16.0), width 0.125, lr 3e-3, 300 steps, seeds 0-3 and 42: 10.3 15.4 25.1 17.1 13.9 (29 CPU s)
# No setting beats gray on every seed, let alone with headroom, and the closest ones cost 30 CPU s on top of the
# GAN's (build and trace alone cost 16 CPU s, then 24 ms a step at width 0.125, 38 ms at 0.25). Its own
# objective, ab SSIM, does not separate it either (lr 1e-3: 0.41-0.50 vs 0.35 for the shared tint; lr 3e-3
# drops to 0.17 on seed 2). One cause is BatchNorm's moving statistics (momentum 0.99): after 300 steps the first
# layer's moving variance still holds 5 % of its initial 1.0 (0.049 against the batches' 0.008), and seeds 1
# and 42 score 34.8/32.1 in eval mode but 15.1/21.4 on batch statistics; 200 extra training-mode passes bring
# eval mode to 15.9/22.6, so even then it has not learned past gray. The README's dev run agrees (64 px, width
# 0.25, 25 epochs of 1,000 photos: baseline ΔE00 12.58 vs gray 12.67): it learns too slowly for a test's budget.
