"""chromalab.color: the float32 Lab → RGB conversion against skimage's float64 one, and its gamut mapping."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from skimage import color as skcolor

from chromalab import color
from chromalab.color import AB_SCALE, L_SCALE


def srgb_grid(step: int) -> np.ndarray:
    """Every `step`-th 8-bit level of R, G and B, the extremes included: [N, 3] uint8."""
    levels = np.unique(np.append(np.arange(0, 256, step), 255)).astype(np.uint8)
    return np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)


def norm(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real Lab [..., 3] → (L/100, ab/128) float32, as the models see them."""
    return (lab[..., 0] / L_SCALE).astype(np.float32), (lab[..., 1:] / AB_SCALE).astype(np.float32)


@pytest.fixture(scope="module")
def wild_lab() -> np.ndarray:
    """Lab colours as an untrained or over-eager model predicts them: any L, |ab| up to 128√2. [N, 3]"""
    rng = np.random.default_rng(7)
    count = 40_000
    return np.stack([rng.uniform(2, 98, count), rng.uniform(-128, 128, count), rng.uniform(-128, 128, count)], -1)


def test_float32_matches_skimage_float64_on_all_of_srgb_within_a_hundredth_of_a_delta_e():
    # Every 5th level per channel (140,608 colours, the gamut's corners and faces included). The full
    # 16.7 M colours give the same bound (max ΔE00 0.0059, measured for issue 12).
    rgb = srgb_grid(5)
    lab = skcolor.rgb2lab(rgb / 255.0)
    ours = color.lab_norm_to_rgb(*norm(lab))
    assert ours.dtype == np.float32
    reference = skcolor.lab2rgb(lab)
    delta_e = skcolor.deltaE_ciede2000(skcolor.rgb2lab(ours.astype(np.float64)), skcolor.rgb2lab(reference))
    assert delta_e.max() < 0.01
    assert not color.out_of_gamut(*norm(lab)).any()  # sRGB's own colours are in its gamut
    # the 8-bit path gives back the very codes the colours came from
    np.testing.assert_array_equal(color.lab_norm_to_rgb8(*norm(lab)), rgb)


def test_lightness_in_float32_matches_skimage():
    rgb = srgb_grid(7)
    np.testing.assert_allclose(color.rgb8_lightness_norm(rgb), skcolor.rgb2lab(rgb / 255.0)[:, 0] / L_SCALE,
                               atol=2e-6)


