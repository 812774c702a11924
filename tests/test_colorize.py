"""`chromalab colorize` end to end on real photos with tiny Keras models built here.

The models have a fixed 16×16 input, as the U-Net generator has a fixed input size (256): colorize must
resize every photo to the model's size and bring the colour back to the photo's own size.
"""

from __future__ import annotations

import io
import re
import tempfile
import threading
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps
from typer.testing import CliRunner

from chromalab.cli import app
from chromalab.color import rgb_to_lab_norm
from chromalab.colorize import ColorizeReport, colorize_paths, load_colorizer, read_photo
from chromalab.errors import ChromalabError
from chromalab.files import over_white
from chromalab.bench.samples import real_crops

MODEL_SIZE = 16
TINT_AB = np.tanh([0.05, 0.08]) * 128  # what the tint model predicts everywhere, in Lab units


def _save_model(model: keras.Model, path: Path) -> Path:
    model.save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    random = keras.Sequential([keras.Input((MODEL_SIZE, MODEL_SIZE, 1)),
                               keras.layers.Conv2D(2, 3, padding="same", activation="tanh")])
    # A constant, in-gamut warm tint: the colour every output must carry, whatever the photo.
    tint = keras.Sequential([keras.Input((MODEL_SIZE, MODEL_SIZE, 1)),
                             keras.layers.Conv2D(2, 3, padding="same", activation="tanh",
                                                 kernel_initializer="zeros",
                                                 bias_initializer=keras.initializers.Constant([0.05, 0.08]))])
    return {"random": _save_model(random, folder / "random.keras"), "tint": _save_model(tint, folder / "tint.keras")}


@pytest.fixture(scope="module")
def rgb_photos() -> list[np.ndarray]:
    return real_crops(4, 64, seed=7)


def lightness(image: Image.Image | Path) -> np.ndarray:
    """Lab L (0-100) of an image's colour channels."""
    image = Image.open(image) if isinstance(image, Path) else image
    return rgb_to_lab_norm(np.asarray(image.convert("RGB")))[..., 0] * 100


def chroma_ab(path: Path) -> np.ndarray:
    return rgb_to_lab_norm(np.asarray(Image.open(path).convert("RGB")))[..., 1:] * 128


def run(paths, models, model="tint", **kwargs) -> ColorizeReport:
    return colorize_paths([Path(p) for p in paths], model=str(models[model]), **kwargs)


def test_large_non_square_photo_keeps_its_size_and_its_sharp_lightness(tmp_path, models):
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((1200, 800), Image.Resampling.LANCZOS))
    source = tmp_path / "astronaut.png"
    Image.fromarray(rgb).save(source)
    report = run([source], models)
    output = tmp_path / "astronaut_color.png"
    assert report.done == [output] and report.total == 1
    with Image.open(output) as out:
        assert out.size == (1200, 800) and out.format == "PNG"
        out_l = lightness(out)
    in_l = lightness(Image.fromarray(rgb))
    # Full-resolution L is kept up to 8-bit rounding. Near black and white no tint fits in the sRGB gamut,
    # and clipping it moves L by a unit or two there: those pixels are left out.
    in_gamut = (in_l > 5) & (in_l < 95)
    assert in_gamut.mean() > 0.7
    assert np.abs(out_l - in_l)[in_gamut].max() < 1.0
    # What the test guards against: L that went through the model's 16x16 would be far off.
    blurred = np.asarray(Image.fromarray(in_l.astype(np.float32)).resize((MODEL_SIZE, MODEL_SIZE))
                         .resize((1200, 800), Image.Resampling.BICUBIC))
    assert np.percentile(np.abs(blurred - in_l), 99) > 20


def test_rgb_input_is_recoloured_with_the_models_colour(tmp_path, models, rgb_photos):
    source = tmp_path / "photo.jpg"
    Image.fromarray(rgb_photos[0]).save(source, quality=95)
    run([source], models)
    ab = chroma_ab(tmp_path / "photo_color.jpg")
    mid = (lightness(tmp_path / "photo_color.jpg") > 20) & (lightness(tmp_path / "photo_color.jpg") < 80)
    # The photo's own colour is gone; the tint model's is there (JPEG adds a little noise).
    np.testing.assert_allclose(np.median(ab[mid], axis=0), TINT_AB, atol=1.5)


def test_gray_photo_gets_colour(tmp_path, models, rgb_photos):
    source = tmp_path / "gray.jpg"
    gray = Image.fromarray(rgb_photos[1]).convert("L")
    gray.save(source, quality=95)
    run([source], models)
    with Image.open(tmp_path / "gray_color.jpg") as out:
        assert out.mode == "RGB" and out.size == gray.size
        assert np.abs(lightness(out) - lightness(gray)).mean() < 1.0
    assert np.median(np.hypot(*chroma_ab(tmp_path / "gray_color.jpg").reshape(-1, 2).T)) > 8


def test_alpha_is_kept_for_rgba_and_la(tmp_path, models, rgb_photos):
    alpha = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    rgba = Image.fromarray(np.dstack([rgb_photos[2], alpha]))
    rgba.save(tmp_path / "rgba.png")
    la = Image.fromarray(np.dstack([np.asarray(rgba.convert("L")), alpha]), mode="LA")
    la.save(tmp_path / "la.png")
    report = run([tmp_path / "rgba.png", tmp_path / "la.png"], models, batch_size=2)
    assert len(report.done) == 2
    for name in ("rgba_color.png", "la_color.png"):
        with Image.open(tmp_path / name) as out:
            assert out.mode == "RGBA"
            np.testing.assert_array_equal(np.asarray(out.getchannel("A")), alpha)


def test_a_png_colour_key_stays_transparent_and_a_transparent_photo_named_jpg_is_coloured(tmp_path, models,
                                                                                         rgb_photos):
    keyed = Image.fromarray(rgb_photos[1])
    key = tuple(int(v) for v in rgb_photos[1][0, 0])
    keyed.save(tmp_path / "keyed.png", transparency=key)  # RGB with a tRNS colour key, no alpha channel
    alpha = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    Image.fromarray(np.dstack([rgb_photos[2], alpha])).save(tmp_path / "logo.jpg", format="PNG")  # renamed
    report = run([tmp_path / "keyed.png", tmp_path / "logo.jpg"], models)
    assert sorted(report.done) == [tmp_path / "keyed_color.png", tmp_path / "logo_color.jpg"], report.failed
    with Image.open(tmp_path / "keyed_color.png") as out:
        assert out.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(out.getchannel("A")) == 0, (rgb_photos[1] == key).all(axis=-1))
    with Image.open(tmp_path / "logo_color.jpg") as out:
        assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (64, 64))  # JPEG holds no alpha


