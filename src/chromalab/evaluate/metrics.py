"""Colour metrics for one photo: a predicted ab map against the true one, sharing the photo's L.

RGB SSIM/MSE/PSNR barely separate a good colorizer from one that predicts no colour at all (ab = 0 already
scores RGB SSIM ≈ 0.9), so beside them we report metrics on the ab channels themselves, the mean CIEDE2000
colour difference and colourfulness; evaluation puts `gray_floor` (ab = 0) next to every model for scale.

Keys of `photo_metrics` (all floats):
  ab_ssim, ab_mse, ab_mae          on ab as the models output them (a/128, b/128, ~[-1, 1])
  rgb_ssim, rgb_mse, rgb_mae       on RGB in [0, 1], both images decoded from the same L
  rgb_psnr                         dB, capped at PSNR_CAP_DB (see there)
  delta_e00                        mean CIEDE2000 between true and predicted Lab (Lab units; chromalab.color
                                   holds the rule, which training also uses to choose its checkpoint)
  colourfulness                    Hasler & Süsstrunk (2003) of the prediction, on 0-255 RGB
  colourfulness_true               the same for the true photo
  colourfulness_gap                colourfulness - colourfulness_true (< 0: the prediction is too dull)
  out_of_gamut                     share of the prediction's pixels outside sRGB before gamut mapping
  edge_chroma_gap                  mean chroma (Lab units) of the prediction's rightmost EDGE_FRACTION of
                                   columns minus its leftmost: a one-sided edge artefact shows here
  edge_chroma_gap_true             the same for the true photo, for scale
  face_cool_cast                   share of the centre half's pixels (a portrait's face) whose truth is warm
                                   (a*, b* >= 0, as skin is) painted cool (a* or b* < -COOL_MARGIN: green,
                                   cyan, blue or purple): issue 24's blue and green patches on faces

Every function takes one image [H, W, C]; `colourfulness` and `delta_e00` also take batches [..., H, W, C].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real

import numpy as np
from skimage.metrics import structural_similarity

from chromalab.color import AB_SCALE, delta_e00, lab_from_norm, lab_norm_to_rgb, out_of_gamut, to_float_rgb
from chromalab.errors import ChromalabError

AB_DATA_RANGE = 2.0  # ab/128 spans [-1, 1] (the models' tanh output)
RGB_DATA_RANGE = 1.0
# A predicted image identical to the truth has MSE 0 and PSNR +inf, which would make every mean infinite.
# Saved at 8 bits, any two images whose difference is below the quantisation noise of ±0.5 LSB
# (MSE = (1/255)² / 12) are indistinguishable, so PSNR is capped at that noise level: ≈ 58.9 dB.
PSNR_CAP_DB = 10.0 * math.log10(12.0 * 255.0**2)
EDGE_FRACTION = 10 / 64  # issue 11 measured the baseline's edge artefact on 10 columns of 64
COOL_MARGIN = 5.0  # Lab units: skin has a*, b* > 0; a face this far out of that quadrant shows on a sheet

METRIC_KEYS = (
    "ab_ssim", "ab_mse", "ab_mae",
    "rgb_ssim", "rgb_mse", "rgb_mae", "rgb_psnr",
    "delta_e00",
    "colourfulness", "colourfulness_true", "colourfulness_gap",
    "out_of_gamut", "edge_chroma_gap", "edge_chroma_gap_true", "face_cool_cast",
)


def ssim(image_a: np.ndarray, image_b: np.ndarray, data_range: float) -> float:
    """Mean SSIM of two [H, W, C] images, channels averaged.

    Gaussian 11-tap window (σ = 1.5) and population covariance: the definition of Wang et al. (2004)
    that `tf.image.ssim` and the Keras SSIM loss use, so validation and evaluation numbers agree.
    """
    return float(structural_similarity(
        np.asarray(image_a, dtype=np.float64), np.asarray(image_b, dtype=np.float64),
        data_range=data_range, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    ))


def mse(image_a: np.ndarray, image_b: np.ndarray) -> float:
    diff = np.asarray(image_a, dtype=np.float64) - np.asarray(image_b, dtype=np.float64)
    return float(np.mean(diff * diff))


def mae(image_a: np.ndarray, image_b: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(image_a, dtype=np.float64) - np.asarray(image_b, dtype=np.float64))))


def psnr_from_mse(mse_value: float, data_range: float = RGB_DATA_RANGE) -> float:
    """PSNR in dB, capped at PSNR_CAP_DB so identical images give a finite, averageable value."""
    if mse_value <= 0.0:
        return PSNR_CAP_DB
    return min(10.0 * math.log10(data_range**2 / mse_value), PSNR_CAP_DB)


def colourfulness(rgb: np.ndarray) -> float | np.ndarray:
    """Hasler & Süsstrunk (2003) colourfulness of RGB [..., H, W, 3] (uint8, uint16 or float in [0, 1]).

    On the 0-255 scale of the paper: rg = R - G, yb = (R + G)/2 - B, M = σ_rgyb + 0.3 μ_rgyb with
    σ_rgyb = sqrt(σ_rg² + σ_yb²) and μ_rgyb = sqrt(μ_rg² + μ_yb²). Exactly 0 for any gray image;
    about 15 is "slightly colourful", 33 "moderately", 59 "quite", 82 "highly" (the paper's scale).
    """
    rgb = to_float_rgb(np.asarray(rgb)[..., :3]) * 255.0
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    pixels = (-2, -1)
    sigma = np.hypot(rg.std(axis=pixels), yb.std(axis=pixels))
    mu = np.hypot(rg.mean(axis=pixels), yb.mean(axis=pixels))
    value = sigma + 0.3 * mu
    return float(value) if np.ndim(value) == 0 else value


def edge_chroma_gap(ab_norm: np.ndarray) -> float:
    """Mean chroma sqrt(a² + b²) in Lab units of the rightmost EDGE_FRACTION of columns of ab [H, W, 2]
    minus that of the leftmost: about 0 for a photo, large for a model that paints one edge."""
    ab = np.asarray(ab_norm, dtype=np.float64) * AB_SCALE
    chroma = np.hypot(ab[..., 0], ab[..., 1])
    cols = max(1, round(chroma.shape[-1] * EDGE_FRACTION))
    return float(chroma[..., -cols:].mean() - chroma[..., :cols].mean())


def face_cool_cast(true_ab_norm: np.ndarray, pred_ab_norm: np.ndarray) -> float:
    """Share of the centre half's pixels (rows and columns S/4..3S/4, where a portrait crop has its face)
    whose truth is warm (a* >= 0 and b* >= 0) and which the prediction paints cool (a* or b* below
    -COOL_MARGIN): 0 for the gray floor and for the truth."""
    size = true_ab_norm.shape[0]
    centre = slice(size // 4, size - size // 4)
    true_ab = np.asarray(true_ab_norm, dtype=np.float64)[centre, centre] * AB_SCALE
    pred_ab = np.asarray(pred_ab_norm, dtype=np.float64)[centre, centre] * AB_SCALE
    warm = (true_ab >= 0.0).all(axis=-1)
    cool = (pred_ab < -COOL_MARGIN).any(axis=-1)
    return float(np.mean(warm & cool))


def gray_floor(true_ab: np.ndarray) -> np.ndarray:
    """The 'no colour' prediction (ab = 0) every model must beat."""
    return np.zeros_like(true_ab)


def photo_metrics(l_norm: np.ndarray, true_ab: np.ndarray, pred_ab: np.ndarray) -> dict[str, float]:
    """All metrics of one photo: normalised L [S, S] or [S, S, 1], true and predicted ab [S, S, 2].

    ΔE00 is computed on the Lab values themselves (the prediction before any gamut clipping); the RGB
    metrics on the displayed images, which `lab_norm_to_rgb` maps into gamut.
    """
    l_norm = np.asarray(l_norm, dtype=np.float64)
    if l_norm.ndim == 3:
        l_norm = l_norm[..., 0]
    true_ab = np.asarray(true_ab, dtype=np.float64)
    pred_ab = np.asarray(pred_ab, dtype=np.float64)
    if l_norm.shape != true_ab.shape[:-1] or true_ab.shape != pred_ab.shape or true_ab.shape[-1] != 2:
        raise ValueError(f"photo_metrics: L {l_norm.shape}, true ab {true_ab.shape} and predicted ab "
                         f"{pred_ab.shape} must be [S, S], [S, S, 2], [S, S, 2]")
    true_rgb = lab_norm_to_rgb(l_norm, true_ab)
    pred_rgb = lab_norm_to_rgb(l_norm, pred_ab)
    rgb_mse = mse(true_rgb, pred_rgb)
    pred_colourfulness = colourfulness(pred_rgb)
    true_colourfulness = colourfulness(true_rgb)
    return {
        "ab_ssim": ssim(true_ab, pred_ab, AB_DATA_RANGE),
        "ab_mse": mse(true_ab, pred_ab),
        "ab_mae": mae(true_ab, pred_ab),
        "rgb_ssim": ssim(true_rgb, pred_rgb, RGB_DATA_RANGE),
        "rgb_mse": rgb_mse,
        "rgb_mae": mae(true_rgb, pred_rgb),
        "rgb_psnr": psnr_from_mse(rgb_mse),
        "delta_e00": delta_e00(lab_from_norm(l_norm, true_ab), lab_from_norm(l_norm, pred_ab)),
        "colourfulness": pred_colourfulness,
        "colourfulness_true": true_colourfulness,
        "colourfulness_gap": pred_colourfulness - true_colourfulness,
        "out_of_gamut": float(out_of_gamut(l_norm, pred_ab).mean()),
        "edge_chroma_gap": edge_chroma_gap(pred_ab),
        "edge_chroma_gap_true": edge_chroma_gap(true_ab),
        "face_cool_cast": face_cool_cast(true_ab, pred_ab),
    }


def summarise(rows: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Mean of every numeric column over the photos, plus `count`; text columns (ids, names) are ignored.

    PSNR needs no special case: `photo_metrics` caps it, so every mean is finite.
    """
    rows = list(rows)
    if not rows:
        raise ChromalabError("no photos to summarise: the test split is empty; check data/tfrecords")
    columns = [key for key, value in rows[0].items()
               if isinstance(value, Real) and not isinstance(value, bool)]
    summary = {key: float(np.mean([float(row[key]) for row in rows])) for key in columns}
    summary["count"] = len(rows)
    return summary
