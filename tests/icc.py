"""Colour profiles for tests, built byte by byte (ICC v2: a header, a tag table, matrix and gamma tags): the
machine has no profile files, and Pillow builds only sRGB's."""

from __future__ import annotations

import struct

import numpy as np

D50 = (0.9642, 1.0, 0.8249)
ADOBE_RGB_GAMMA = 563 / 256  # Adobe RGB (1998): 2.19921875
# Adobe RGB (1998)'s primaries, adapted to the D50 of the profile connection space
ADOBE_RGB_PRIMARIES = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def _gamma(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def _description(text: str) -> bytes:
    ascii_ = text.encode() + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_)) + ascii_ + bytes(8) + bytes(3) + bytes(67)


def _profile(space: bytes, name: str, tags: dict[bytes, bytes], device: bytes = b"mntr", pcs: bytes = b"XYZ ") -> bytes:
    tags = {b"desc": _description(name), b"cprt": b"text" + bytes(4) + b"none\0", b"wtpt": _xyz(*D50), **tags}
    table, data = b"", b""
    start = 128 + 4 + 12 * len(tags)
    for signature, body in tags.items():
        data += bytes(-len(data) % 4)  # each tag on a 4-byte boundary
        table += struct.pack(">4sII", signature, start + len(data), len(body))
        data += body
    data += bytes(-len(data) % 4)
    body = struct.pack(">I", len(tags)) + table + data
    header = (struct.pack(">I4sI4s4s4s", 128 + len(body), b"lcms", 0x02100000, device, space, pcs) + bytes(12)
              + b"acsp" + bytes(28) + _s15(D50[0]) + _s15(D50[1]) + _s15(D50[2]) + bytes(48))
    return header + body


def adobe_rgb(gamma: float = ADOBE_RGB_GAMMA, name: str = "Adobe RGB (1998), as a test builds it") -> bytes:
    tags = {tag: _xyz(*xyz) for tag, xyz in zip((b"rXYZ", b"gXYZ", b"bXYZ"), ADOBE_RGB_PRIMARIES)}
    tags.update({tag: _gamma(gamma) for tag in (b"rTRC", b"gTRC", b"bTRC")})
    return _profile(b"RGB ", name, tags)


def cmyk_gray_ink() -> bytes:
    """A printer's CMYK profile in which every ink only darkens (L = 100 (1 - c)(1 - m)(1 - y)(1 - k), a = b = 0):
    pure cyan prints black, where Pillow's own CMYK → RGB, which ignores profiles, makes it cyan. A lut8 table
    from CMYK to Lab on a grid of 2 points per ink."""
    grid = b"".join(bytes((255 if (c, m, y, k) == (0, 0, 0, 0) else 0, 128, 128))
                    for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1))
    identity = bytes(range(256))
    matrix = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft1" + bytes(4) + bytes((4, 3, 2, 0)) + matrix + identity * 4 + grid + identity * 3
    return _profile(b"CMYK", "CMYK, every ink gray", {b"A2B0": lut}, device=b"prtr", pcs=b"Lab ")


def gray_gamma(gamma: float) -> bytes:
    return _profile(b"GRAY", f"Gray Gamma {gamma}", {b"kTRC": _gamma(gamma)})


def neutral_lightness(level: np.ndarray | float, gamma: float) -> np.ndarray:
    """CIE L* (0-100) of a neutral 8-bit `level` in a gamma-`gamma` space (luminance (level / 255)^gamma)."""
    luminance = (np.asarray(level, dtype=np.float64) / 255) ** gamma
    return np.where(luminance > 216 / 24389, 116 * np.cbrt(luminance) - 16, luminance * 24389 / 27)
