"""The one colour convention of the project: CIE Lab, normalised as in the seed.

L/100 lies in [0, 1] (model input), a/128 and b/128 in about [-1, 1] (model output, tanh).
Every module converts through these functions so that the scales live in one place.
"""

from __future__ import annotations

import warnings

import numpy as np
from skimage import color as skcolor

L_SCALE = 100.0
AB_SCALE = 128.0


def to_float_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8/uint16/float RGB → float64 in [0, 1] (what skimage's converters expect)."""
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float64) / 255.0
    if rgb.dtype == np.uint16:
        return rgb.astype(np.float64) / 65535.0
    return np.clip(rgb.astype(np.float64), 0.0, 1.0)


def rgb_to_lab_norm(rgb: np.ndarray) -> np.ndarray:
    """RGB [..., H, W, 3] → normalised Lab float32: (L/100, a/128, b/128)."""
    lab = skcolor.rgb2lab(to_float_rgb(rgb))
    return (lab / np.array([L_SCALE, AB_SCALE, AB_SCALE])).astype(np.float32)


def lab_norm_to_rgb(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """Normalised L [..., H, W] or [..., H, W, 1] and ab [..., H, W, 2] → RGB float in [0, 1]."""
    l_norm = np.asarray(l_norm, dtype=np.float64)
    if l_norm.ndim == np.ndim(ab_norm):
        l_norm = l_norm[..., 0]
    lab = np.concatenate(
        [l_norm[..., None] * L_SCALE, np.asarray(ab_norm, dtype=np.float64) * AB_SCALE], axis=-1
    )
    with warnings.catch_warnings():
        # Predicted colours outside the sRGB gamut are clipped by design (below); skimage warns each time.
        warnings.filterwarnings("ignore", message="Conversion from CIE-LAB", category=UserWarning)
        rgb = skcolor.lab2rgb(lab)
    # skimage's XYZ→RGB matrix is exact only to ~1e-7, so neutral Lab (a = b = 0) would come back with
    # R, G, B a hair apart; make it exactly gray so that "no colour" measures as no colour.
    neutral = (lab[..., 1] == 0) & (lab[..., 2] == 0)
    if neutral.any():
        rgb[neutral] = rgb[neutral].mean(axis=-1, keepdims=True)
    # Out-of-gamut Lab (a model may predict any ab) is clipped, not an error.
    return np.clip(rgb, 0.0, 1.0)


def mean_chroma(rgb: np.ndarray) -> float:
    """Mean Lab chroma sqrt(a²+b²) in Lab units: ~0 for gray photos, 10-30 for colour photos."""
    lab = skcolor.rgb2lab(to_float_rgb(rgb[..., :3]))
    return float(np.hypot(lab[..., 1], lab[..., 2]).mean())
