"""describe_unreadable, the one rule every surface uses for a file it cannot read, on kinds of bad file the
surfaces' own tests do not send."""

from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

from bad_files import assert_in_user_words
from chromalab.colorize.photos import describe_unreadable
from chromalab.files import READ_ERRORS


def _encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_mandelbrot((96, 64), (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB").save(buffer, image_format)
    return buffer.getvalue()


def _with_bmp_compression(method: int) -> bytes:
    data = bytearray(_encoded("BMP"))
    data[30:34] = method.to_bytes(4, "little")  # the info header's compression field
    return bytes(data)


def _reason(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
    except READ_ERRORS as exc:
        return describe_unreadable(exc, data)
    raise AssertionError("Pillow read it")


@pytest.mark.parametrize("data, problem", [
    (b"<!DOCTYPE html>\n<html><body>Photo not found</body></html>", "not a photo: the file is a web page (HTML)"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "in SVG format"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "in PDF format"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)), "not a photo, or of a kind chromalab does not know"),
    (_encoded("WEBP")[:300], "the WebP photo is damaged or cut short"),
    (_encoded("PNG")[:60] + bytes(40) + _encoded("PNG")[100:], "the PNG photo is damaged: part of it cannot be"),
    # text whose first bytes one of Pillow's format checks accepts (PPM's "P" and a digit or letter, XBM's
    # "#define", FITS' "SIMPLE") is text, not a damaged photo of that kind
    (b"Python notes: buy milk\n", "not a photo: the file holds text"),
    (b"#define WIDTH 8\n", "not a photo: the file holds text"),
    (b"SIMPLE list of things\n", "not a photo: the file holds text"),
    # a kind chromalab reads, in a variant Pillow cannot decode: not "BMP, which chromalab cannot read"
    (_with_bmp_compression(7), "the BMP photo is stored in a rare variant of BMP that chromalab cannot read"),
])
def test_each_kind_of_bad_file_is_named_in_the_users_words(data, problem):
    assert_in_user_words(_reason(data), problem)


@pytest.mark.skipif(shutil.which("gs") is not None, reason="with Ghostscript installed Pillow reads EPS")
def test_a_kind_pillow_knows_but_cannot_read_here_is_named_by_its_format():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    assert_in_user_words(_reason(eps), "the file is in EPS format, which chromalab cannot read")


def test_a_whole_webp_that_memory_could_not_decode_is_not_called_damaged(monkeypatch):
    """Pillow's WebP decoder says "could not create decoder object" when it cannot allocate, as for a file cut
    short or damaged (above): a whole file of a large picture is the machine's fault, and the user is told so."""
    from PIL import WebPImagePlugin

    def starved(*args, **kwargs):
        raise OSError("could not create decoder object")
    monkeypatch.setattr(WebPImagePlugin._webp, "WebPAnimDecoder", starved)
    large = io.BytesIO()
    Image.new("RGB", (2100, 2000), (200, 90, 40)).save(large, "WEBP")  # decoding it takes 17 MB
    assert _reason(large.getvalue()) == ("not enough memory to decode this WebP photo: close other programs, or "
                                         "colour it alone")  # nothing wrong with its kind: no list of kinds
    assert_in_user_words(_reason(large.getvalue()[:300]), "the WebP photo is damaged or cut short")
    assert_in_user_words(_reason(_encoded("WEBP")), "the WebP photo is damaged or cut short")  # too small to starve