def test_transparent_parts_are_white_to_the_model_and_in_outputs_without_alpha(tmp_path, models, rgb_photos):
    """As the images stage trains on it (and a browser shows it): a cut-out's transparent band, whose hidden
    pixels editors save black, is white to the model, in a JPEG output and on the compare sheet."""
    cutout = np.dstack([rgb_photos[2], np.full((64, 64), 255, np.uint8)])
    cutout[:, :16] = 0  # transparent, and black underneath
    on_white = cutout[..., :3].copy()
    on_white[:, :16] = 255
    Image.fromarray(cutout).save(tmp_path / "cutout.png")
    Image.fromarray(cutout).save(tmp_path / "renamed.jpg", format="PNG")  # coloured into a JPEG
    large = Image.fromarray(cutout).resize((240, 240), Image.Resampling.NEAREST)  # box-reduced first when read
    large.save(tmp_path / "large.png")
    for name, photo in (("cutout.png", Image.fromarray(on_white)), ("large.png", over_white(large))):
        seen = read_photo(tmp_path / name, (MODEL_SIZE, MODEL_SIZE)).small[..., None]
        trained_on = photo.resize((MODEL_SIZE, MODEL_SIZE), Image.Resampling.LANCZOS)  # as the images stage makes it
        np.testing.assert_allclose(seen, rgb_to_lab_norm(np.asarray(trained_on))[..., :1], atol=0.01, err_msg=name)

    report = run([tmp_path / "cutout.png", tmp_path / "renamed.jpg"], models, compare=True)
    assert len(report.done) == 2, report.failed
    with Image.open(tmp_path / "cutout_color.png") as kept:  # alpha kept: the band stays transparent
        assert kept.mode == "RGBA" and np.asarray(kept.getchannel("A"))[:, :16].max() == 0
    with Image.open(tmp_path / "renamed_color.jpg") as jpeg:
        assert lightness(jpeg)[:, :14].min() > 97
    with Image.open(tmp_path / "cutout_compare.jpg") as sheet:
        band = lightness(sheet)
        assert band[:, :14].min() > 97 and band[:, 64:78].min() > 97  # gray half, coloured half


def test_a_photo_in_another_colour_space_is_read_as_it_looks_and_one_with_a_broken_profile_as_stored(tmp_path):
    """A camera's Adobe RGB photo or a scan in gray gamma 2.2: the lightness colorize keeps, and the model sees,
    is the one the photo's profile gives, not its numbers taken as sRGB."""
    from icc import ADOBE_RGB_GAMMA, adobe_rgb, gray_gamma, neutral_lightness

    levels = np.arange(256)
    ramp = np.tile(levels.astype(np.uint8), (8, 1))
    Image.fromarray(np.dstack([ramp] * 3)).save(tmp_path / "adobe.png", icc_profile=adobe_rgb())
    Image.fromarray(ramp).save(tmp_path / "gray22.png", icc_profile=gray_gamma(2.2))
    Image.fromarray(np.dstack([ramp] * 3)).save(tmp_path / "broken.png", icc_profile=b"no profile at all")
    Image.fromarray(np.dstack([ramp] * 3)).save(tmp_path / "plain.png")
    for name, gamma in (("adobe.png", ADOBE_RGB_GAMMA), ("gray22.png", 2.2)):
        lightness = read_photo(tmp_path / name).lightness[0] * 100
        np.testing.assert_allclose(lightness, neutral_lightness(levels, gamma), atol=1.0, err_msg=name)
    np.testing.assert_array_equal(read_photo(tmp_path / "broken.png").lightness,
                                  read_photo(tmp_path / "plain.png").lightness)
    Image.new("RGB", (64, 64), (30, 30, 30)).save(tmp_path / "dark.jpg", quality=100, icc_profile=adobe_rgb())
    seen = read_photo(tmp_path / "dark.jpg", (MODEL_SIZE, MODEL_SIZE)).small * 100  # JPEG: a draft decode
    np.testing.assert_allclose(seen, neutral_lightness(30, ADOBE_RGB_GAMMA), atol=0.6)


def test_a_profile_is_applied_whatever_the_photos_mode_keeps_its_transparency_and_is_judged_by_what_it_does(
        tmp_path):
    """A palette photo reads as the same photo in RGB; a colour key (tRNS) stays transparent through the
    profile; sRGB's own profile leaves the numbers alone, and a linear profile named "sRGB" does not."""
    from icc import ADOBE_RGB_GAMMA, adobe_rgb, neutral_lightness

    from chromalab.files import in_srgb

    ramp = np.tile(np.arange(0, 256, 15, dtype=np.uint8), (4, 1))
    rgb = Image.fromarray(np.dstack([ramp] * 3))
    rgb.save(tmp_path / "rgb.png", icc_profile=adobe_rgb())
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png", icc_profile=adobe_rgb())
    rgb.save(tmp_path / "keyed.png", icc_profile=adobe_rgb(), transparency=(30, 30, 30))
    rgb.save(tmp_path / "srgb.png", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    rgb.save(tmp_path / "linear.png", icc_profile=adobe_rgb(gamma=1.0, name="Linear sRGB"))
    rgb.save(tmp_path / "plain.png")
    expected = neutral_lightness(ramp[0], ADOBE_RGB_GAMMA)
    for name in ("rgb.png", "palette.png", "keyed.png"):
        np.testing.assert_allclose(read_photo(tmp_path / name).lightness[0] * 100, expected, atol=1.0, err_msg=name)
    keyed = read_photo(tmp_path / "keyed.png").alpha
    np.testing.assert_array_equal(np.asarray(keyed)[0] == 0, ramp[0] == 30)
    with Image.open(tmp_path / "srgb.png") as tagged, Image.open(tmp_path / "plain.png") as plain:
        assert in_srgb(tagged) is tagged  # nothing to convert: the photo as read
        np.testing.assert_array_equal(np.asarray(tagged), np.asarray(plain))
    np.testing.assert_allclose(read_photo(tmp_path / "linear.png").lightness[0] * 100, neutral_lightness(ramp[0], 1.0),
                               atol=1.0)


def test_a_cmyk_photo_is_read_through_its_printers_profile_and_a_tiffs_premultiplied_gray_alpha_is_read(tmp_path):
    from icc import cmyk_gray_ink

    # pure cyan ink, under a profile in which every ink only darkens: black (Pillow alone makes it cyan, L 91)
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "print.tif", icc_profile=cmyk_gray_ink())
    assert read_photo(tmp_path / "print.tif").lightness.max() * 100 < 1.0
    # gray with associated (premultiplied) alpha, which Pillow opens as "La" and converts to nothing else
    Image.new("LA", (8, 8), (100, 128)).save(tmp_path / "la.tif")
    tiff = bytearray((tmp_path / "la.tif").read_bytes())
    extra_samples = tiff.find((338).to_bytes(2, "little"))  # its tag entry: 2 unassociated → 1 associated
    tiff[extra_samples + 8] = 1
    (tmp_path / "la.tif").write_bytes(bytes(tiff))
    with Image.open(tmp_path / "la.tif") as opened:
        assert opened.mode == "La"
    photo = read_photo(tmp_path / "la.tif", (MODEL_SIZE, MODEL_SIZE))
    assert np.asarray(photo.alpha).max() == 128 and photo.small.shape == (MODEL_SIZE, MODEL_SIZE)
    gray = Image.new("L", (8, 8), round(100 * 255 / 128))  # its gray unpremultiplied: 199
    np.testing.assert_allclose(photo.lightness, read_photo_of(gray, tmp_path).lightness, atol=0.01)


