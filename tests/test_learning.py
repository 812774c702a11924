"""Learning checks: a tiny pix2pix and a tiny baseline, trained for a bounded number of steps on real photos,
learn colour.

Not "it runs" but "it learns": the photos go through the project's Lab encoding (chromalab.color), the GAN
is built and compiled as the train stage builds it (training.build_for_training: U-Net + PatchGAN,
Adam(β1 = 0.5), adversarial + λ·L1), trained with `fit` (chromalab.train.gan's train step), and its predictions
are decoded and scored by chromalab.evaluate.metrics. If any link is broken (a wrong scale, a sign, a loss that
doesn't reach the generator) the model ends no closer to the truth than a gray or flat-tinted photo.
The baseline (the seed's CNN, SSIM loss, RMSprop) goes the same way, against a weaker bar: beating gray.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from chromalab.evaluate import metrics
from chromalab.color import rgb_to_lab_norm
from chromalab.config import parse_params
from chromalab.train.build import build_for_training
from chromalab.bench.samples import real_crops

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
# Fewer steps lose that headroom: at 300 and at 400 steps seed 0 ends at ΔE00 10.4 and 7.7 (colourfulness 33.5
# and 36.5), failing the bar, so STEPS stays 600.
MAX_DELTA_E_FRACTION_OF_GRAY = 0.5
# Colourfulness (Hasler & Süsstrunk) is exactly 0 for the gray floor; the truth's mean is 55.9 here and the
# model's 46.5-62.9 (seed 0: 46.5 in a later run). Half the truth's leaves the same headroom and still means
# "moderately colourful" (≥ 28).
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


def test_a_tiny_gan_learns_colour_from_real_photos(photos, trained_predictions):
    L, ab = photos
    assert_learned_colour(L, ab, trained_predictions)


# The baseline as the train stage builds it, at a test's size. Its SSIM objective scores a predicted chroma k times
# the truth's as it scores 1/k times (twice the colour costs what half costs), so it overshoots colour early on
# (colourfulness up to 140 against the truth's 56) and learns erratically. Two of its params make it learn here:
# - dropout 0: the seed's Dropout(0.5) at width 0.125 drops half of 16-64 channels each step;
# - RMSprop at 1e-2 for 300 steps, then decaying linearly to 0 over 300 more: a settled end.
BASELINE_STEPS = 600
BASELINE_EPOCHS = 2  # the rate is constant for the first, decays to 0 over the second
TINY_BASELINE = {"base": {"seed": 42, "image_size": SIZE},
                 "baseline": {"width": 0.125, "learning_rate": 1e-2, "dropout": 0.0,
                              "epochs": BASELINE_EPOCHS, "decay_epochs": "half"}}
# The bar, from measurements of this fixture (seeds 0-7 and 42, TensorFlow on 2 shared CPU cores, 14-19 CPU s
# each): ΔE00 8.6-13.2 against the gray floor's 15.9 (0.54-0.83 of it), colourfulness 54-68 (truth 55.9).
# "Below 0.9 of the gray floor" (14.35) leaves 1.2 ΔE00 of headroom on the worst seed. A flat tint can pass that
# part (the best tint shared by all photos scores 13.5, each photo's own true mean tint 7.5); the GAN's
# colourfulness bar (half the truth's) rejects the shared one (21-25). What fails the bar: the seed's
# Dropout(0.5) in this same setting (seed 2: ΔE00 29.0), dropout 0 at a constant 3e-3 (seed 2: 28.3), and a
# model the loss does not reach (rate 1e-9: 38.0, colourfulness 129). BatchNorm's moving statistics
# (momentum 0.99) are no cause here: at 0.9 the seeds end within 0.35 ΔE00 of these. The earlier setting
# (Dropout 0.5, constant 3e-3) ended at 10.4-28.3 on seeds 0-4 and 42.
# Fewer steps leave under 1 ΔE00 of headroom: at 400 (200 constant + 200 decaying) seed 1 ends at 13.75,
# at 300 seed 0 at 14.02 (bar 14.35), so BASELINE_STEPS stays 600.
MAX_BASELINE_FRACTION_OF_GRAY = 0.9


def assert_beats_gray(L: np.ndarray, true_ab: np.ndarray, pred_ab: np.ndarray) -> None:
    """The baseline's bar: closer to the truth than the gray floor by a margin, and colourful."""
    predicted = scores(L, true_ab, pred_ab)
    gray = scores(L, true_ab, metrics.gray_floor(true_ab))
    figures = (f"ΔE00 {predicted['delta_e00']:.2f} vs gray floor {gray['delta_e00']:.2f}; colourfulness "
               f"{predicted['colourfulness']:.1f} (truth {predicted['colourfulness_true']:.1f})")
    assert predicted["delta_e00"] < MAX_BASELINE_FRACTION_OF_GRAY * gray["delta_e00"], figures
    assert predicted["colourfulness"] > MIN_COLOURFULNESS_FRACTION_OF_TRUTH * predicted["colourfulness_true"], figures


@pytest.fixture(scope="module")
def baseline_predictions(photos) -> np.ndarray:
    L, ab = photos
    params = parse_params(TINY_BASELINE)
    keras.utils.set_random_seed(params.base.seed)
    steps_per_epoch = BASELINE_STEPS // BASELINE_EPOCHS
    model = build_for_training("baseline", params, SIZE, jit_compile=False, steps_per_epoch=steps_per_epoch)
    model.fit(np.tile(L, (steps_per_epoch, 1, 1, 1)), np.tile(ab, (steps_per_epoch, 1, 1, 1)),
              batch_size=N_PHOTOS, epochs=BASELINE_EPOCHS, shuffle=False, verbose=0)
    return ops.convert_to_numpy(model(L, training=False))


def ignoring_the_photo(ab: np.ndarray) -> dict[str, np.ndarray]:
    """Predictions that ignore the image content."""
    return {"gray": metrics.gray_floor(ab),
            "noise": np.random.default_rng(0).uniform(-0.3, 0.3, ab.shape).astype(np.float32),
            "flat true tint": np.broadcast_to(ab.mean(axis=(1, 2), keepdims=True), ab.shape),
            "shared tint": np.broadcast_to(ab.mean(axis=(0, 1, 2)), ab.shape)}


# The baseline's bar is weaker: each photo's own true mean tint (an oracle of its colour) passes it.
@pytest.mark.parametrize("bar, rejected", [(assert_learned_colour, ("gray", "noise", "flat true tint", "shared tint")),
                                           (assert_beats_gray, ("gray", "noise", "shared tint"))],
                         ids=["gan", "baseline"])
def test_the_bars_reject_predictions_that_ignore_the_photo(photos, bar, rejected):
    L, ab = photos
    predictions = ignoring_the_photo(ab)
    for name in rejected:
        with pytest.raises(AssertionError):
            bar(L, ab, predictions[name])


def test_the_baseline_learns_to_beat_the_gray_floor(photos, baseline_predictions):
    L, ab = photos
    assert_beats_gray(L, ab, baseline_predictions)
