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
from collections.abc import Callable, Iterator

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
RGB8_MANTISSA_BITS = 15  # linear → 8-bit sRGB table: a float32's top 24 bits (4 M cells)

AbSource = Callable[[slice, np.ndarray, np.ndarray], None]  # (pixels, a/128 out, b/128 out)
Encoder = Callable[..., None]  # (linear RGB [3, N], destination [3, N], scratch or None)


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


class _Scratch:
    """Float32 work arrays for `size` pixels, reused from chunk to chunk: the conversion is some sixty numpy
    operations per pixel, and a fresh array for each would cost as much again as the arithmetic."""

    def __init__(self, size: int):
        self.size = size
        self._arrays = np.empty((8, size), dtype=np.float32)
        self._index = np.empty((3, size), dtype=np.int32)

    def planes(self, count: int) -> tuple[np.ndarray, ...]:
        """(a, b, y, x, z, rgb [3, count]) for `count` pixels: a and b are the caller's, the rest _linear_rgb's."""
        return (*(array[:count] for array in self._arrays[:5]), self._arrays[5:, :count])

    def index(self, count: int) -> np.ndarray:
        return self._index[:, :count]


def _f_inverse(t: np.ndarray, low: np.ndarray, cube: np.ndarray) -> np.ndarray:
    """t³ above the knee, (t - 16/116) / 7.787 below, into t (`low`, `cube`: scratch of t's size). That line
    is the cube's tangent at the knee, so max(t, k)³ + (min(t, k) - k) / 7.787 is the same function without
    np.where, which is several times slower; and where no value is below the knee (most chunks) it is t³ alone."""
    if t.min() >= _F_KNEE:
        np.multiply(t, t, out=cube)
        t *= cube
        return t
    np.minimum(t, _F_KNEE, out=low)
    low -= _F_KNEE
    low *= np.float32(1.0 / 7.787)
    np.maximum(t, _F_KNEE, out=t)
    np.multiply(t, t, out=cube)
    t *= cube
    t += low
    return t


def _linear_rgb(l_norm: np.ndarray, a_norm: np.ndarray, b_norm: np.ndarray,
                scratch: _Scratch | None = None) -> list[np.ndarray]:
    """Normalised Lab (1-D float32 arrays of one length N) → linear RGB [3, N], unclipped: a view into
    `scratch` (a new one if not given), valid until its next use; L, a and b are only read. L is clamped
    to [0, 100]: beyond it no colour, not even gray, is displayable."""
    count = len(l_norm)
    scratch = scratch or _Scratch(count)
    _, _, y, x, z, rgb = scratch.planes(count)
    red, green, blue = rgb
    np.multiply(l_norm, np.float32(L_SCALE), out=y)
    np.clip(y, np.float32(0.0), np.float32(L_SCALE), out=y)
    y += np.float32(16.0)
    y *= np.float32(1.0 / 116.0)  # f(Y)
    np.multiply(a_norm, np.float32(AB_SCALE / 500.0), out=x)
    x += y  # f(X/Xn)
    np.multiply(b_norm, np.float32(-AB_SCALE / 200.0), out=z)
    z += y  # f(Z/Zn)
    for f in (y, x, z):
        _f_inverse(f, red, green)
    x -= y
    z -= y
    # R = Y + m_x (X/Xn - Y) + m_z (Z/Zn - Y), and so G and B; blue is the scratch until its own turn
    for plane, m_x, m_z in zip((red, green), _M_X, _M_Z):
        np.multiply(x, m_x, out=plane)
        plane += y
        plane += np.multiply(z, m_z, out=blue)
    np.multiply(x, _M_X[2], out=blue)
    blue += y
    blue += np.multiply(z, _M_Z[2], out=z)
    return rgb


def _outside(rgb: np.ndarray, low_bound: float = GAMUT_LOW, high_bound: float = GAMUT_HIGH) -> np.ndarray:
    return (rgb.min(axis=0) < low_bound) | (rgb.max(axis=0) > high_bound)


