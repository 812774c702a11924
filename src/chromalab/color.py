"""The one colour convention of the project: CIE Lab, normalised as in the seed.

L/100 lies in [0, 1] (model input), a/128 and b/128 in about [-1, 1] (model output, tanh).
Every module converts through these functions so that the scales live in one place.

Lab → RGB is ours, not skimage's: it runs in float32 (a 12 MP photo converts several times faster than
through skimage's float64; the difference is below ΔE00 0.01, see tests/test_color.py) and it maps
out-of-gamut colours into sRGB instead of clipping each channel on its own, which turns a brownish tint a
model over-saturated into pure cyan or magenta. The constants are skimage's (sRGB matrix, D65 white, the
7.787 linear segment), so both conversions agree.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
from skimage import color as skcolor
from skimage.color import colorconv

L_SCALE = 100.0
AB_SCALE = 128.0

# Linear RGB from the white-normalised (X/Xn, Y, Z/Zn): skimage's XYZ → sRGB matrix with D65 folded in.
# Its rows sum to 1 within 1e-4; we write R = Y + m_rx (X/Xn - Y) + m_rz (Z/Zn - Y), which makes them sum
# to exactly 1, so neutral Lab (a = b = 0) comes back exactly gray (R = G = B = Y) in any precision.
_D65 = np.asarray(skcolor.xyz_tristimulus_values(illuminant="D65", observer="2"), dtype=np.float64)
_RGB_FROM_XYZ_N = colorconv.rgb_from_xyz * _D65[None, :]
_M_X = tuple(np.float32(v) for v in _RGB_FROM_XYZ_N[:, 0])
_M_Z = tuple(np.float32(v) for v in _RGB_FROM_XYZ_N[:, 2])
_F_KNEE = np.float32(0.2068966)  # 6/29, as skimage writes it
_F_SLOPE = np.float32(7.787)
_Y_KNEE = np.float32(0.008856)  # (6/29)³
_GAMMA_KNEE = np.float32(0.0031308)

# A linear-RGB value counts as out of gamut only if clipping it moves it by more than one 8-bit sRGB code
# step: below -1/255 / 12.92 or above 1 + (1 - decode(1 - 1/255)). Smaller excursions are rounding, not
# colour: the training records store Lab as float16, which alone puts saturated sRGB colours up to 0.95 of
# a step outside; clipping them is invisible.
GAMUT_LOW = -1.0 / 255.0 / 12.92
GAMUT_HIGH = 2.0 - ((1.0 - 1.0 / 255.0 + 0.055) / 1.055) ** 2.4
# Bisection on the chroma factor: 2^-12 leaves the mapped chroma within 0.045 Lab units of the sRGB
# boundary for the most saturated predictions (|ab| ≤ 181): far below a visible ΔE.
GAMUT_STEPS = 12
CHUNK_PIXELS = 1 << 15
RGB8_TABLE_BITS = 20  # linear → 8-bit sRGB table: cells of 2^-20, at most 0.003 of a code step wide


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


@functools.cache
def _srgb_decode_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.float64) / 255.0
    return np.where(codes > 0.04045, ((codes + 0.055) / 1.055) ** 2.4, codes / 12.92).astype(np.float32)


def rgb8_lightness_norm(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] → L/100 float32 [...]: the lightness alone, in float32 (for full-size photos)."""
    decode = _srgb_decode_table()
    y_row = colorconv.xyz_from_rgb[1].astype(np.float32)
    y = decode[rgb[..., 0]] * y_row[0]
    y += decode[rgb[..., 1]] * y_row[1]
    y += decode[rgb[..., 2]] * y_row[2]
    # f(y) = cbrt(y) above the knee, 7.787 y + 16/116 below, written branch-free (see _f_inverse)
    f = np.power(np.maximum(y, _Y_KNEE), np.float32(1.0 / 3.0))
    f += (np.minimum(y, _Y_KNEE) - _Y_KNEE) * _F_SLOPE
    f *= np.float32(1.16)
    f -= np.float32(0.16)
    return f


def _f_inverse(t: np.ndarray) -> np.ndarray:
    """t³ above the knee, (t - 16/116) / 7.787 below. That line is the cube's tangent at the knee, so
    max(t, k)³ + (min(t, k) - k) / 7.787 is the same function without np.where, which is ~10x slower."""
    k = np.maximum(t, _F_KNEE)
    out = k * k
    out *= k
    k = np.minimum(t, _F_KNEE, out=k)
    k -= _F_KNEE
    k *= np.float32(1.0 / 7.787)
    out += k
    return out


