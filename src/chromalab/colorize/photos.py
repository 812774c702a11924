"""A photo's pixels in `colorize`: decoded upright into its full-resolution lightness (and alpha) and the
model's small input, then joined with the model's ab, upsampled, into the coloured photo; the side-by-side
sheet; atomic saving; and, for a file that cannot be read, what was wrong with it in the user's words."""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, TiffTags

from chromalab.color import AbSource, lab_rows_to_rgb8, rgb8_lightness_norm, rgb_to_lab_norm
from chromalab.colorize.model import model_input_size
from chromalab.files import (OUTPUT_SOFTWARE, PHOTO_FORMATS, READ_ERRORS, atomic_file, decoder_starved, in_srgb,
                             over_white, signature_format, upright)

SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "PNG": {}}
# EXIF fits one JPEG APP1 segment (64 KiB, less its header).
MAX_EXIF_BYTES = 65_000
# What an output does not keep of a photo's EXIF: its orientation (the pixels are turned upright), what describes
# the file's own layout (a TIFF's strips, bit depth, colour profile), and the bulky blocks (XMP, which repeats
# the orientation, IPTC, Photoshop's, the camera maker's notes) that a JPEG's 64 KiB could not hold beside it.
NOT_KEPT_EXIF = tuple(getattr(ExifTags.Base, name) for name in (
    "Orientation", "InterColorProfile", "ImageWidth", "ImageLength", "BitsPerSample", "Compression",
    "PhotometricInterpretation", "FillOrder", "StripOffsets", "SamplesPerPixel", "RowsPerStrip", "StripByteCounts",
    "PlanarConfiguration", "Predictor", "ColorMap", "TileWidth", "TileLength", "TileOffsets", "TileByteCounts",
    "ExtraSamples", "SampleFormat", "JpegIFOffset", "JpegIFByteCount", "YCbCrSubSampling", "YCbCrPositioning",
    "ReferenceBlackWhite", "JPEGTables", "XMLPacket", "IPTCNAA", "ImageResources", "MakerNote")) + (
    37724,)  # ImageSourceData (Photoshop's layers), which Pillow has no name for
# A panorama is a few to one; a photo thinner than this is a strip, and resizing one costs gigabytes.
MAX_ASPECT = 64
# The longest side an output format holds (JPEG's header, WebP's frame); PNG's is 2^31 - 1.
MAX_SIDE = {"JPEG": 65_535, "WEBP": 16_383}
COMPARE_MAX_SIDE = 2048  # each half of the side-by-side sheet: a preview, not a second full-size copy
# The lightness of an RGB photo is computed in stripes of a quarter megapixel, so that its temporaries stay
# small whatever the photo's size.
STRIPE_PIXELS = 1 << 18
DOWNSAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0  # Pillow first box-reduces by whole factors down to 3x the target, then filters: much faster
# Pillow's 16-bit grayscale modes ("I" is how some readers deliver 16-bit PNG/TIFF; its values are 0-65535).
GRAY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class UnreadablePhoto(Exception):
    """colour_bytes' photo could not be read; the message says why in the user's words. Only the reading:
    a failure after it (the model, our own code) is not the photo's."""


class UnusableSize(ValueError):
    """A photo Pillow reads but colorize does not colour: its sides are too unequal, or too long for the
    format its coloured copy is written in."""


@dataclass
class Photo:
    """A decoded photo: its lightness at full resolution (L/100, float32 [H, W]) and its alpha, if any,
    and, when read for a model, its lightness at the model's size (`small`, [S, S])."""

    lightness: np.ndarray
    alpha: Image.Image | None
    small: np.ndarray | None = None
    exif: Image.Exif | None = None  # the file's own (date, camera, copyright), but its orientation: it is applied
    frames: int = 1  # an animation or a multi-page file has several; only the first is coloured