def read_photo_of(image: Image.Image, folder: Path):
    image.save(folder / "reference.png")
    return read_photo(folder / "reference.png")


def test_an_output_folder_that_is_a_file_is_one_line_and_one_that_holds_the_photos_works(tmp_path, models,
                                                                                        rgb_photos):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(rgb_photos[0]).save(photos / "a.png")
    (tmp_path / "notes").write_text("a file, not a folder")
    for out_dir in (tmp_path / "notes", tmp_path / "notes" / "sub"):
        with pytest.raises(ChromalabError, match="is a file, not a folder") as err:
            run([photos], models, out_dir=out_dir)
        assert "\n" not in str(err.value)
    # a folder that takes no files (even root cannot write under /proc) is found out before any colouring
    with pytest.raises(ChromalabError, match=r"^--out /proc/1/chromalab: cannot write there \(.+\); name another"):
        run([photos], models, out_dir=Path("/proc/1/chromalab"))
    # -o the folder itself, or the one above it: the photos are still found (outputs mirror under -o)
    assert run([photos], models, out_dir=photos).done == [photos / "photos" / "a_color.png"]
    assert run([photos], models, out_dir=photos).skipped == [photos / "a.png"]  # its outputs are not new photos
    others = tmp_path / "above" / "others"
    others.mkdir(parents=True)
    Image.fromarray(rgb_photos[1]).save(others / "b.png")
    assert run([others], models, out_dir=others.parent).done == [others / "b_color.png"]


def test_your_own_photo_named_like_an_output_is_coloured_and_a_rerun_in_place_colours_nothing_twice(
        tmp_path, models, rgb_photos):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(rgb_photos[0]).save(photos / "rose.jpg")
    Image.fromarray(rgb_photos[1]).save(photos / "rose_color.jpg")  # yours, not colorize's: no EXIF mark
    first = run([photos], models)
    assert first.done == [photos / "rose_color_color.jpg"]  # yours, coloured
    # rose.jpg's output would be your photo: named, neither skipped as done nor overwritten
    assert [(path, reason.split(" is there")[0]) for path, reason in first.failed] == [
        (photos / "rose.jpg", str(photos / "rose_color.jpg"))]
    yours = (photos / "rose_color.jpg").read_bytes()
    assert run([photos], models, overwrite=True).done == [photos / "rose_color_color.jpg"]  # not even asked to
    assert (photos / "rose_color.jpg").read_bytes() == yours
    again = run([photos], models, out_dir=tmp_path / "out")
    assert sorted(again.done) == [tmp_path / "out/photos/rose_color.jpg", tmp_path / "out/photos/rose_color_color.jpg"]
    assert run([photos], models).done == []  # a re-run in place colours nothing twice


def test_outputs_of_an_earlier_run_into_another_folder_inside_the_input_are_not_photos(tmp_path, models, rgb_photos):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(("a.jpg", "b.png")):
        Image.fromarray(rgb_photos[i]).save(photos / name)
    first = run([photos], models, out_dir=photos / "first", compare=True)
    assert len(first.done) == 2
    second = run([photos], models, out_dir=photos / "second")  # first/ is no output of this run
    assert sorted(second.done) == [photos / "second" / "photos" / "a_color.jpg",
                                   photos / "second" / "photos" / "b_color.png"]
    assert not second.failed and not second.skipped
    (photos / "first" / "photos" / "a_color.jpg").rename(photos / "renamed.jpg")  # whatever its name
    assert run([photos], models, out_dir=photos / "third").done == [photos / "third" / "photos" / "a_color.jpg",
                                                                    photos / "third" / "photos" / "b_color.png"]
    assert run([photos / "renamed.jpg"], models).done == [photos / "renamed_color.jpg"]  # named: coloured anyway


def test_16_bit_gray_uses_its_full_range(tmp_path, models):
    levels = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (32, 1))
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    run([tmp_path / "deep.png"], models)
    expected = rgb_to_lab_norm(np.repeat(levels[..., None], 3, axis=-1))[..., 0] * 100
    out_l = lightness(tmp_path / "deep_color.png")
    assert out_l.shape == levels.shape
    assert np.abs(out_l - expected)[:, 4:-4].max() < 1.5  # away from pure black/white, where the tint clips


@pytest.mark.parametrize("white", [1.0, 255.0, 65535.0])
def test_32_bit_float_gray_is_read_as_0_to_1_or_on_the_8_or_16_bit_scale_its_values_show(tmp_path, models, white):
    levels = np.tile(np.linspace(0.0, 1.0, 48, dtype=np.float32), (32, 1))
    Image.fromarray(levels * np.float32(white), mode="F").save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    run([tmp_path / "float.tif"], models)
    expected = rgb_to_lab_norm(np.repeat(levels[..., None], 3, axis=-1))[..., 0] * 100
    assert np.abs(lightness(tmp_path / "float_color.png") - expected)[:, 4:-4].max() < 1.5


def test_a_cielab_tiff_is_coloured_from_its_own_lightness(tmp_path, models):
    lightness_levels = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (32, 1))  # L* 0-100 as 0-255
    chroma = np.full_like(lightness_levels, 140)
    Image.merge("LAB", [Image.fromarray(band) for band in (lightness_levels, chroma, chroma)]).save(tmp_path / "lab.tif")
    assert Image.open(tmp_path / "lab.tif").mode == "LAB"
    report = run([tmp_path / "lab.tif"], models)
    assert report.done == [tmp_path / "lab_color.png"] and not report.failed
    expected = lightness_levels / 2.55
    assert np.abs(lightness(tmp_path / "lab_color.png") - expected)[:, 4:-4].max() < 1.5