def test_neutral_lab_is_exactly_gray_at_every_lightness():
    l_norm = np.linspace(0, 1, 1001, dtype=np.float32)
    rgb = color.lab_norm_to_rgb(l_norm, np.zeros((1001, 2), np.float32))
    assert (rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all()
    assert rgb[0, 0] == 0 and rgb[-1, 0] == pytest.approx(1, abs=1e-6)
    rgb8 = color.lab_norm_to_rgb8(l_norm, np.zeros((1001, 2), np.float32))
    assert (rgb8 == rgb8[:, :1]).all()


def test_out_of_gamut_colours_keep_their_lightness_and_hue_and_come_back_in_gamut(wild_lab):
    l_norm, ab = norm(wild_lab)
    outside = color.out_of_gamut(l_norm, ab)
    assert 0.5 < outside.mean() < 1  # the test sees both kinds
    shown = skcolor.rgb2lab(color.lab_norm_to_rgb(l_norm, ab).astype(np.float64))
    mapped = shown[outside]
    assert not color.out_of_gamut(*norm(mapped)).any()
    np.testing.assert_allclose(mapped[:, 0], wild_lab[outside, 0], atol=0.01)  # L kept
    chroma = np.hypot(mapped[:, 1], mapped[:, 2])
    hue_shift = np.angle(np.exp(1j * (np.arctan2(mapped[:, 2], mapped[:, 1])
                                      - np.arctan2(wild_lab[outside, 2], wild_lab[outside, 1]))), deg=True)
    assert np.abs(hue_shift[chroma > 5]).max() < 0.5  # hue kept (it is undefined near gray)
    assert (chroma <= np.hypot(wild_lab[outside, 1], wild_lab[outside, 2]) + 0.05).all()  # chroma only lost
    # per-channel clipping, what the conversion did before, shifts these same hues by tens of degrees
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skimage's note that it clipped, which is the point here
        clipped = skcolor.rgb2lab(skcolor.lab2rgb(wild_lab[outside]))
    clip_shift = np.angle(np.exp(1j * (np.arctan2(clipped[:, 2], clipped[:, 1])
                                       - np.arctan2(wild_lab[outside, 2], wild_lab[outside, 1]))), deg=True)
    assert np.percentile(np.abs(clip_shift), 90) > 10


def linear_rgb_unclipped(lab: np.ndarray) -> np.ndarray:
    """skimage's own Lab → XYZ → linear sRGB, float64, before the clipping lab2rgb does."""
    return skcolor.lab2xyz(lab) @ skcolor.colorconv.rgb_from_xyz.T


def test_chroma_is_reduced_only_as_far_as_the_gamut_boundary(wild_lab):
    l_norm, ab = norm(wild_lab)
    outside = color.out_of_gamut(l_norm, ab)
    mapped = color.gamut_mapped_ab(l_norm, ab)
    np.testing.assert_array_equal(mapped[~outside], ab[~outside])  # in-gamut colours untouched
    assert not color.out_of_gamut(l_norm, mapped).any()
    lab_mapped = np.concatenate([wild_lab[outside, :1], mapped[outside] * AB_SCALE], axis=-1)
    linear = linear_rgb_unclipped(lab_mapped)
    # inside sRGB itself, not just within out_of_gamut's tolerance (1e-4: our matrix rows sum to exactly 1
    # so that gray stays gray, skimage's to within 8e-5)
    assert linear.min() > -1e-4 and linear.max() < 1 + 1e-4
    # ... on its boundary: some channel at 0 or 1 (to the bisection's precision)
    assert ((linear.min(axis=-1) < 1e-3) | (linear.max(axis=-1) > 1 - 1e-3)).all()
    # ... and a thousandth of the predicted chroma more takes every mapped colour outside again
    more = lab_mapped + np.concatenate([np.zeros((outside.sum(), 1)), wild_lab[outside, 1:] / 1024], axis=-1)
    linear_more = linear_rgb_unclipped(more)
    assert ((linear_more.min(axis=-1) < 0) | (linear_more.max(axis=-1) > 1)).all()


def test_fast_paths_match_skimage_float64_on_a_dense_grid_of_in_gamut_lab():
    # Every in-gamut colour of a Lab grid: L in steps of 1, a and b in steps of 2 (~200 k colours). A grid
    # 8x denser (1.64 M colours) gives the same figures (measured for issue 12: max ΔE00 0.0059 for float32,
    # 1.2 % of the 8-bit colours one code off rounding, never more).
    lab = np.stack(np.meshgrid(np.arange(0, 101.0), np.arange(-128, 128, 2.0), np.arange(-128, 128, 2.0),
                               indexing="ij"), axis=-1).reshape(-1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skimage's note on the grid's many out-of-gamut Z values
        linear = linear_rgb_unclipped(lab)
    lab = lab[(linear.min(axis=-1) >= 0) & (linear.max(axis=-1) <= 1)]
    assert len(lab) > 150_000
    reference = skcolor.lab2rgb(lab)
    reference_lab = skcolor.rgb2lab(reference)
    ours = color.lab_norm_to_rgb(*norm(lab)).astype(np.float64)
    assert skcolor.deltaE_ciede2000(skcolor.rgb2lab(ours), reference_lab).max() < 0.01  # far below visible (~1)
    # 8-bit: the codes of rounding float64's RGB, or one off where float32 lands across a rounding boundary;
    # so no further from the exact colour than rounding float64 itself is
    rgb8 = color.lab_norm_to_rgb8(*norm(lab)).astype(int)
    rounded = np.rint(reference * 255).astype(int)
    assert np.abs(rgb8 - rounded).max() <= 1 and (rgb8 != rounded).any(axis=-1).mean() < 0.02
    error8 = skcolor.deltaE_ciede2000(skcolor.rgb2lab(rgb8 / 255.0), reference_lab)
    error_rounded = skcolor.deltaE_ciede2000(skcolor.rgb2lab(rounded / 255.0), reference_lab)
    assert error8.max() <= error_rounded.max() + 0.01 and error8.mean() <= error_rounded.mean() + 0.001


def test_in_gamut_pixels_are_converted_as_skimage_does_beside_out_of_gamut_ones(wild_lab):
    l_norm, ab = norm(wild_lab)
    outside = color.out_of_gamut(l_norm, ab)
    together = color.lab_norm_to_rgb(l_norm, ab)
    # within a quarter of an 8-bit step (the rows of our matrix sum to exactly 1, skimage's to within 8e-5)
    np.testing.assert_allclose(together[~outside], skcolor.lab2rgb(wild_lab[~outside]), atol=1e-3)
    alone = color.lab_norm_to_rgb(l_norm[~outside], ab[~outside])
    np.testing.assert_array_equal(together[~outside], alone)


def test_eight_bit_output_agrees_with_rounding_the_float_one(wild_lab):
    l_norm, ab = norm(wild_lab)
    rgb8 = color.lab_norm_to_rgb8(l_norm, ab).astype(int)
    rounded = np.rint(color.lab_norm_to_rgb(l_norm, ab) * 255).astype(int)
    assert np.abs(rgb8 - rounded).max() <= 1 and (rgb8 != rounded).mean() < 1e-3


def test_shapes_images_batches_and_mismatches():
    rng = np.random.default_rng(1)
    l_norm = rng.random((2, 5, 7, 1), dtype=np.float32)
    ab = rng.uniform(-0.3, 0.3, (2, 5, 7, 2)).astype(np.float32)
    assert color.lab_norm_to_rgb(l_norm, ab).shape == (2, 5, 7, 3)
    np.testing.assert_array_equal(color.lab_norm_to_rgb(l_norm, ab), color.lab_norm_to_rgb(l_norm[..., 0], ab))
    assert color.out_of_gamut(l_norm, ab).shape == (2, 5, 7)
    with pytest.raises(ValueError, match="do not match"):
        color.lab_norm_to_rgb(l_norm[:, :4], ab)


def test_black_and_white_with_chroma_become_black_and_white_and_leave_the_rest_as_bisected(wild_lab):
    """At L <= 0 and L >= 100 the only sRGB colours are black and white: the mapping takes all their chroma
    (without bisecting), and the other pixels of the same call are mapped exactly as on their own."""
    l_norm, ab_norm = norm(wild_lab)
    extremes = np.array([-0.1, 0.0, 1.0, 1.2], dtype=np.float32)
    chroma = np.array([[0.3, -0.2], [0.05, 0.01], [-0.4, 0.3], [0.2, 0.2]], dtype=np.float32)
    mixed_l, mixed_ab = np.concatenate([l_norm, extremes]), np.concatenate([ab_norm, chroma])
    mapped = color.gamut_mapped_ab(mixed_l, mixed_ab)
    assert np.all(mapped[-4:] == 0)
    np.testing.assert_array_equal(mapped[:-4], color.gamut_mapped_ab(l_norm, ab_norm))
    rgb = color.lab_norm_to_rgb8(extremes, chroma)
    np.testing.assert_array_equal(rgb, [[0, 0, 0], [0, 0, 0], [255, 255, 255], [255, 255, 255]])


@pytest.mark.parametrize("lab", [[(30, 0, -90), (50, -80, 0)],  # beyond sRGB only below 0 (negative channels)
                                 [(95, -40, 60), (95, -40, 60)]],  # only above 1 (too bright a green-yellow)
                         ids=["below-only", "above-only"])
def test_a_photo_out_of_gamut_on_one_side_only_is_gamut_mapped_too(lab):
    """A photo (a chunk) whose out-of-gamut colours all leave sRGB on the same side is mapped as any other:
    L and hue kept, only chroma lost; never clipped channel by channel, which shifts these hues."""
    lab = np.asarray(lab, dtype=np.float64)
    linear = linear_rgb_unclipped(lab)
    assert (linear < 0).any() != (linear > 1).any()  # each photo leaves sRGB on one side only
    shown = skcolor.rgb2lab(color.lab_norm_to_rgb(*norm(lab)).astype(np.float64))
    np.testing.assert_allclose(shown[:, 0], lab[:, 0], atol=0.05)
    hue_shift = np.angle(np.exp(1j * (np.arctan2(shown[:, 2], shown[:, 1]) - np.arctan2(lab[:, 2], lab[:, 1]))),
                         deg=True)
    assert np.abs(hue_shift).max() < 0.5
    assert (np.hypot(shown[:, 1], shown[:, 2]) < np.hypot(lab[:, 1], lab[:, 2])).all()


def test_mean_chroma_is_the_mean_of_sqrt_a2_b2_over_the_pixels():
    """The images stage drops photos below images.min_chroma as gray: a blue or yellow photo (mostly b*)
    must count as colourful. Published CIE Lab (D65) of sRGB's blue: (32.30, 79.19, -107.86), chroma 133.81;
    of its yellow: (97.14, -21.55, 94.48), chroma 96.91."""
    photo = np.full((4, 6, 3), 128, dtype=np.uint8)
    assert color.mean_chroma(photo) == pytest.approx(0, abs=0.01)  # skimage's gray: within 0.004
    photo[:, :3] = (0, 0, 255)
    assert color.mean_chroma(photo) == pytest.approx(133.81 / 2, abs=0.05)
    photo[:, 3:] = (255, 255, 0)
    assert color.mean_chroma(photo) == pytest.approx((133.81 + 96.91) / 2, abs=0.05)
    assert color.mean_chroma(np.dstack([photo, np.full((4, 6), 7, np.uint8)])) == color.mean_chroma(photo)  # alpha