def _stripes(height: int, width: int) -> Iterator[slice]:
    rows = max(1, STRIPE_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield slice(top, top + rows)


@functools.cache
def _gray_lightness_table(levels: int) -> np.ndarray:
    """L/100 of every gray level (256 or 65536): a gray photo's L is then an exact table lookup."""
    dtype = np.uint8 if levels == 256 else np.uint16
    gray = np.arange(levels, dtype=dtype)
    return rgb_to_lab_norm(np.repeat(gray[:, None], 3, axis=1))[:, 0]


def _rgb_lightness(rgb: np.ndarray) -> np.ndarray:
    lightness = np.empty(rgb.shape[:2], dtype=np.float32)
    for rows in _stripes(*rgb.shape[:2]):
        lightness[rows] = rgb8_lightness_norm(rgb[rows])
    return lightness


def _float_white(values: np.ndarray) -> float:
    """White of a float gray photo: 1 as scikit-image reads float images, unless its values pass 1, when they
    were saved on an 8- or 16-bit scale (ImageJ, scanners): read 0-1 there, such a photo was all white."""
    brightest = float(values.max(initial=0.0))
    return next(white for white in (1.0, 255.0, 65535.0, brightest) if brightest <= white)


def _lightness_and_alpha(image: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
    if image.mode == "LAB":  # a CIELab TIFF: Pillow cannot make it RGB, and its band "A" is a*, not alpha
        return np.asarray(image.getchannel("L"), dtype=np.float32) / 255.0, None  # L* 0-100 stored as 0-255
    alpha = None
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode in ("RGB", "L") and "transparency" in image.info:  # a PNG's colour key (tRNS)
        image = image.convert("RGBA" if image.mode == "RGB" else "LA")
    if "A" in image.getbands():
        alpha = image.getchannel("A")
        image = image.convert("RGB" if "R" in image.getbands() else "L")
    if image.mode in GRAY16_MODES:
        levels = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return _gray_lightness_table(65536)[levels], alpha
    if image.mode == "F":  # 32-bit float gray (TIFF)
        values = np.nan_to_num(np.asarray(image))
        levels = np.round(np.clip(values / _float_white(values), 0.0, 1.0) * 65535).astype(np.uint16)
        return _gray_lightness_table(65536)[levels], alpha
    if image.mode in ("L", "1"):
        return _gray_lightness_table(256)[np.asarray(image.convert("L"))], alpha
    return _rgb_lightness(np.asarray(image.convert("RGB"))), alpha


def small_lightness(path: Path | io.BytesIO, lightness: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The lightness at the model's size. A JPEG is decoded again in draft mode, straight at 1/2, 1/4 or 1/8
    scale (still at least the model's size): a few milliseconds, where filtering the full-resolution L
    down would cost a full-resolution pass."""
    if hasattr(path, "seek"):
        path.seek(0)  # a file object: read_photo's own decode has moved it
    with Image.open(path) as opened:
        if opened.format == "JPEG" and opened.mode in ("L", "RGB"):
            opened.draft(opened.mode, (max(size), max(size)))
            small, _ = _lightness_and_alpha(in_srgb(upright(opened)))
            return _resize(small, size, DOWNSAMPLE)
    return _resize(lightness, size, DOWNSAMPLE)


def read_photo(path: Path | io.BytesIO, model_size: tuple[int, int] | None = None,
               output_format: str | None = None) -> Photo:
    """Decode a photo upright (EXIF orientation applied), in sRGB (files.in_srgb), into its full-resolution
    lightness and alpha, and, with `model_size` = (height, width), its lightness at that size for the model;
    refused before decoding where its size is no photo's, or more than `output_format` holds."""
    with Image.open(path) as opened:
        _check_size(*opened.size, output_format)
        image = in_srgb(upright(opened))
        exif = _kept_exif(opened)
        frames = 1 if opened.format == "MPO" else getattr(opened, "n_frames", 1)  # MPO: a camera's previews
    lightness, alpha = _lightness_and_alpha(image)
    small = None
    if model_size is not None and alpha is None:
        small = small_lightness(path, lightness, model_size)
    elif model_size is not None:
        small = _lightness_and_alpha(_on_white_at(image, model_size))[0]
    return Photo(lightness, alpha, small, exif, frames)


def _on_white_at(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A transparent photo as the images stage makes a training photo of it: on white (chromalab.files), then
    resized as RGB. Box-reduced first by whole factors, which Pillow averages with the alpha weighing each
    pixel, as on white: the same picture, without compositing the photo at full size."""
    rgba = image.convert("RGBA")
    factors = tuple(max(1, int(side / target / REDUCING_GAP)) for side, target in zip(rgba.size, size[::-1]))
    if max(factors) > 1:
        rgba = rgba.reduce(factors)
    return over_white(rgba).resize(size[::-1], DOWNSAMPLE, reducing_gap=REDUCING_GAP)


def _check_size(width: int, height: int, output_format: str | None) -> None:
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UnusableSize(f"the photo is {width}×{height} pixels, a strip rather than a photo: chromalab colours "
                           f"photos whose long side is at most {MAX_ASPECT} times the short one")
    limit = MAX_SIDE.get(output_format or "")
    if limit and max(width, height) > limit:
        raise UnusableSize(f"the photo is {width}×{height} pixels, and its coloured copy, written as "
                           f"{PILLOW_NAMES.get(output_format, output_format)}, can be at most {limit:,} a side: "
                           "resize it, or convert it to PNG or TIFF (whose copies are PNG) first")


def _kept_exif(opened: Image.Image) -> Image.Exif | None:
    """The EXIF an output keeps (all but NOT_KEPT_EXIF); None if the photo has none, or none Pillow can write
    again. Non-ASCII text keeps its bytes in the main block (artist, copyright, description); in the Exif and GPS
    blocks Pillow knows no text types, so it writes such text with "?" for each byte past ASCII."""
    try:
        exif = opened.getexif()
        # only the sub-blocks there: asking for one that is not caches an empty one, which saving then writes
        for ifd in (exif, *(exif.get_ifd(tag) for tag in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo) if tag in exif)):
            for tag in NOT_KEPT_EXIF:
                ifd.pop(tag, None)
        for tag, value in exif.items():  # Pillow reads text bytes as Latin-1 and writes str as ASCII ("?")...
            known = TiffTags.TAGS_V2.get(tag)  # ...and bytes as ASCII only where it knows the tag's type is
            if isinstance(value, str) and not value.isascii() and known and known.type == TiffTags.ASCII:
                exif[tag] = value.encode("latin-1", errors="replace")
        exif.tobytes()  # what saving does: a tag Pillow reads but cannot write fails here, not in the output
    except Exception:  # noqa: BLE001 — Pillow's EXIF reader and writer raise many kinds on damaged tags
        return None
    return exif if len(exif) else None


def _resize(channel: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize one float32 channel [H, W] to size = (height, width)."""
    image = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
    return np.asarray(image.resize(size[::-1], resample, reducing_gap=REDUCING_GAP))


def _bilinear_taps(out_size: int, in_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output positions start..stop-1 of out_size: the two input positions each lies between and the
    weight of the second (pixel centres aligned, as Pillow and OpenCV do)."""
    position = (np.arange(start, stop) + 0.5) * (in_size / out_size) - 0.5
    position = np.clip(position, 0, in_size - 1)
    first = np.floor(position).astype(np.intp)
    return first, np.minimum(first + 1, in_size - 1), (position - first).astype(np.float32)[:, None]


def ab_rows(ab_small: np.ndarray, size: tuple[int, int]) -> AbSource:
    """ab_small [h, w, 2] bilinearly upsampled to size = (height, width), made a few rows at a time where
    `lab_rows_to_rgb8` asks for them (into its planar a and b), so that no full-resolution ab array
    exists. The model's ab varies slowly (the detail comes from L), so bilinear loses nothing visible."""
    height, width = size
    ab_small = np.asarray(ab_small, dtype=np.float32)
    left, right, x_weight = _bilinear_taps(width, ab_small.shape[1], 0, width)
    wide = ab_small[:, left] + (ab_small[:, right] - ab_small[:, left]) * x_weight  # [h, width, 2]
    wide = np.ascontiguousarray(np.moveaxis(wide, -1, 0))  # [2, h, width]: a plane, b plane
    rise = np.diff(wide, axis=1, append=wide[:, -1:])  # to the next row; 0 after the last one
    upper, _, y_weight = _bilinear_taps(height, ab_small.shape[0], 0, height)

    def fill(rows: slice, a_norm: np.ndarray, b_norm: np.ndarray) -> None:
        # rows between the same two small rows differ only in their weight: one numpy call for them all
        sources, weights = upper[rows], y_weight[rows]
        bounds = [0, *(np.flatnonzero(np.diff(sources)) + 1), len(sources)]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            for channel, plane in enumerate((a_norm, b_norm)):
                np.multiply(rise[channel, sources[start]], weights[start:stop], out=plane[start:stop])
                plane[start:stop] += wide[channel, sources[start]]

    return fill


def lab_image(lightness: np.ndarray, ab_small: np.ndarray) -> Image.Image:
    """Full-resolution L/100 [H, W] and the model's ab/128 [h, w, 2] → an RGB image [H, W], made a few rows
    at a time: one pass over the photo."""
    planes = lab_rows_to_rgb8(lightness, ab_rows(ab_small, lightness.shape))
    return Image.merge("RGB", [Image.fromarray(plane) for plane in planes])


def colour_photo(photo: Photo, ab_small: np.ndarray) -> Image.Image:
    """Join the photo's own L with the model's ab, upsampled to the photo's size."""
    coloured = lab_image(photo.lightness, ab_small)
    if photo.alpha is not None:
        coloured.putalpha(photo.alpha)
    return coloured


def compare_sheet(photo: Photo, coloured: Image.Image) -> Image.Image:
    """Gray input | colourised, side by side, each at most COMPARE_MAX_SIDE on its long side."""
    height, width = photo.lightness.shape
    scale = min(1.0, COMPARE_MAX_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    lightness = _resize(photo.lightness, size, DOWNSAMPLE)
    gray = lab_image(lightness, np.zeros((1, 1, 2), dtype=np.float32))
    if photo.alpha is not None:
        gray.putalpha(photo.alpha.resize(size[::-1], DOWNSAMPLE, reducing_gap=REDUCING_GAP))
    sheet = Image.new("RGB", (2 * size[1], size[0]))
    sheet.paste(over_white(gray), (0, 0))
    sheet.paste(over_white(coloured.resize(size[::-1], DOWNSAMPLE, reducing_gap=REDUCING_GAP)), (size[1], 0))
    return sheet


def colour_bytes(colorizer, data: bytes, image_size: int | None = None,
                 output_format: str | None = None) -> tuple[Photo, Image.Image]:
    """One photo file's contents → (the decoded photo, coloured at its full size), as `colorize` colours it
    (to be written as `output_format`).

    The entry point of the served model and of `chromalab serve`; raises UnreadablePhoto on a bad file.
    """
    try:
        photo = read_photo(io.BytesIO(data), model_input_size(colorizer, image_size), output_format)
    except READ_ERRORS as exc:
        raise UnreadablePhoto(describe_unreadable(exc, data)) from exc
    ab_small = np.asarray(colorizer.predict_on_batch(photo.small[None, ..., None]), dtype=np.float32)[0]
    return photo, colour_photo(photo, ab_small)


def save_atomic(image: Image.Image, path: Path, image_format: str, exif: Image.Exif | None = None) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted write leaves no half photo."""
    with atomic_file(path) as f:
        write_photo(image, f, image_format, exif)


def write_photo(image: Image.Image, f, image_format: str, exif: Image.Exif | None = None) -> None:
    """Encode `image` into the open file `f` as colorize writes every photo: its format's options, the source's
    `exif` if given (Photo.exif), and the EXIF mark that says colorize wrote it. Not the source's colour profile:
    the colours are computed, and written, as sRGB."""
    if exif is None or (image_format == "JPEG" and len(exif.tobytes()) > MAX_EXIF_BYTES):  # past its segment
        exif = Image.Exif()
    exif[ExifTags.Base.Software] = OUTPUT_SOFTWARE
    encodable(image, image_format).save(f, format=image_format, exif=exif, **SAVE_OPTIONS.get(image_format, {}))


def encodable(image: Image.Image, image_format: str) -> Image.Image:
    """`image` as `image_format` can hold it: JPEG has no alpha, so a transparent photo named .jpg is shown on
    white, as a browser shows it (not the colours its transparent parts hid)."""
    if image_format == "JPEG" and image.mode not in ("RGB", "L"):
        return over_white(image).convert("RGB")
    return image


# --- a file that cannot be read, in the user's words ---------------------------------------------------------

_KINDS = list(PHOTO_FORMATS)
ACCEPTED = f"chromalab reads {', '.join(_KINDS[:-1])} and {_KINDS[-1]} photos"
HEAD_BYTES = 512  # enough to tell a kind of file by its first bytes
# Kinds of file that Pillow cannot read, by their first bytes: files chromalab does not accept.
FOREIGN_KINDS = (
    (re.compile(rb".{4}ftyp(heic|heix|hevc|hevx|heim|heis|mif1|msf1)", re.S),
     "HEIC/HEIF format (as iPhones save photos)"),
    (re.compile(rb"\xff\x0a|\x00\x00\x00\x0cJXL \r\n\x87\n"), "JPEG XL format"),
    (re.compile(rb".{4}ftyp(isom|iso2|mp41|mp42|avc1|M4V |qt  )", re.S), "a video format (MP4/MOV)"),
    (re.compile(rb"%PDF-"), "PDF format"),
    (re.compile(rb"\s*(<\?xml[^>]*>\s*)?(<!--.*?-->\s*)*(<!DOCTYPE svg[^>]*>\s*)?<svg", re.S | re.I),
     "SVG format (a drawing)"),
)
PILLOW_NAMES = {"WEBP": "WebP", "MPO": "JPEG"}  # Pillow's format names that are not what users call them
# Pillow's words for a kind it knows but cannot decode here (EPS without Ghostscript, a codec left out)
NO_READER = re.compile(r"ghostscript|not available|not supported|unsupported|unimplemented|cannot find loader", re.I)
CUT_SHORT = re.compile(r"truncat|premature end|end of file", re.I)


def describe_unreadable(exc: BaseException | None, source: Path | bytes) -> str:
    """Why a photo file (its path or its contents) that raised one of READ_ERRORS cannot be read, and what
    chromalab reads, in words a user can act on: never an exception's class or an object's repr (Pillow's
    messages hold both). `exc` None: the file was refused before decoding (an empty upload)."""
    message = "" if exc is None else str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:  # from the file system, not from decoding
        return f"cannot open the file: {(exc.strerror or message).lower()}"
    if isinstance(exc, UnusableSize):
        return f"{exc}. {ACCEPTED}."
    if isinstance(exc, Image.DecompressionBombError):
        pixels = [int(n) / 1e6 for n in re.findall(r"(\d+) pixels", message)] or [0.0, Image.MAX_IMAGE_PIXELS * 2e-6]
        return (f"the photo is too large: {pixels[0]:.0f} megapixels, where chromalab reads photos of up to "
                f"{pixels[-1]:.0f} megapixels")
    try:
        head = _head(source)
    except OSError as error:
        return f"cannot open the file: {(error.strerror or str(error)).lower()}"
    if not head:
        return f"the file is empty (0 bytes). {ACCEPTED}."
    foreign = next((kind for pattern, kind in FOREIGN_KINDS if pattern.match(head)), None)
    pillow_format = _pillow_format(source)
    # by its first bytes alone where Pillow gave up on the rest; text is no photo whatever letter it starts with
    # (PPM's check takes "P" and a digit), but GIF's six-letter magic is text and an image's
    signature = signature_format(head)
    known = pillow_format or (signature if signature == "GIF" or not _is_text(head) else None)
    kind = PILLOW_NAMES.get(known, known)
    if foreign is None and kind is not None and NO_READER.search(message):
        if kind in PHOTO_FORMATS:  # not "BMP, which chromalab cannot read … reads BMP": a rare variant of it
            return (f"the {kind} photo is stored in a rare variant of {kind} that chromalab cannot read: convert it "
                    f"to JPEG or PNG first. {ACCEPTED}.")
        foreign = f"{kind} format"
    if foreign is not None:
        return f"the file is in {foreign}, which chromalab cannot read: convert it to JPEG or PNG first. {ACCEPTED}."
    if kind is not None:
        if exc is not None and decoder_starved(exc, head, _size(source)):
            return f"not enough memory to decode this {kind} photo: close other programs, or colour it alone"
        if isinstance(exc, EOFError) or CUT_SHORT.search(message):
            return f"the {kind} photo is cut short (truncated: an interrupted download or copy?). {ACCEPTED}."
        problem = "damaged or cut short" if pillow_format is None else "damaged: part of it cannot be decoded"
        return f"the {kind} photo is {problem}. {ACCEPTED}."
    if _is_text(head):
        if re.match(rb"\s*(<!doctype html|<html)", head, re.I):
            return f"not a photo: the file is a web page (HTML), saved in place of the picture? {ACCEPTED}."
        return f"not a photo: the file holds text. {ACCEPTED}."
    return f"not a photo, or of a kind chromalab does not know. {ACCEPTED}."


def _head(source: Path | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:HEAD_BYTES])
    with open(source, "rb") as f:
        return f.read(HEAD_BYTES)


def _size(source: Path | bytes) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    try:
        return Path(source).stat().st_size
    except OSError:
        return 0


def _pillow_format(source: Path | bytes) -> str | None:
    """The format Pillow recognises the file as (its header alone), or None."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source) as opened:
            return opened.format
    except Exception:  # noqa: BLE001  describing a failure must not fail: whatever stops Pillow, it knows no format
        return None


def _is_text(head: bytes) -> bool:
    """UTF-8 (or ASCII) with no control characters but whitespace: text, not a photo."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not merely a character cut by HEAD_BYTES
            return False
        text = head[: error.start].decode("utf-8")
    return bool(text) and not any(ch < " " and ch not in "\t\n\r\f" for ch in text)