def _outside_rows(rgb: np.ndarray) -> np.ndarray | None:
    """Indices of the out-of-gamut pixels of rgb [3, N], or None when there are none (most chunks): two
    reductions over the chunk decide that before any per-pixel mask is made."""
    if rgb.min() >= GAMUT_LOW and rgb.max() <= GAMUT_HIGH:
        return None
    return np.flatnonzero(_outside(rgb))


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


def _chunks(count: int, size: int = CHUNK_PIXELS) -> Iterator[slice]:
    # Small chunks keep every temporary in the CPU cache (and out of mmap'd fresh pages): several times faster
    # per pixel than whole-megapixel arrays.
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _copy_ab(ab_flat: np.ndarray) -> AbSource:
    def fill(part: slice, a_norm: np.ndarray, b_norm: np.ndarray) -> None:
        a_norm[:] = ab_flat[part, 0]
        b_norm[:] = ab_flat[part, 1]

    return fill


def out_of_gamut(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """Per pixel: does this normalised Lab colour lie outside sRGB? Decided in linear RGB before any
    clipping, with a tolerance of one 8-bit step (GAMUT_LOW/GAMUT_HIGH). Shape: L's, without a channel."""
    shape, l_flat, ab_flat = _flat_lab(l_norm, ab_norm)
    out = np.empty(l_flat.shape, dtype=bool)
    scratch = _Scratch(min(CHUNK_PIXELS, len(l_flat)))
    for part in _chunks(len(l_flat)):
        out[part] = _outside(_linear_rgb(l_flat[part], ab_flat[part, 0], ab_flat[part, 1], scratch))
    return out.reshape(shape)


def _chroma_scale(l_norm: np.ndarray, a_norm: np.ndarray, b_norm: np.ndarray) -> np.ndarray:
    """For out-of-gamut colours (1-D arrays): the largest factor s on their ab, to 2^-GAMUT_STEPS, that
    keeps them inside sRGB's boundary itself (no tolerance: clipping then moves them by float noise only,
    so L and hue stay as mapped). Bisection from s = 0, their gray (in gamut for L in [0, 100]): each step tries
    s + half the last step and keeps it where that is still in gamut, so s never leaves the gamut."""
    scale = np.zeros(l_norm.shape, dtype=np.float32)
    # At L <= 0 and L >= 100 sRGB holds only black and white: s = 0 without bisecting. Clipped shadows and
    # highlights are often most of a photo's out-of-gamut pixels (12 bisection steps each).
    between = (l_norm > 0) & (l_norm < 1)
    if not between.all():
        if between.any():
            scale[between] = _chroma_scale(l_norm[between], a_norm[between], b_norm[between])
        return scale
    scratch = _Scratch(len(l_norm))
    for step in range(1, GAMUT_STEPS + 1):
        size = np.float32(2.0**-step)
        trial = scale + size
        scale += size * ~_outside(_linear_rgb(l_norm, a_norm * trial, b_norm * trial, scratch), 0.0, 1.0)
    return scale


def _to_rgb(l_flat: np.ndarray, fill_ab: AbSource, out: np.ndarray, encode: Encoder, chunk: int = CHUNK_PIXELS) -> None:
    """Flat normalised L [N] and ab (written chunk by chunk by `fill_ab(part, a, b)`) → gamut-mapped RGB
    into out [3, N] (one plane per channel: writing them interleaved costs more than the arithmetic), the
    linear RGB [3, n] of each chunk written through `encode(rgb, into, scratch)`.

    In-gamut colours are only clipped (by at most one code step); an out-of-gamut colour keeps its L and
    hue angle and loses just enough chroma to fit sRGB. Those are gathered from all chunks first and
    bisected together: per chunk they are few, and numpy's per-call cost would dominate."""
    scratch = _Scratch(min(chunk, len(l_flat)))
    outside: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for part in _chunks(len(l_flat), chunk):
        count = part.stop - part.start
        a_norm, b_norm = scratch.planes(count)[:2]
        fill_ab(part, a_norm, b_norm)
        rgb = _linear_rgb(l_flat[part], a_norm, b_norm, scratch)
        rows = _outside_rows(rgb)
        if rows is not None:
            outside.append((rows + part.start, a_norm[rows], b_norm[rows]))
        encode(rgb, out[:, part], scratch)
    if not outside:
        return
    rows, a_norm, b_norm = (np.concatenate(parts) for parts in zip(*outside))
    for part in _chunks(len(rows)):
        l_norm = l_flat[rows[part]]
        scale = _chroma_scale(l_norm, a_norm[part], b_norm[part])
        mapped = np.empty((3, len(l_norm)), dtype=out.dtype)
        encode(_linear_rgb(l_norm, a_norm[part] * scale, b_norm[part] * scale), mapped, None)
        out[:, rows[part]] = mapped


def gamut_mapped_ab(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """The normalised ab [..., 2] that `lab_norm_to_rgb` displays: out-of-gamut colours with their chroma
    reduced into sRGB, in-gamut ones unchanged. (For tests and reports; conversions need not call it.)"""
    shape, l_flat, ab_flat = _flat_lab(l_norm, ab_norm)
    ab = ab_flat.copy()
    outside = out_of_gamut(l_flat, ab_flat)
    if outside.any():
        ab[outside] *= _chroma_scale(l_flat[outside], ab_flat[outside, 0], ab_flat[outside, 1])[:, None]
    return ab.reshape(*shape, 2)


def _srgb_encode(linear: np.ndarray, into: np.ndarray, scratch: _Scratch | None) -> None:
    """Linear → sRGB-encoded [0, 1], float32, clipped: 1.055 v^(1/2.4) - 0.055 above 0.0031308, 12.92 v
    below; branch-free as in _f_inverse (the line meets the curve there to 1e-7)."""
    np.clip(linear, np.float32(0.0), np.float32(1.0), out=linear)
    encoded = np.power(np.maximum(linear, _GAMMA_KNEE), np.float32(1.0 / 2.4))
    encoded *= np.float32(1.055)
    encoded -= np.float32(0.055)
    below = np.minimum(linear, _GAMMA_KNEE)
    below -= _GAMMA_KNEE
    below *= np.float32(12.92)
    encoded += below
    np.clip(encoded, np.float32(0.0), np.float32(1.0), out=into)  # the knee's 1e-7 mismatch


@functools.cache
def _srgb8_table() -> np.ndarray:
    """8-bit sRGB code of linear values [0, 1] by the top bits of their float32 pattern: sign, exponent and
    RGB8_MANTISSA_BITS of mantissa, the cells relatively equal (at most 0.0034 of a code step wide, taken
    at their centre), and the index is a bit shift of the values themselves, no arithmetic."""
    shift = 23 - RGB8_MANTISSA_BITS
    first, last = (int(np.float32(v).view(np.int32)) >> shift for v in (2.0**-20, 1.0))  # code 0 below 2^-20
    centres = ((np.arange(first, last + 1, dtype=np.int64) << shift) + (1 << (shift - 1))).astype(np.int32)
    centres = np.minimum(centres.view(np.float32).astype(np.float64), 1.0)  # the last cell holds 1.0
    encoded = np.where(centres > 0.0031308, 1.055 * centres ** (1 / 2.4) - 0.055, 12.92 * centres)
    table = np.zeros(last + 1, dtype=np.uint8)
    table[first:] = np.rint(encoded * 255.0)
    return table


def _srgb8_encode(linear: np.ndarray, into: np.ndarray, scratch: _Scratch | None) -> None:
    """Linear → 8-bit sRGB codes through the table. No clip: take's mode="clip" clamps the index, and a
    float's bits sort as the float does, so negative values (negative ints) get code 0 and values above 1
    code 255 (NaN, only possible out of gamut where the colour is redone, either)."""
    index = np.empty(linear.shape, dtype=np.int32) if scratch is None else scratch.index(linear.shape[-1])
    np.right_shift(linear.view(np.int32), 23 - RGB8_MANTISSA_BITS, out=index)
    np.take(_srgb8_table(), index, out=into, mode="clip")


def _converted(l_norm: np.ndarray, ab_norm: np.ndarray, encode: Encoder, dtype) -> np.ndarray:
    shape, l_flat, ab_flat = _flat_lab(l_norm, ab_norm)
    out = np.empty((3, len(l_flat)), dtype=dtype)
    _to_rgb(l_flat, _copy_ab(ab_flat), out, encode)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1)).reshape(*shape, 3)