def _linear_rgb(l_lab: np.ndarray, a_lab: np.ndarray, b_lab: np.ndarray) -> list[np.ndarray]:
    """Lab (real units, float32 arrays of one shape) → linear R, G, B planes, unclipped."""
    fy = l_lab + np.float32(16.0)
    fy *= np.float32(1.0 / 116.0)
    y = _f_inverse(fy)
    dx = _f_inverse(a_lab * np.float32(1.0 / 500.0) + fy)
    dx -= y
    dz = _f_inverse(b_lab * np.float32(-1.0 / 200.0) + fy)
    dz -= y
    planes = []
    for m_x, m_z in zip(_M_X, _M_Z):
        plane = dx * m_x
        plane += y
        plane += dz * m_z
        planes.append(plane)
    return planes


def _outside(planes: list[np.ndarray], low_bound: float = GAMUT_LOW, high_bound: float = GAMUT_HIGH) -> np.ndarray:
    red, green, blue = planes
    low = np.minimum(red, green)
    high = np.maximum(red, green)
    return (np.minimum(low, blue, out=low) < low_bound) | (np.maximum(high, blue, out=high) > high_bound)


def _flat_lab(l_norm: np.ndarray, ab_norm: np.ndarray) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """Normalised L [...] or [..., 1] and ab [..., 2] → (pixel shape, L [N], ab [N, 2]), float32."""
    l_norm = np.asarray(l_norm, dtype=np.float32)
    ab_norm = np.asarray(ab_norm, dtype=np.float32)
    if l_norm.ndim == ab_norm.ndim:
        l_norm = l_norm[..., 0]
    if l_norm.shape != ab_norm.shape[:-1] or ab_norm.shape[-1] != 2:
        raise ValueError(f"L {l_norm.shape} and ab {ab_norm.shape} do not match: expected [..., H, W] "
                         "(or [..., H, W, 1]) and [..., H, W, 2]")
    return l_norm.shape, l_norm.reshape(-1), ab_norm.reshape(-1, 2)


def _chunks(count: int) -> Iterator[slice]:
    # Small chunks keep every temporary in the CPU cache (and out of mmap'd fresh pages): 3-5x faster
    # per pixel than whole-megapixel arrays.
    for start in range(0, count, CHUNK_PIXELS):
        yield slice(start, start + CHUNK_PIXELS)