def test_palette_images_with_and_without_transparency(tmp_path, models, rgb_photos):
    palette = Image.fromarray(rgb_photos[3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.save(tmp_path / "pal.png")
    transparent = palette.copy()
    transparent.info["transparency"] = int(np.asarray(palette)[0, 0])
    transparent.save(tmp_path / "pal_t.png", transparency=transparent.info["transparency"])
    report = run([tmp_path / "pal.png", tmp_path / "pal_t.png"], models)
    assert len(report.done) == 2 and not report.failed
    expected_l = lightness(palette)
    with Image.open(tmp_path / "pal_color.png") as out:
        assert out.mode == "RGB"
        assert np.median(np.abs(lightness(out) - expected_l)) < 0.5
    with Image.open(tmp_path / "pal_t_color.png") as out:
        assert out.mode == "RGBA"
        clear = np.asarray(palette) == transparent.info["transparency"]
        np.testing.assert_array_equal(np.asarray(out.getchannel("A")) == 0, clear)


def test_exif_rotation_is_applied(tmp_path, models, rgb_photos):
    stored = Image.fromarray(rgb_photos[0][:, :40])  # 40 wide, 64 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg"))
    assert upright.size == (64, 40)
    run([tmp_path / "phone.jpg"], models)
    with Image.open(tmp_path / "phone_color.jpg") as out:
        assert out.size == (64, 40)
        assert np.abs(lightness(out) - lightness(upright)).mean() < 1.5


@pytest.mark.parametrize("name", ["phone.jpg", "scan.png", "scan.tiff"])
def test_the_photos_exif_is_kept_but_its_orientation_which_is_applied(tmp_path, models, rgb_photos, name):
    """A family photo's date, camera and copyright survive colouring (they were all dropped)."""
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Copyright], exif[ExifTags.Base.Artist] = "(c) Grandma", "Grandpa"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "1962:07:14 10:30:00"
    Image.fromarray(rgb_photos[0][:, :40]).save(tmp_path / name, exif=exif)
    (output,) = run([tmp_path / name], models).done
    with Image.open(output) as out:
        kept = out.getexif()
        assert out.size == (64, 40)  # upright
    assert ExifTags.Base.Orientation not in kept  # applied: a viewer must not turn it again
    assert (kept[ExifTags.Base.Copyright], kept[ExifTags.Base.Artist]) == ("(c) Grandma", "Grandpa")
    if not name.endswith(".tiff"):  # Pillow's TIFF writer leaves the Exif sub-IFD out of the input
        assert kept.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == "1962:07:14 10:30:00"
    assert kept[ExifTags.Base.Software] == "chromalab colorize"
    assert ExifTags.Base.StripOffsets not in kept and ExifTags.Base.ImageWidth not in kept  # a TIFF's own layout


def test_exif_text_keeps_its_bytes_and_bulky_or_damaged_exif_never_stops_the_photo(tmp_path, models, rgb_photos):
    """UTF-8 text (phones write it) came back as '?'; a 70 KB maker note took the rest with it; a tag whose type
    was damaged made Pillow's writer raise, stopping the whole run."""
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Artist] = "Grand-mère Noël".encode()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.MakerNote] = b"\x01" * 70_000
    Image.fromarray(rgb_photos[0]).save(tmp_path / "phone.png", exif=exif)
    damaged = Image.Exif()
    damaged[ExifTags.Base.XResolution] = 72.0
    tiff = bytearray(damaged.tobytes())
    at = tiff.index(b"\x01\x1a\x00\x05") + 2  # big-endian XResolution, type RATIONAL...
    tiff[at:at + 2] = b"\x00\x02"  # ...now ASCII
    Image.fromarray(rgb_photos[1]).save(tmp_path / "damaged.jpg", exif=bytes(tiff))
    damaged[ExifTags.Base.Orientation] = 6  # beside the damaged tag: Pillow's exif_transpose raised struct.error
    tiff = bytearray(damaged.tobytes())
    at = tiff.index(b"\x01\x1a\x00\x05") + 2
    tiff[at:at + 2] = b"\x00\x02"
    Image.fromarray(rgb_photos[3][:, :40]).save(tmp_path / "turned.jpg", exif=bytes(tiff))

    artist = Image.Exif()
    artist[ExifTags.Base.Artist] = "me"
    Image.fromarray(rgb_photos[2]).save(tmp_path / "plain.jpg", exif=artist)

    report = run([tmp_path / "phone.png", tmp_path / "damaged.jpg", tmp_path / "plain.jpg", tmp_path / "turned.jpg"],
                 models)
    assert sorted(p.name for p in report.done) == ["damaged_color.jpg", "phone_color.png", "plain_color.jpg",
                                                   "turned_color.jpg"]
    with Image.open(tmp_path / "turned_color.jpg") as out:
        assert out.size == (64, 40)  # turned upright all the same
    with Image.open(tmp_path / "phone_color.png") as out:
        kept = out.getexif()
    assert kept[ExifTags.Base.Artist].encode("latin-1").decode() == "Grand-mère Noël"
    assert ExifTags.Base.MakerNote not in kept.get_ifd(ExifTags.IFD.Exif)
    with Image.open(tmp_path / "plain_color.jpg") as out:  # no empty Exif or GPS block made up beside it
        assert sorted(out.getexif()) == [ExifTags.Base.Software, ExifTags.Base.Artist]


def test_formats_are_kept_or_become_png(tmp_path, models, rgb_photos):
    image = Image.fromarray(rgb_photos[1])
    for name in ("a.JPG", "b.webp", "c.bmp", "d.tiff"):
        image.save(tmp_path / name)
    report = run([tmp_path], models)
    assert sorted(p.name for p in report.done) == ["a_color.JPG", "b_color.webp", "c_color.png", "d_color.png"]
    assert [Image.open(p).format for p in sorted(report.done)] == ["JPEG", "WEBP", "PNG", "PNG"]


def test_an_animation_has_its_first_frame_coloured_and_says_so(tmp_path, models, rgb_photos, capsys):
    first, second = (Image.fromarray(photo) for photo in rgb_photos[:2])
    first.save(tmp_path / "moving.png", save_all=True, append_images=[second])  # an animated PNG
    first.save(tmp_path / "still.png")
    report = run([tmp_path / "moving.png", tmp_path / "still.png"], models)
    assert sorted(p.name for p in report.done) == ["moving_color.png", "still_color.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "moving_color.png")),
                                  np.asarray(Image.open(tmp_path / "still_color.png")))
    said = capsys.readouterr().err
    assert f"{tmp_path / 'moving.png'}: 2 frames" in said and "still.png" not in said


def test_a_panorama_is_coloured_and_only_a_strip_thinner_than_64_to_1_is_refused(tmp_path, models):
    Image.new("RGB", (2, 128), (120, 90, 60)).save(tmp_path / "tall.png")  # 64:1, the most there is
    Image.new("RGB", (129, 2), (120, 90, 60)).save(tmp_path / "wide.png")
    report = run([tmp_path / "tall.png", tmp_path / "wide.png"], models)
    assert report.done == [tmp_path / "tall_color.png"]
    assert [(path.name, reason.split(":")[0]) for path, reason in report.failed] == [
        ("wide.png", "the photo is 129×2 pixels, a strip rather than a photo")]


