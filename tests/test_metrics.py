"""chromalab.evaluate.metrics against scikit-image, TensorFlow and hand-computed values on known images."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage import color as skcolor
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from chromalab.evaluate import metrics
from chromalab.color import rgb_to_lab_norm
from chromalab.errors import ChromalabError
from chromalab.bench.samples import real_crops

SIZE = 48


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Normalised Lab of real colour photos [N, S, S, 3]."""
    return np.stack([rgb_to_lab_norm(rgb) for rgb in real_crops(4, SIZE, seed=3)])


def _split(lab_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return lab_norm[..., :1], lab_norm[..., 1:]


def test_keys_are_the_documented_labels(photos):
    l_norm, true_ab = _split(photos[0])
    row = metrics.photo_metrics(l_norm, true_ab, true_ab * 0.5)
    assert list(row) == list(metrics.METRIC_KEYS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())


def test_l_may_come_with_or_without_its_channel_axis(photos):
    l_norm, true_ab = _split(photos[1])
    pred = true_ab[::-1]
    assert metrics.photo_metrics(l_norm, true_ab, pred) == metrics.photo_metrics(l_norm[..., 0], true_ab, pred)


def test_mismatched_shapes_are_rejected(photos):
    l_norm, true_ab = _split(photos[0])
    with pytest.raises(ValueError, match="must be"):
        metrics.photo_metrics(l_norm, true_ab, true_ab[:-1])


def test_colourfulness_is_exactly_zero_for_any_gray_image():
    rng = np.random.default_rng(0)
    gray = rng.random((2, 20, 30, 1))
    assert np.all(metrics.colourfulness(np.repeat(gray, 3, axis=-1)) == 0.0)
    levels = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    assert metrics.colourfulness(np.repeat(levels, 3, axis=-1)) == 0.0


def test_colourfulness_of_a_red_and_blue_image_by_hand():
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[:, :5] = (255, 0, 0)
    rgb[:, 5:] = (0, 0, 255)
    # red: rg = 255, yb = 127.5; blue: rg = 0, yb = -255; half the pixels each.
    sigma_rg, sigma_yb = 255 / 2, (127.5 + 255) / 2
    mu_rg, mu_yb = 255 / 2, (127.5 - 255) / 2
    expected = math.hypot(sigma_rg, sigma_yb) + 0.3 * math.hypot(mu_rg, mu_yb)
    assert metrics.colourfulness(rgb) == pytest.approx(expected, rel=1e-12)
    assert metrics.colourfulness(rgb.astype(np.float64) / 255) == pytest.approx(expected, rel=1e-12)


def test_colourfulness_and_delta_e_are_vectorised(photos):
    rgb = np.stack([skcolor.lab2rgb(p * [100, 128, 128]) for p in photos])
    batch = metrics.colourfulness(rgb)
    assert batch.shape == (len(photos),)
    np.testing.assert_allclose(batch, [metrics.colourfulness(img) for img in rgb], rtol=1e-12)
    lab = photos * [100, 128, 128]
    shifted = lab + [0, 3, -2]
    np.testing.assert_allclose(metrics.delta_e00(lab, shifted),
                               [metrics.delta_e00(a, b) for a, b in zip(lab, shifted)], rtol=1e-12)


def test_delta_e00_is_zero_for_identical_and_matches_skimage(photos):
    lab = photos[0] * [100, 128, 128]
    assert metrics.delta_e00(lab, lab) == 0.0
    other = photos[1] * [100, 128, 128]
    assert metrics.delta_e00(lab, other) == pytest.approx(skcolor.deltaE_ciede2000(lab, other).mean())
    assert metrics.delta_e00(lab, other) > 1.0


def test_psnr_of_a_known_mse_and_skimage_agreement():
    assert metrics.psnr_from_mse(0.01) == pytest.approx(20.0)
    assert metrics.psnr_from_mse(1e-4) == pytest.approx(40.0)
    rng = np.random.default_rng(1)
    a = rng.random((16, 16, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert metrics.psnr_from_mse(metrics.mse(a, b)) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0))


def test_identical_images_give_the_capped_psnr_not_infinity(photos):
    l_norm, true_ab = _split(photos[2])
    row = metrics.photo_metrics(l_norm, true_ab, true_ab.copy())
    assert row["rgb_psnr"] == metrics.PSNR_CAP_DB == pytest.approx(58.92, abs=0.01)
    assert row["ab_mse"] == row["ab_mae"] == row["rgb_mse"] == row["delta_e00"] == row["colourfulness_gap"] == 0.0
    assert row["ab_ssim"] == pytest.approx(1.0) and row["rgb_ssim"] == pytest.approx(1.0)


def test_ssim_is_skimages_gaussian_definition(photos):
    l_norm, true_ab = _split(photos[0])
    _, pred_ab = _split(photos[1])
    row = metrics.photo_metrics(l_norm, true_ab, pred_ab)
    expected = structural_similarity(true_ab.astype(np.float64), pred_ab.astype(np.float64), data_range=2,
                                     channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert row["ab_ssim"] == pytest.approx(expected, rel=1e-12)
    # A different window (skimage's default 7x7 uniform) gives a different number: the settings matter.
    assert structural_similarity(true_ab, pred_ab, data_range=2, channel_axis=-1) != pytest.approx(expected)


def test_ssim_agrees_with_tensorflow_ssim_used_by_the_keras_loss(photos):
    tf = pytest.importorskip("tensorflow")
    _, true_ab = _split(photos[0])
    _, pred_ab = _split(photos[3])
    expected = float(tf.image.ssim(tf.constant(true_ab[None]), tf.constant(pred_ab[None]), max_val=2.0)[0])
    assert metrics.ssim(true_ab, pred_ab, data_range=2.0) == pytest.approx(expected, abs=1e-4)


def test_gray_floor_is_exactly_no_colour(photos):
    l_norm, true_ab = _split(photos[0])
    floor = metrics.gray_floor(true_ab)
    assert floor.shape == true_ab.shape and floor.dtype == true_ab.dtype and not floor.any()
    row = metrics.photo_metrics(l_norm, true_ab, floor)
    # lab2rgb maps ab = 0 to gray up to float round-off (thousandths of a 0-255 level).
    assert row["colourfulness"] == pytest.approx(0.0, abs=0.01)
    assert row["colourfulness_gap"] == pytest.approx(-row["colourfulness_true"], abs=0.01)
    assert row["ab_mse"] == pytest.approx(float(np.mean(true_ab.astype(np.float64) ** 2)))
    # The reason the floor is reported at all: RGB SSIM is high although there is no colour.
    assert row["rgb_ssim"] > 0.8 and row["delta_e00"] > 1.0


def test_a_better_prediction_scores_better_on_every_error_metric(photos):
    l_norm, true_ab = _split(photos[1])
    close = metrics.photo_metrics(l_norm, true_ab, true_ab * 0.9)
    floor = metrics.photo_metrics(l_norm, true_ab, metrics.gray_floor(true_ab))
    for key in ("ab_mse", "ab_mae", "rgb_mse", "rgb_mae", "delta_e00"):
        assert close[key] < floor[key], key
    for key in ("ab_ssim", "rgb_ssim", "rgb_psnr"):
        assert close[key] > floor[key], key


def test_summarise_means_numeric_columns_and_counts(photos):
    rows = []
    for i, lab in enumerate(photos):
        l_norm, true_ab = _split(lab)
        rows.append({"photo_id": f"p{i}", "model": "gray_floor",
                     **metrics.photo_metrics(l_norm, true_ab, metrics.gray_floor(true_ab))})
    summary = metrics.summarise(rows)
    assert summary["count"] == len(photos)
    assert set(summary) == {*metrics.METRIC_KEYS, "count"}
    assert summary["delta_e00"] == pytest.approx(np.mean([r["delta_e00"] for r in rows]))
    with pytest.raises(ChromalabError):
        metrics.summarise([])


def test_face_cool_cast_counts_green_or_blue_paint_on_warm_centre_pixels_only():
    size = 64
    true_ab = np.zeros((size, size, 2))
    true_ab[...] = (15 / 128, 20 / 128)  # warm, as skin, everywhere
    pred_ab = true_ab.copy()
    # In the centre half (32x32 = 1024 pixels): an 8x8 blue patch and a 4x8 green one; a corner patch is
    # outside the face and not counted.
    pred_ab[20:28, 20:28] = (5 / 128, -10 / 128)
    pred_ab[36:40, 20:28] = (-10 / 128, 10 / 128)
    pred_ab[:8, :8] = (0, -10 / 128)
    assert metrics.face_cool_cast(true_ab, pred_ab) == pytest.approx(96 / 1024)
    assert metrics.photo_metrics(np.full((size, size), 0.5), true_ab, pred_ab)["face_cool_cast"] == \
        pytest.approx(96 / 1024)
    # Blue where the truth is blue too (a blue shirt) is right, not a cast; slightly cool is not a cast.
    true_ab[20:28, 20:28] = (0, -10 / 128)
    assert metrics.face_cool_cast(true_ab, pred_ab) == pytest.approx(32 / 1024)
    assert metrics.face_cool_cast(np.zeros_like(true_ab), np.full_like(true_ab, -4 / 128)) == 0.0


def test_edge_chroma_gap_is_the_right_edges_chroma_less_the_left_edges():
    size = 64  # EDGE_FRACTION of 64 columns: 10 on each side
    ab = np.zeros((size, size, 2))
    ab[:, -10:] = (30 / 128, 40 / 128)  # a saturated strip down the right edge: chroma 50
    ab[:, 10:-10] = (60 / 128, 0)  # the middle is not an edge, however colourful
    assert metrics.edge_chroma_gap(ab) == pytest.approx(50.0)
    assert metrics.edge_chroma_gap(ab[:, ::-1]) == pytest.approx(-50.0)  # the strip on the left
    scored = metrics.photo_metrics(np.full((size, size), 0.5), np.zeros_like(ab), ab)  # the prediction's gap
    assert (scored["edge_chroma_gap"], scored["edge_chroma_gap_true"]) == (pytest.approx(50.0), 0.0)
    ab[:, :10] = (0, -50 / 128)  # as colourful on both edges: no gap
    assert metrics.edge_chroma_gap(ab) == pytest.approx(0.0)


def test_rgb_metrics_are_scikit_images_on_the_decoded_photos(photos):
    """rgb_* compare the two photos as shown (skimage's Lab → sRGB of the shared L with each ab), on [0, 1]."""
    l_norm, true_ab = _split(photos[0])
    pred_ab = true_ab * 0.6  # a duller prediction, in gamut as the truth is
    lab = np.concatenate([l_norm * 100, true_ab * 128], -1).astype(np.float64)
    true_rgb = skcolor.lab2rgb(lab)
    pred_rgb = skcolor.lab2rgb(np.concatenate([lab[..., :1], pred_ab * 128], -1))
    row = metrics.photo_metrics(l_norm, true_ab, pred_ab)
    assert row["rgb_mse"] == pytest.approx(np.mean((true_rgb - pred_rgb) ** 2), rel=1e-2)
    assert row["rgb_mae"] == pytest.approx(np.mean(np.abs(true_rgb - pred_rgb)), rel=1e-2)
    assert row["rgb_psnr"] == pytest.approx(peak_signal_noise_ratio(true_rgb, pred_rgb, data_range=1.0), abs=0.05)
    expected_ssim = structural_similarity(true_rgb, pred_rgb, data_range=1.0, channel_axis=-1,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert row["rgb_ssim"] == pytest.approx(expected_ssim, abs=1e-3)


def test_out_of_gamut_is_the_share_of_the_predictions_pixels_outside_srgb():
    size = 24
    l_norm, gray = np.full((size, size), 0.5), np.zeros((size, size, 2))
    wild = gray.copy()
    wild[:6, :8] = (0.9, -0.9)  # Lab (50, 115, -115): far outside sRGB; 48 of 576 pixels
    assert metrics.photo_metrics(l_norm, gray, wild)["out_of_gamut"] == pytest.approx(48 / 576)
    assert metrics.photo_metrics(l_norm, wild, gray)["out_of_gamut"] == 0.0  # the truth's gamut is not scored


def test_psnr_is_capped_for_differences_below_8_bit_quantisation():
    assert metrics.psnr_from_mse(1e-9) == metrics.PSNR_CAP_DB  # 90 dB uncapped
    assert metrics.psnr_from_mse(10 ** -5.8) == pytest.approx(58.0)  # just under the cap: uncapped