def _split_lab(l_norm: np.ndarray, ab_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat normalised L [N] and ab [N, 2] → L, a, b in real Lab units. L is clamped to [0, 100]: beyond it
    no colour, not even gray, is displayable."""
    l_lab = np.clip(l_norm * np.float32(L_SCALE), np.float32(0.0), np.float32(L_SCALE))
    return l_lab, ab_norm[:, 0] * np.float32(AB_SCALE), ab_norm[:, 1] * np.float32(AB_SCALE)


def out_of_gamut(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """Per pixel: does this normalised Lab colour lie outside sRGB? Decided in linear RGB before any
    clipping, with a tolerance of one 8-bit step (GAMUT_LOW/GAMUT_HIGH). Shape: L's, without a channel."""
    shape, l_flat, ab_flat = _flat_lab(l_norm, ab_norm)
    out = np.empty(l_flat.shape, dtype=bool)
    for part in _chunks(len(l_flat)):
        out[part] = _outside(_linear_rgb(*_split_lab(l_flat[part], ab_flat[part])))
    return out.reshape(shape)


def _chroma_scale(l_lab: np.ndarray, a_lab: np.ndarray, b_lab: np.ndarray) -> np.ndarray:
    """For out-of-gamut colours (1-D arrays): the largest factor s on their ab, to 2^-GAMUT_STEPS, that
    keeps them inside sRGB's boundary itself (no tolerance: clipping then moves them by float noise only,
    so L and hue stay as mapped). Bisection from s = 0, their gray (in gamut for L in [0, 100]): each step tries
    s + half the last step and keeps it where that is still in gamut, so s never leaves the gamut."""
    scale = np.zeros(l_lab.shape, dtype=np.float32)
    for step in range(1, GAMUT_STEPS + 1):
        size = np.float32(2.0**-step)
        trial = scale + size
        scale += size * ~_outside(_linear_rgb(l_lab, a_lab * trial, b_lab * trial), 0.0, 1.0)
    return scale


def _to_rgb(l_norm: np.ndarray, ab_norm: np.ndarray, encode, dtype) -> np.ndarray:
    """Lab → gamut-mapped RGB [..., 3], each clipped linear plane written through `encode`.

    In-gamut colours are only clipped (by at most one code step); an out-of-gamut colour keeps its L and
    hue angle and loses just enough chroma to fit sRGB. Those are gathered from all chunks first and
    bisected together: per chunk they are few, and numpy's per-call cost would dominate."""
    shape, l_flat, ab_flat = _flat_lab(l_norm, ab_norm)
    out = np.empty((len(l_flat), 3), dtype=dtype)
    outside_rows = []
    for part in _chunks(len(l_flat)):
        planes = _linear_rgb(*_split_lab(l_flat[part], ab_flat[part]))
        outside = _outside(planes)
        if outside.any():
            outside_rows.append(np.flatnonzero(outside) + part.start)
        for channel, plane in enumerate(planes):
            out[part, channel] = encode(np.clip(plane, np.float32(0.0), np.float32(1.0), out=plane))
    rows = np.concatenate(outside_rows) if outside_rows else np.empty(0, dtype=np.intp)
    for part in _chunks(len(rows)):
        l_lab, a_lab, b_lab = _split_lab(l_flat[rows[part]], ab_flat[rows[part]])
        scale = _chroma_scale(l_lab, a_lab, b_lab)
        for channel, plane in enumerate(_linear_rgb(l_lab, a_lab * scale, b_lab * scale)):
            out[rows[part], channel] = encode(np.clip(plane, np.float32(0.0), np.float32(1.0), out=plane))
    return out.reshape(*shape, 3)


def gamut_mapped_ab(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """The normalised ab [..., 2] that `lab_norm_to_rgb` displays: out-of-gamut colours with their chroma
    reduced into sRGB, in-gamut ones unchanged. (For tests and reports; conversions need not call it.)"""
    shape, l_flat, ab_flat = _flat_lab(l_norm, ab_norm)
    ab = ab_flat.copy()
    outside = out_of_gamut(l_flat, ab_flat)
    if outside.any():
        ab[outside] *= _chroma_scale(*_split_lab(l_flat[outside], ab_flat[outside]))[:, None]
    return ab.reshape(*shape, 2)


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear [0, 1] → sRGB-encoded [0, 1], float32: 1.055 v^(1/2.4) - 0.055 above 0.0031308, 12.92 v
    below; branch-free as in _f_inverse (the line meets the curve there to 1e-7)."""
    encoded = np.power(np.maximum(linear, _GAMMA_KNEE), np.float32(1.0 / 2.4))
    encoded *= np.float32(1.055)
    encoded -= np.float32(0.055)
    below = np.minimum(linear, _GAMMA_KNEE)
    below -= _GAMMA_KNEE
    below *= np.float32(12.92)
    encoded += below
    return np.clip(encoded, np.float32(0.0), np.float32(1.0), out=encoded)  # the knee's 1e-7 mismatch


@functools.cache
def _srgb8_table() -> np.ndarray:
    """8-bit sRGB code of each 2^-RGB8_TABLE_BITS cell of linear [0, 1] (taken at the cell's centre)."""
    cells = 1 << RGB8_TABLE_BITS
    centres = (np.arange(cells + 1, dtype=np.float64) + 0.5) / cells
    encoded = np.where(centres > 0.0031308, 1.055 * np.minimum(centres, 1.0) ** (1 / 2.4) - 0.055, 12.92 * centres)
    return np.rint(encoded * 255.0).astype(np.uint8)


def _srgb8_encode(linear: np.ndarray) -> np.ndarray:
    linear *= np.float32(1 << RGB8_TABLE_BITS)
    return np.take(_srgb8_table(), linear.astype(np.int32))


def lab_norm_to_rgb(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """Normalised L [..., H, W] or [..., H, W, 1] and ab [..., H, W, 2] → RGB float32 in [0, 1], gamut-mapped."""
    return _to_rgb(l_norm, ab_norm, _srgb_encode, np.float32)


def lab_norm_to_rgb8(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """As `lab_norm_to_rgb`, straight to uint8 through a table (for full-size photos): the same codes as
    rounding `lab_norm_to_rgb(...) * 255`, except at most one step off on rare exact rounding boundaries."""
    return _to_rgb(l_norm, ab_norm, _srgb8_encode, np.uint8)


def mean_chroma(rgb: np.ndarray) -> float:
    """Mean Lab chroma sqrt(a²+b²) in Lab units: ~0 for gray photos, 10-30 for colour photos."""
    lab = skcolor.rgb2lab(to_float_rgb(rgb[..., :3]))
    return float(np.hypot(lab[..., 1], lab[..., 2]).mean())