def lab_norm_to_rgb(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """Normalised L [..., H, W] or [..., H, W, 1] and ab [..., H, W, 2] → RGB float32 in [0, 1], gamut-mapped."""
    return _converted(l_norm, ab_norm, _srgb_encode, np.float32)


def gray_rgb(l_norm: np.ndarray) -> np.ndarray:
    """The gray a photo of normalised lightness L [..., H, W, 1] is shown as (a = b = 0), RGB float32 in
    [0, 1]: the sheets' gray panel, the colours the gray floor is scored on. Not L itself taken as sRGB,
    which is lighter in the mid-tones."""
    l_norm = np.asarray(l_norm, dtype=np.float32)
    return lab_norm_to_rgb(l_norm, np.zeros((*l_norm.shape[:-1], 2), dtype=np.float32))


def lab_norm_to_rgb8(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """As `lab_norm_to_rgb`, straight to uint8 through a table (for full-size photos): the same codes as
    rounding `lab_norm_to_rgb(...) * 255`, except at most one step off on rare exact rounding boundaries."""
    return _converted(l_norm, ab_norm, _srgb8_encode, np.uint8)


def lab_rows_to_rgb8(l_norm: np.ndarray, ab_rows: AbSource) -> np.ndarray:
    """As `lab_norm_to_rgb8` for one image whose ab is made a few rows at a time, never whole (full-size
    photos): L/100 [H, W] and `ab_rows(rows, a, b)`, which writes a/128 and b/128 of `rows` (a slice) into
    a and b [len(rows), W], → uint8 R, G and B planes [3, H, W] (interleaving them is Pillow's cheapest
    step: Image.merge). The same codes as `lab_norm_to_rgb8` on the whole ab."""
    height, width = l_norm.shape
    l_flat = np.ascontiguousarray(l_norm, dtype=np.float32).reshape(-1)
    out = np.empty((3, height * width), dtype=np.uint8)

    def fill(part: slice, a_norm: np.ndarray, b_norm: np.ndarray) -> None:  # parts are whole rows
        rows = slice(part.start // width, part.stop // width)
        ab_rows(rows, a_norm.reshape(-1, width), b_norm.reshape(-1, width))

    _to_rgb(l_flat, fill, out, _srgb8_encode, chunk=max(1, CHUNK_PIXELS // max(width, 1)) * width)
    return out.reshape(3, height, width)


def mean_chroma(rgb: np.ndarray) -> float:
    """Mean Lab chroma sqrt(a²+b²) in Lab units: ~0 for gray photos, 10-30 for colour photos."""
    lab = skcolor.rgb2lab(to_float_rgb(rgb[..., :3]))
    return float(np.hypot(lab[..., 1], lab[..., 2]).mean())


def delta_e00(lab_a: np.ndarray, lab_b: np.ndarray) -> float | np.ndarray:
    """Mean CIEDE2000 difference of Lab images [..., H, W, 3] (real Lab units): one value per image.

    Here, on the shared ground, because training (the kept checkpoint) and evaluation (the reported score)
    must measure colour error by one rule."""
    per_pixel = skcolor.deltaE_ciede2000(np.asarray(lab_a, dtype=np.float64), np.asarray(lab_b, dtype=np.float64),
                                         channel_axis=-1)
    means = per_pixel.mean(axis=(-2, -1))
    return float(means) if np.ndim(means) == 0 else means


def lab_from_norm(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """Lab in real units [..., H, W, 3] from normalised L [..., H, W] and ab [..., H, W, 2]."""
    return np.concatenate([np.asarray(l_norm)[..., None] * L_SCALE, np.asarray(ab_norm) * AB_SCALE], axis=-1)
