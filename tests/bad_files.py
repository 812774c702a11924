"""The bad files every surface that takes a photo (`colorize`, the page, the served model) is tested with, and
the check that a user is told, in words they can act on, what was wrong and what chromalab reads."""

from __future__ import annotations

import io
import re
import struct

from PIL import Image

ACCEPTED = "chromalab reads JPEG, PNG, WebP, BMP and TIFF photos"
# The start of an iPhone photo: its ftyp box (brand heic). Pillow has no HEIF reader, so what follows is moot.
HEIC_START = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + struct.pack(">I", 16) + b"mdat" + bytes(8)

# A DirectDraw texture (DDS) whose pixel format Pillow does not implement: its reader raises NotImplementedError.
DDS_UNKNOWN_PIXELS = (b"DDS " + struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44)
                      + struct.pack("<2I", 32, 0x4) + b"XXXX" + bytes(20 + 20 + 64))


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buffer, "PNG")
    return buffer.getvalue()


def _half_a_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_mandelbrot((96, 64), (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]  # an interrupted download


def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name → (its contents, the words that must name its problem)."""
    return {
        "notes.jpg": (b"Shopping list:\n- milk\n- a film for the old camera\n", "not a photo: the file holds text"),
        "empty.png": (b"", "the file is empty"),
        "holiday.jpg": (_half_a_jpeg(), "the JPEG photo is cut short (truncated"),
        "IMG_0001.HEIC": (HEIC_START, "the file is in HEIC/HEIF format"),
        "texture.jpg": (DDS_UNKNOWN_PIXELS, "the file is in DDS format"),
        # a strip (a tiny PNG of 1 × 170 million pixels) is refused before it is decoded: resizing one took gigabytes
        "strip.png": (_png(2, 130), "the photo is 2×130 pixels, a strip rather than a photo"),
    }


def assert_in_user_words(message: str, problem: str) -> None:
    """`message` names the problem and what chromalab reads, with no exception class and no object repr."""
    assert problem in message, message
    assert ACCEPTED in message, message
    assert not re.search(r"\w+(Error|Exception)\b", message), message
    assert "<" not in message and "0x" not in message, message