def test_a_jpeg_copy_holds_65535_pixels_a_side_and_a_webp_one_16383():
    from chromalab.colorize.photos import UnusableSize, _check_size

    for output_format, limit in (("JPEG", 65_535), ("WEBP", 16_383)):
        _check_size(limit, limit // 64 + 1, output_format)
        with pytest.raises(UnusableSize, match=rf"written as \w+, can be at most {limit:,} a side"):
            _check_size(limit + 1, limit // 64 + 1, output_format)
    _check_size(65_536, 1_024, "PNG")


def test_a_photo_longer_than_its_output_format_holds_is_refused_in_words_and_the_rest_are_done(tmp_path, models):
    """A PNG named .webp, 16,400 pixels wide: WebP's encoder raised ValueError, which stopped the whole run."""
    Image.new("RGB", (16_400, 300), (120, 90, 60)).save(tmp_path / "pano.webp", "PNG")
    Image.new("RGB", (64, 48), (120, 90, 60)).save(tmp_path / "small.webp", "WEBP")
    report = run([tmp_path / "pano.webp", tmp_path / "small.webp"], models)
    assert report.done == [tmp_path / "small_color.webp"]
    assert report.failed == [(tmp_path / "pano.webp", "the photo is 16400×300 pixels, and its coloured copy, written "
                              "as WebP, can be at most 16,383 a side: resize it, or convert it to PNG or TIFF (whose copies are PNG) first. "
                              "chromalab reads JPEG, PNG, WebP, BMP and TIFF photos.")]


def test_hidden_files_and_folders_are_not_the_users_photos(tmp_path, models, rgb_photos):
    """A viewer's `.thumbnails/` and macOS's `._` twins (AppleDouble: not a photo at all) were coloured or failed
    the run, where the folder data source has always skipped them."""
    photos = tmp_path / "photos"
    (photos / ".thumbnails").mkdir(parents=True)
    Image.fromarray(rgb_photos[0]).save(photos / "a.jpg")
    Image.fromarray(rgb_photos[0][:16, :16]).save(photos / ".thumbnails" / "a.jpg")
    (photos / "._a.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    report = run([photos], models, out_dir=tmp_path / "out")
    assert report.done == [tmp_path / "out" / "photos" / "a_color.jpg"] and report.failed == []


def test_folder_with_a_corrupt_photo_does_the_rest_and_the_cli_fails(tmp_path, models, rgb_photos):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rgb_photos[0]).save(folder / "one.jpg")
    Image.fromarray(rgb_photos[1]).save(folder / "sub" / "two.png")
    good = io.BytesIO()
    Image.fromarray(rgb_photos[2]).save(good, format="JPEG")
    (folder / "broken.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # truncated download
    (folder / "notes.txt").write_text("not a photo, not looked at")
    out = tmp_path / "out"
    report = run([folder], models, out_dir=out)
    assert sorted(report.done) == [out / "in" / "one_color.jpg", out / "in" / "sub" / "two_color.png"]
    assert [p for p, _ in report.failed] == [folder / "broken.jpg"]
    assert "truncated" in report.failed[0][1]
    assert not list(out.rglob(".*.tmp"))

    result = CliRunner().invoke(app, ["colorize", str(folder), "--out", str(tmp_path / "cli"),
                                      "--model", str(models["tint"])])
    assert result.exit_code == 1
    assert "broken.jpg" in result.output and "1 of 3 photo(s) failed" in result.output
    assert (tmp_path / "cli" / "in" / "sub" / "two_color.png").is_file()


def test_a_missing_path_fails_alone_and_says_why(tmp_path, models, rgb_photos):
    import os

    Image.fromarray(rgb_photos[0]).save(tmp_path / "here.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "moved.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    report = run([tmp_path / "gone.jpg", tmp_path / "dangling.jpg", tmp_path / "pipe.jpg", tmp_path / "here.jpg"],
                 models)
    assert report.failed == [(tmp_path / "gone.jpg", "no such file or folder"),
                             (tmp_path / "dangling.jpg", f"a link to {tmp_path / 'moved.jpg'}, which does not exist"),
                             (tmp_path / "pipe.jpg", "not a regular file or folder (a pipe or a device?)")]
    assert report.done == [tmp_path / "here_color.jpg"] and report.total == 4


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, models, rgb_photos):
    Image.fromarray(rgb_photos[0]).save(tmp_path / "x.png")
    run([tmp_path], models, model="random")
    first = (tmp_path / "x_color.png").read_bytes()

    again = run([tmp_path], models)  # the folder now also holds x_color.png: an output, not a new photo
    assert again.skipped == [tmp_path / "x.png"] and not again.done and again.total == 1
    assert (tmp_path / "x_color.png").read_bytes() == first

    replaced = run([tmp_path], models, overwrite=True)
    assert replaced.done == [tmp_path / "x_color.png"]
    assert (tmp_path / "x_color.png").read_bytes() != first
    assert not (tmp_path / "x_color_color.png").exists()


def test_an_input_is_never_written_over_without_overwrite(tmp_path, models, rgb_photos):
    Image.fromarray(rgb_photos[0]).save(tmp_path / "y.png")
    Image.fromarray(rgb_photos[1]).save(tmp_path / "y_color.png")  # a user's photo that happens to be named so
    original = (tmp_path / "y_color.png").read_bytes()
    report = run([tmp_path / "y.png", tmp_path / "y_color.png"], models)
    # y.png is not done: said so, not counted as skipped (its output "exists", but is the user's photo)
    assert [path for path, _ in report.failed] == [tmp_path / "y.png"] and report.skipped == []
    assert report.done == [tmp_path / "y_color_color.png"]
    assert (tmp_path / "y_color.png").read_bytes() == original


def test_compare_sheet_is_gray_input_beside_the_colour(tmp_path, models, rgb_photos):
    Image.fromarray(rgb_photos[2][:, :48]).save(tmp_path / "c.png")
    run([tmp_path / "c.png"], models, compare=True)
    with Image.open(tmp_path / "c_compare.jpg") as sheet:
        assert sheet.format == "JPEG" and sheet.size == (96, 64)
        ab = rgb_to_lab_norm(np.asarray(sheet))[..., 1:] * 128
    assert np.abs(ab[:, :44]).mean() < 1.0  # gray half (JPEG noise aside)
    assert np.median(ab[16:-16, 52:], axis=(0, 1))[1] > 5  # the tinted half


def test_a_photo_whose_sheet_exists_but_not_its_colour_gets_its_colour_and_keeps_the_sheet(tmp_path, models,
                                                                                          rgb_photos):
    # what a kill between a photo's two writes leaves (the sheet is written first), or a file of the user's:
    # either way it is whole, and nothing is overwritten without --overwrite
    Image.fromarray(rgb_photos[0]).save(tmp_path / "k.png")
    (tmp_path / "k_compare.jpg").write_bytes(b"a sheet, or the user's own file")
    stale, users = tmp_path / ".k_color.png.0123abcd.tmp", tmp_path / ".notes.txt.0123abcd.tmp"
    for path in (stale, users):
        path.write_bytes(b"a write a kill cut short")
    report = run([tmp_path / "k.png"], models, compare=True)
    assert report.done == [tmp_path / "k_color.png"] and not report.skipped
    assert (tmp_path / "k_compare.jpg").read_bytes() == b"a sheet, or the user's own file"
    assert not stale.exists() and users.exists()  # in the user's folder, only its own outputs' leftovers go


def test_outputs_written_into_an_input_folder_are_not_taken_for_photos(tmp_path, models, rgb_photos):
    for folder, rgb in (("a", rgb_photos[0]), ("b", rgb_photos[1])):
        (tmp_path / folder).mkdir()
        Image.fromarray(rgb).save(tmp_path / folder / f"{folder}1.png")
    first = run([tmp_path / "a", tmp_path / "b"], models, out_dir=tmp_path / "a")
    assert sorted(first.done) == [tmp_path / "a/a/a1_color.png", tmp_path / "a/b/b1_color.png"]
    again = run([tmp_path / "a", tmp_path / "b"], models, out_dir=tmp_path / "a")
    assert sorted(again.skipped) == [tmp_path / "a/a1.png", tmp_path / "b/b1.png"] and not again.done


def test_a_folder_of_colorize_outputs_alone_says_so_not_that_it_holds_no_photos(tmp_path, models, rgb_photos,
                                                                                capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb_photos[0]).save(tmp_path / "in" / "p.png")
    run([tmp_path / "in"], models, out_dir=tmp_path / "out")
    with pytest.raises(ChromalabError, match=rf"^{tmp_path / 'out'}: only colorize's own outputs here \(1\); name "):
        run([tmp_path / "out"], models)
    Image.fromarray(rgb_photos[1]).save(tmp_path / "new.png")  # beside a folder with nothing to colour: said once
    assert run([tmp_path / "out", tmp_path / "new.png"], models).done == [tmp_path / "new_color.png"]
    assert capsys.readouterr().err.count("only colorize's own outputs here") == 1


def test_batching_does_not_mix_photos_up(tmp_path, models, rgb_photos):
    for i, rgb in enumerate(rgb_photos[:3]):
        (tmp_path / "in").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / "in" / f"p{i}.png")
    one = run([tmp_path / "in"], models, model="random", out_dir=tmp_path / "one", batch_size=1)
    two = run([tmp_path / "in"], models, model="random", out_dir=tmp_path / "two", batch_size=2)
    assert len(one.done) == len(two.done) == 3
    for a, b in zip(sorted(one.done), sorted(two.done)):
        np.testing.assert_allclose(np.asarray(Image.open(a), dtype=int), np.asarray(Image.open(b), dtype=int),
                                   atol=1)


def test_interrupted_write_leaves_no_partial_output(tmp_path, models, rgb_photos, monkeypatch):
    Image.fromarray(rgb_photos[0]).save(tmp_path / "z.png")

    def failing_save(self, fp, format=None, **options):
        fp.write(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    report = run([tmp_path / "z.png"], models)
    assert report.failed == [(tmp_path / "z.png", "OSError: No space left on device")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.png"]


def test_nothing_to_colour_and_bad_models_are_one_line_errors(tmp_path, models, rgb_photos, capsys):
    with pytest.raises(ChromalabError, match=rf"^{tmp_path}: no photos here \(looked for .jpg, .jpeg, "):
        run([tmp_path], models)
    assert "no photos here" not in capsys.readouterr().err  # said once, in the error
    Image.fromarray(rgb_photos[0]).save(tmp_path / "p.png")
    with pytest.raises(ChromalabError, match=r"dvc repro train@gan.*chromalab train gan"):
        colorize_paths([tmp_path], tmp_path / "out", model="gan", models_root=tmp_path / "models")
    assert not (tmp_path / "out").exists()  # a failed run leaves no empty --out folder behind
    with pytest.raises(ChromalabError, match="a .keras file"):
        load_colorizer("resnet")
    with pytest.raises(ChromalabError, match="does not exist"):
        load_colorizer(str(tmp_path / "nope.keras"))
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(ChromalabError, match="cannot load model"):
        load_colorizer(str(tmp_path / "bad.keras"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as damaged:  # a zip, but its config is no model's
        damaged.writestr("config.json", "{}")
    with pytest.raises(ChromalabError, match="empty.keras: .*describes a dict, not a Keras model"):
        load_colorizer(str(tmp_path / "empty.keras"))


def test_a_full_disk_stops_the_run_at_the_first_photo_it_refuses_and_the_re_run_does_the_rest(
        tmp_path, models, rgb_photos, monkeypatch):
    """Every photo after the first refused would be decoded, coloured and refused alike (hours for a big folder,
    a line each): the run stops there, and the same command, once there is room, colours only the rest."""
    from chromalab.colorize import command

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        Image.fromarray(rgb_photos[i % 4]).save(photos / f"p{i}.png")
    saves, lock = [], threading.Lock()  # the workers write at once: the disk takes the first two, whichever
    real_save = command.save_atomic

    def disk_fills(image, path, *args, **kwargs):
        with lock:
            saves.append(path)
            full = len(saves) > 2
        if full:
            raise OSError(28, "No space left on device", str(path))
        real_save(image, path, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(command, "save_atomic", disk_fills)
        with pytest.raises(ChromalabError, match=r"cannot write .*_color\.png: the disk is full \(.*\): free space "
                                                 r"there, then re-run: finished work is kept$"):
            run([photos], models, out_dir=tmp_path / "out")
    assert len(list((tmp_path / "out").rglob("*_color.png"))) == 2
    report = run([photos], models, out_dir=tmp_path / "out")
    assert len(report.done) == 6 and len(report.skipped) == 2 and not report.failed


def test_a_folder_of_photos_that_takes_no_outputs_is_found_out_before_any_colouring(tmp_path, models, rgb_photos,
                                                                                    monkeypatch):
    import tempfile

    locked = tmp_path / "card"  # a read-only folder (root writes anywhere, so its refusal is made up here)
    locked.mkdir()
    Image.fromarray(rgb_photos[0]).save(locked / "p.png")
    real = tempfile.TemporaryFile

    def refusing(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked:
            raise OSError(30, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "TemporaryFile", refusing)
    with pytest.raises(ChromalabError, match=rf"^cannot write beside the photos in {locked} \(Read-only file "
                                             r"system\): pass --out <a folder> for the outputs$"):
        run([locked], models)
    assert list(locked.iterdir()) == [locked / "p.png"]
    assert run([locked], models, out_dir=tmp_path / "out").done


def test_a_full_temporary_folder_is_named_when_a_model_cannot_be_unpacked(tmp_path, models, monkeypatch):
    """Keras unpacks a .keras file's weights into the temporary folder: when that disk is full, the user is sent
    there (and to TMPDIR), not to the model's own disk, which has room."""
    import tempfile

    from chromalab.colorize import model as model_module

    def unpack(path):
        raise OSError(28, "No space left on device", str(Path(tempfile.gettempdir()) / "tmpk3ras" / "model.weights.h5"))
    monkeypatch.setattr(model_module, "_load_keras_file", unpack)
    with pytest.raises(ChromalabError, match=rf"Keras unpacks it into the temporary folder {tempfile.gettempdir()}: "
                                             r"no space left on device; free space there, or set TMPDIR"):
        load_colorizer(str(models["tint"]))

    def unreadable(path):  # the model file itself, kept in the temporary folder: its own fault, not the folder's
        raise OSError(5, "Input/output error", str(path))
    monkeypatch.setattr(model_module, "_load_keras_file", unreadable)
    with pytest.raises(ChromalabError, match=r"^cannot load model .*tint\.keras: OSError: \[Errno 5\] Input/output"):
        load_colorizer(str(models["tint"]))


def test_named_models_load_from_models_root(tmp_path, models, rgb_photos):
    root = tmp_path / "models"
    (root / "baseline").mkdir(parents=True)
    (root / "baseline" / "model.keras").write_bytes(models["tint"].read_bytes())
    Image.fromarray(rgb_photos[0]).save(tmp_path / "p.png")
    report = colorize_paths([tmp_path / "p.png"], model="baseline", models_root=root)
    assert report.done == [tmp_path / "p_color.png"]


def test_named_models_are_found_from_your_photos_folder(tmp_path, models, rgb_photos, monkeypatch):
    """`chromalab colorize gan` run outside the repository uses the trained models of the checkout chromalab is
    installed from; it looked for ./models and told the user to train again."""
    checkout, photos = tmp_path / "repo", tmp_path / "photos"
    (checkout / "models" / "gan").mkdir(parents=True)
    (checkout / "dvc.yaml").write_text("stages: {}\n")
    (checkout / "models" / "gan" / "model.keras").write_bytes(models["tint"].read_bytes())
    photos.mkdir()
    Image.fromarray(rgb_photos[0]).save(photos / "p.png")
    monkeypatch.setattr("chromalab.colorize.model.CHECKOUT", checkout)
    monkeypatch.chdir(photos)
    assert colorize_paths([Path("p.png")], model="gan").done == [Path("p_color.png")]
    with pytest.raises(ChromalabError, match=r"^no trained baseline model in .*photos: run chromalab from the "
                                             r"repository root, or pass --model path/to/baseline/model.keras$"):
        colorize_paths([Path("p.png")], model="baseline", overwrite=True)


def test_a_missing_model_that_dvc_lock_records_is_brought_back_by_dvc_checkout_not_retrained(tmp_path):
    """A failed `dvc exp run -S gan.epochs=abc` has DVC delete the model before the stage fails: checkout, not
    hours of training, brings it back."""
    from chromalab.config import trained_model_path

    with pytest.raises(ChromalabError, match="train the gan model first"):
        trained_model_path("gan", tmp_path / "models")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train@gan:\n    outs:\n"
                                       "    - path: models/gan/model.keras\n      md5: 0123\n")
    with pytest.raises(ChromalabError, match=r"model.keras does not exist, but dvc.lock records it: `dvc checkout "):
        trained_model_path("gan", tmp_path / "models")


def test_mlflow_model_uri(tmp_path, models, rgb_photos, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as active:
        # Requirements given: MLflow would otherwise infer them by loading the model in a subprocess (~40 s).
        mlflow.keras.log_model(keras.saving.load_model(models["tint"]), name="model", pip_requirements=["keras"])
    Image.fromarray(rgb_photos[0]).save(tmp_path / "p.png")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    report = colorize_paths([tmp_path / "p.png"], model=f"runs:/{active.info.run_id}/model")
    assert report.done == [tmp_path / "p_color.png"]
    assert list(temp.iterdir()) == []  # MLflow's download of the model is not left behind
    with pytest.raises(ChromalabError, match="cannot load MLflow model"):
        load_colorizer("runs:/0123456789abcdef/model")
    # outside the repository that trained it, with no MLFLOW_TRACKING_URI: said so, and no empty mlflow.db made
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ChromalabError, match=rf"^no MLflow store at {elsewhere / 'mlflow.db'}: run this in the "):
        load_colorizer("models:/chromalab-gan@champion")
    assert list(elsewhere.iterdir()) == []


def test_an_mlflow_model_on_a_server_that_is_down_fails_in_seconds_not_minutes(monkeypatch):
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(ChromalabError, match=f"MLflow tracking server {uri} is unreachable"):
        load_colorizer("models:/chromalab-gan@champion")
    assert time.monotonic() - started < 15  # MLflow's own retries took 250 s


def test_read_photo_gives_full_resolution_lightness(tmp_path, rgb_photos):
    Image.fromarray(rgb_photos[0]).save(tmp_path / "p.png")
    photo = read_photo(tmp_path / "p.png")
    assert photo.alpha is None and photo.lightness.dtype == np.float32
    np.testing.assert_allclose(photo.lightness, rgb_to_lab_norm(rgb_photos[0])[..., 0], atol=1e-6)


def test_folders_keep_their_names_under_out_and_clashes_fail(tmp_path, models, rgb_photos):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rgb_photos[0]).save(tmp_path / folder / "p.jpg")
    out = tmp_path / "out"
    report = run([tmp_path / "a", tmp_path / "b"], models, out_dir=out)
    assert sorted(report.done) == [out / "a" / "p_color.jpg", out / "b" / "p_color.jpg"]

    flat = run([tmp_path / "a" / "p.jpg", tmp_path / "b" / "p.jpg"], models, out_dir=tmp_path / "flat")
    assert flat.done == [tmp_path / "flat" / "p_color.jpg"]
    assert [p for p, _ in flat.failed] == [tmp_path / "b" / "p.jpg"]
    assert "colorize it alone with -o <another folder>" in flat.failed[0][1]


def test_a_photo_whose_legal_name_leaves_no_room_for_the_output_tag_is_coloured_under_a_shorter_name(
        tmp_path, models, rgb_photos):
    long_stem = "é" * 125  # 250 bytes: with ".jpg" a legal name, with "_color.jpg" not
    for name in (f"{long_stem}.jpg", "short.jpg"):
        Image.fromarray(rgb_photos[0]).save(tmp_path / name)
    report = run([tmp_path], models, compare=True)
    assert not report.failed and len(report.done) == 2
    outputs = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(("_color.jpg", "_compare.jpg")))
    assert outputs == sorted([f"{'é' * 122}_color.jpg", f"{'é' * 121}_compare.jpg", "short_color.jpg",
                              "short_compare.jpg"])  # a character the cut would split is left out whole


def test_ab_is_upsampled_bilinearly_a_few_rows_at_a_time_as_in_one_pass():
    from chromalab.colorize import ab_rows

    ab_small = np.random.default_rng(3).uniform(-0.5, 0.5, (16, 12, 2)).astype(np.float32)
    size = (301, 257)
    fill = ab_rows(ab_small, size)
    stripes = np.empty((*size, 2), dtype=np.float32)
    for top in range(0, size[0], 7):  # uneven stripes, the last one short
        rows = slice(top, min(top + 7, size[0]))
        planes = np.empty((2, rows.stop - rows.start, size[1]), dtype=np.float32)
        fill(rows, *planes)
        stripes[rows] = np.moveaxis(planes, 0, -1)
    # Pillow's bilinear filter, one channel at a time over the whole image, is the reference
    whole = np.stack([np.asarray(Image.fromarray(ab_small[..., c]).resize(size[::-1], Image.Resampling.BILINEAR))
                      for c in range(2)], axis=-1)
    np.testing.assert_allclose(stripes, whole, atol=1e-5)


def test_the_models_input_from_a_draft_decoded_jpeg_matches_filtering_the_full_photo(tmp_path, rgb_photos):
    big = Image.fromarray(rgb_photos[0]).resize((1600, 1200), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=95)
    photo = read_photo(tmp_path / "big.jpg", (64, 64))
    assert photo.lightness.shape == (1200, 1600) and photo.small.shape == (64, 64)
    full = np.asarray(Image.fromarray(photo.lightness).resize((64, 64), Image.Resampling.LANCZOS))
    assert np.abs(photo.small - full).mean() < 0.01  # within 1 L unit on average


def test_a_file_name_cannot_write_to_the_terminal(tmp_path, models, capfd):
    """A name from a downloaded archive, holding escape sequences: printed as is, it erased the error and faked a
    green success line, or retitled the terminal. Its control characters are shown escaped instead."""
    from chromalab.cli import main

    fake = "x\x1b[2K\r\x1b[32mall photos coloured fine\x1b[0m\n"
    (tmp_path / f"{fake}.jpg").write_bytes(b"not a photo")
    with pytest.raises(SystemExit):
        main(["colorize", str(tmp_path / f"{fake}.jpg"), "--model", str(models["tint"])])
    named = [line for line in re.split(r"[\r\n]", capfd.readouterr().err) if "coloured fine" in line]
    assert named == [f"{tmp_path}/x\\x1b[2K\\r\\x1b[32mall photos coloured fine\\x1b[0m\\n.jpg: not a photo: "
                     "the file holds text. chromalab reads JPEG, PNG, WebP, BMP and TIFF photos."]
    retitle = tmp_path / "y\x1b]0;TITLE\x07"
    retitle.write_bytes(b"a file, named as the folder for the outputs")
    with pytest.raises(SystemExit):
        main(["colorize", str(tmp_path), "-o", str(retitle), "--model", str(models["tint"])])
    assert capfd.readouterr().err.splitlines()[-1].startswith(f"error: --out {tmp_path}/y\\x1b]0;TITLE\\x07: ")


def test_bad_files_are_named_in_the_users_words_and_verbose_adds_the_detail(tmp_path, models, rgb_photos):
    from bad_files import assert_in_user_words, bad_files

    files = bad_files()
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    Image.fromarray(rgb_photos[0]).save(tmp_path / "good.png")
    report = run([tmp_path / name for name in [*files, "good.png"]], models)
    assert [p.name for p in report.done] == ["good_color.png"]
    reasons = dict((p.name, reason) for p, reason in report.failed)
    for name, (_, problem) in files.items():
        assert_in_user_words(reasons[name], problem)

    command = ["colorize", *(str(tmp_path / name) for name in files), "--model", str(models["tint"])]
    quiet = CliRunner().invoke(app, command)
    assert quiet.exit_code == 1 and f"{len(files)} of {len(files)} photo(s) failed" in quiet.output
    for name, (_, problem) in files.items():
        (line,) = [line for line in quiet.output.splitlines() if line.startswith(str(tmp_path / name))]
        assert_in_user_words(line, problem)
    verbose = CliRunner().invoke(app, ["-v", *command])
    assert "[UnidentifiedImageError: cannot identify image file" in verbose.output
    assert "[OSError: image file is truncated" in verbose.output


def test_a_photo_too_large_to_decode_is_named_with_the_limit(tmp_path, models):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a PNG that says it is 20000 × 20000 (400 megapixels): Pillow refuses it as a decompression bomb
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    (reason,) = [reason for _, reason in run([tmp_path / "huge.png"], models).failed]
    assert reason == "the photo is too large: 400 megapixels, where chromalab reads photos of up to 179 megapixels"


def _tiff_with_a_tag_past_its_end(rgb: np.ndarray) -> bytes:
    """A TIFF whose description claims a million bytes: Pillow skips the tag, with a warning, and reads the photo."""
    import struct

    from PIL import TiffImagePlugin

    buffer, tags = io.BytesIO(), TiffImagePlugin.ImageFileDirectory_v2()
    tags[270] = "a description"
    Image.fromarray(rgb).save(buffer, "TIFF", tiffinfo=tags)
    data = bytearray(buffer.getvalue())  # little-endian ("II"): the first IFD's offset at byte 4
    ifd = struct.unpack_from("<I", data, 4)[0]
    entry = next(ifd + 2 + 12 * i for i in range(struct.unpack_from("<H", data, ifd)[0])
                 if struct.unpack_from("<H", data, ifd + 2 + 12 * i)[0] == 270)
    struct.pack_into("<I", data, entry + 4, 10 ** 6)  # its count
    return bytes(data)


@pytest.mark.parametrize("name", ["exif.jpg", "tag.tif"])
def test_a_photo_with_broken_exif_or_tags_is_coloured_without_pillows_warning_unless_verbose(
        tmp_path, models, rgb_photos, name):
    import warnings

    photo = tmp_path / name
    if name == "exif.jpg":
        Image.fromarray(rgb_photos[0]).save(photo, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 40)
    else:
        photo.write_bytes(_tiff_with_a_tag_past_its_end(rgb_photos[0]))
    for options, shown in (([], False), (["-v"], True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every warning, as if first seen
            result = CliRunner().invoke(app, [*options, "colorize", str(photo), "--model", str(models["tint"]),
                                              "--overwrite"])
        assert result.exit_code == 0, result.output
        assert any(w.category is UserWarning and "PIL" in w.filename for w in caught) == shown
    assert len([p for p in tmp_path.iterdir() if "_color." in p.name]) == 1
