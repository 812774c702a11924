"""Files, one way for the whole project: atomic output, locks, the photo files chromalab reads, and what DVC records.

- Atomic output: write beside the target, then `os.replace` onto it. A file or folder that exists is whole. An
  interrupted run leaves the previous one untouched, plus at most a hidden `.<name>.<random>.tmp` beside it that
  the next run clears (`staged_dir` by itself, files through `clear_stale_temps`).
- `held_exclusively`: one process at a time in a folder (a training's checkpoint).
- The photo formats a folder is searched for, what Pillow raises on a file that is no photo (importing this
  module also silences Pillow's decompression-bomb warning), and the EXIF mark of colorize's own outputs.
- A photo's pixels as they are shown (`upright`, `in_srgb`, `over_white`): what the model is trained on and fed.
- `dvc_recorded_outputs`: the outputs dvc.lock records, with their MD5s.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import secrets
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageCms


# The photos a folder is searched for, by kind (the folder data source, `chromalab colorize`). A file named on
# its own is read whatever its name, if Pillow decodes it (GIF, PSD, …).
PHOTO_FORMATS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WebP": (".webp",), "BMP": (".bmp",),
                 "TIFF": (".tif", ".tiff")}
PHOTO_SUFFIXES = tuple(suffix for suffixes in PHOTO_FORMATS.values() for suffix in suffixes)
# What Pillow raises on a file that is not a readable photo, or on hostile or broken bytes: beside OSError, its
# decoders and EXIF reader raise struct.error, IndexError, … on a mistyped tag or a damaged header (chromalab says
# which, in plain words).
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, IndexError, ZeroDivisionError,
               NotImplementedError, struct.error, Image.DecompressionBombError)
# What Pillow's WebP decoder raises when it cannot allocate its decoder, and also for a file cut short or damaged.
_DECODER_NOT_MADE = "could not create decoder object"
STARVING_PIXELS = 4_000_000  # a picture whose decode takes tens of MB; a smaller one failing is damaged
# EXIF orientation → the turn that puts the pixels upright.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
# Pillow warns, in words about attacks, from 89 to 179 megapixels, then refuses (DecompressionBombError, which
# chromalab reports in its own words). A 100-megapixel camera photo is not an attack: no warning.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# EXIF "Software" of every photo colorize writes, so that a later run walking a folder (colorize's, or the folder
# data source's) can leave them out wherever they lie and whatever they are named.
OUTPUT_SOFTWARE = "chromalab colorize"


def folder_photos(folder: Path) -> list[Path]:
    """The photo files under `folder`, searched recursively, in order; hidden files and folders (a viewer's
    `.thumbnails/`, macOS's `._` twins) are not the user's photos."""
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in PHOTO_SUFFIXES and path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def signature_format(head: bytes) -> str | None:
    """The image format a file's first bytes say it is, by Pillow's own checks (some formats have none)."""
    Image.init()
    prefix = head[:16]  # what Image.open shows each format's check
    return next((name for name, (_, accept) in Image.OPEN.items() if accept is not None and accept(prefix)), None)


def decoder_starved(exc: BaseException, head: bytes, size: int) -> bool:
    """Whether a photo file of `size` bytes starting with `head` (32 bytes at least) failed to decode for want of
    memory, not for its bytes: Pillow's WebP decoder says the same for both. Only a whole file (as long as its
    RIFF header says) whose header is readable and declares a large picture can have starved it."""
    return (_DECODER_NOT_MADE in str(exc) and head[:4] == b"RIFF" and len(head) >= 32
            and int.from_bytes(head[4:8], "little") + 8 <= size and _webp_pixels(head) >= STARVING_PIXELS)


def _webp_pixels(head: bytes) -> int:
    """Width × height that a WebP file's first chunk declares (extended, lossy or lossless), 0 if unreadable."""
    chunk = head[12:16]
    if chunk == b"VP8X":  # canvas size minus one, 24 bits each
        return (1 + int.from_bytes(head[24:27], "little")) * (1 + int.from_bytes(head[27:30], "little"))
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # a key frame's start code, then 14-bit sizes
        return (int.from_bytes(head[26:28], "little") & 0x3FFF) * (int.from_bytes(head[28:30], "little") & 0x3FFF)
    if chunk == b"VP8L" and head[20] == 0x2F:  # the lossless signature, then 14-bit sizes minus one
        bits = int.from_bytes(head[21:25], "little")
        return ((bits & 0x3FFF) + 1) * (((bits >> 14) & 0x3FFF) + 1)
    return 0


def upright(image: Image.Image) -> Image.Image:
    """The photo turned upright by its EXIF orientation, as stored where that cannot be read. Not Pillow's
    exif_transpose: it also writes the EXIF back, which fails on a damaged tag beside a readable orientation.
    A TIFF's gray with premultiplied alpha (La), which Pillow converts to nothing else, comes as LA."""
    image.load()  # a TIFF's orientation is among its tags, read with its pixels
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except READ_ERRORS:
        orientation = 1
    turn = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    turned = image.copy() if turn is None else image.transpose(turn)
    return turned.convert("LA") if turned.mode == "La" else turned


# Modes whose colour profile is applied (into RGB, and RGBA where there is transparency); others are taken as sRGB.
_GRAY_MODES = ("1", "L", "LA", "La")
_PROFILED_MODES = (*_GRAY_MODES, "P", "PA", "RGB", "RGBA", "RGBa", "CMYK")


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.lru_cache(maxsize=16)
def _profile_if_not_srgb(icc: bytes, gray: bool) -> ImageCms.ImageCmsProfile | None:
    """The profile in `icc`, or None where it maps colours as sRGB does (most cameras' and phones' JPEGs carry
    sRGB's profile: converting them would cost time for nothing), judged by what it does to a set of colours, not
    by its name ("Linear sRGB" is not sRGB)."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if profile.profile.xcolor_space.strip() == "CMYK":  # no CMYK profile is sRGB's (nor takes an RGB probe)
        return profile
    levels = np.linspace(0, 255, 16, dtype=np.uint8)
    if gray:
        probe = Image.fromarray(np.tile(levels, (16, 1)))
        expected = np.repeat(np.asarray(probe)[..., None], 3, axis=-1)
    else:
        probe = Image.fromarray(np.stack(np.meshgrid(levels, levels, levels), axis=-1).reshape(64, 64, 3))
        expected = np.asarray(probe)
    seen = np.asarray(ImageCms.profileToProfile(probe, profile, _srgb_profile(), outputMode="RGB"))
    return None if np.abs(seen.astype(int) - expected).max() <= 1 else profile


def in_srgb(image: Image.Image) -> Image.Image:
    """The photo's colours in sRGB, which chromalab's Lab assumes: converted from its embedded colour profile (a
    camera's Adobe RGB, a phone's Display P3, a gray gamma), its transparency kept (an alpha channel, RGBA); as
    stored where it has no profile, sRGB's, or one that cannot be read or applied (README, "Measured figures":
    what skipping it would cost)."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in _PROFILED_MODES:
        return image
    gray = image.mode in _GRAY_MODES
    transparent = has_transparency(image)
    try:
        source = _profile_if_not_srgb(icc, gray)
        if source is None:
            return image
        alpha = image.convert("LA" if gray else "RGBA").getchannel("A") if transparent else None
        colours = image if image.mode in ("L", "RGB", "CMYK") else image.convert("L" if gray else "RGB")
        converted = ImageCms.profileToProfile(colours, source, _srgb_profile(), outputMode="RGB")
    except (ImageCms.PyCMSError, *READ_ERRORS):
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    converted.info = {key: value for key, value in image.info.items() if key not in ("icc_profile", "transparency")}
    return converted


def has_transparency(image: Image.Image) -> bool:
    """An alpha channel, or a transparent colour (a palette entry, a PNG's colour key)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def over_white(image: Image.Image) -> Image.Image:
    """A photo with transparency as a browser shows it on a white page, in RGB; any other photo as it is. What
    the model is trained on (images stage) and fed (colorize), and what an output without alpha shows."""
    if not has_transparency(image):
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


MAX_NAME_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems
_TEMP_EXTRA_BYTES = len(".12345678.tmp.")


def cut_to_bytes(name: str, room: int, keep_end: bool = False) -> str:
    """`name`, cut to `room` bytes of a file name (at its start when `keep_end`, which keeps its suffixes)."""
    data = name.encode("utf-8", "surrogateescape")
    if len(data) <= room:
        return name
    cut = data[-room:] if keep_end else data[:room]
    return cut.decode("utf-8", "ignore")  # a character split by the cut is dropped whole


def _fitted(name: str, keep_end: bool = False) -> str:
    """`name`, cut so that a temp name built on it stays within MAX_NAME_BYTES: a long but legal output name
    must not fail for its temp file's sake."""
    return cut_to_bytes(name, MAX_NAME_BYTES - _TEMP_EXTRA_BYTES, keep_end)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{_fitted(path.name)}.{secrets.token_hex(4)}.tmp")


# The temp files of atomic_file (`.<name>.<8 hex>.tmp`) and atomic_path (`.<8 hex>.tmp.<name>`).
_TEMP_FILE = re.compile(r"^\.(?:(?P<before>.+)\.[0-9a-f]{8}\.tmp|[0-9a-f]{8}\.tmp\.(?P<after>.+))$")


def clear_stale_temps(folder: Path, names: Iterable[str] | None = None) -> None:
    """Remove the temp files a killed run's atomic writes left in `folder`: those of the files `names`, or all
    of them (for a folder only chromalab writes). Call it before writing. An atomic_file another run is still
    writing is left alone (its writer holds a lock on it): two `colorize` into one folder each finish."""
    wanted = None if names is None else {fitted for name in names for fitted in (_fitted(name), _fitted(name, True))}
    try:
        entries = list(os.scandir(folder))
    except OSError:  # nothing written there yet, nothing can be, or no listing: clearing is a courtesy
        return
    for entry in entries:
        match = _TEMP_FILE.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and (
                wanted is None or (match["before"] or match["after"]) in wanted):
            _unlink_unless_locked(Path(entry.path))


def _lock(f: IO, blocking: bool = True) -> bool:
    """An advisory lock on the open file `f` until it is closed (flock, which the kernel drops when the process
    dies, even by -9); whether it was free. Where flock does not exist: True, and no lock."""
    if sys.platform.startswith("win"):
        return True
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (some network ones): no lock, as where flock does not exist
        return True
    return True


def _unlink_unless_locked(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            if _lock(f, blocking=False):
                path.unlink(missing_ok=True)
    except OSError:  # gone meanwhile, or unreadable: clearing is a courtesy
        pass


@contextlib.contextmanager
def atomic_file(path: Path, text: bool = False) -> Iterator[IO]:
    """A new file beside `path`, open for writing; when the block succeeds it is synced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with (open(tmp, "x", encoding="utf-8", newline="") if text else open(tmp, "xb")) as f:
            _lock(f)  # a fresh file: free; held so that another run's clear_stale_temps leaves it alone
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _name_output(exc, path)
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh path beside `path` for a library that writes files by name (Keras' save); renamed onto `path`
    when the block succeeds. The name keeps `path`'s suffixes, which such libraries check."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{secrets.token_hex(4)}.tmp.{_fitted(path.name, keep_end=True)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _name_output(exc, path)
        raise


def _name_output(exc: BaseException, output: Path) -> None:
    """Name `output` in an OSError that names no file: a write's (a full disk's ENOSPC never does), whose one-line
    error would otherwise say to free space without saying where. Only one with an errno and its text: the
    message of OSError("text") with a file name would read "[Errno None] None: <file>"."""
    if isinstance(exc, OSError) and exc.filename is None and exc.strerror is not None:
        exc.filename = str(output)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path, text=True) as f:
        f.write(text)


@contextlib.contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """An empty folder beside `out_dir`; when the block succeeds it takes `out_dir`'s place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _temp_sibling(out_dir)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_output(exc, out_dir)
        raise
    if out_dir.exists():  # os.replace cannot overwrite a non-empty folder: move the old one aside first
        old = _temp_sibling(out_dir)
        with _stop_signals_held():  # a Ctrl-C or SIGTERM between the two renames would leave neither folder
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """A Ctrl-C or SIGTERM arriving in the block is acted on (by the handler it would have met) only after it.
    Python-level, not the thread's signal mask: the kernel hands a process's signal to any thread not blocking
    it, and Python then runs the handler in the main thread all the same."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    caught = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append((signum, frame)))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum, frame in caught[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(signum)


@contextlib.contextmanager
def held_exclusively(folder: Path, wait_s: float) -> Iterator[bool]:
    """An advisory lock on `folder` for the block (flock on its descriptor; released by the kernel when the
    process dies, even by -9), waiting up to `wait_s` for another holder. Yields whether it got the lock;
    where flock does not exist it yields True."""
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform.startswith("win"):
        yield True
        return
    import fcntl

    deadline = time.monotonic() + wait_s
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(folder, os.O_RDONLY)
        except FileNotFoundError:  # the holder removed it just now
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the holder before us may have removed the folder: a lock on one no longer at its path guards nothing
            if os.path.samestat(os.fstat(descriptor), os.stat(folder)):
                break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(descriptor)
                yield False
                return
            time.sleep(0.2)
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        yield True
    finally:
        os.close(descriptor)


def is_colorize_output(path: Path) -> bool:
    """Whether `path` is a photo colorize wrote (its EXIF says so). Only the header is read: colorize writes its
    EXIF before the pixels, and Pillow's getexif() would decode a whole PNG looking for one after them."""
    try:
        with Image.open(path) as opened:
            raw = opened.info.get("exif")
            if not raw:
                return False
            exif = Image.Exif()
            exif.load(raw)
            return exif.get(ExifTags.Base.Software) == OUTPUT_SOFTWARE
    except READ_ERRORS:  # unreadable: whoever reads it says why
        return False


def dvc_recorded_outputs(lock_file: Path = Path("dvc.lock")) -> dict[str, str | None]:
    """The outputs dvc.lock records (paths relative to the repository root, where stages run) with their MD5s;
    none where there is no readable dvc.lock."""
    import yaml

    try:
        lock = yaml.safe_load(Path(lock_file).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    stages = lock.get("stages") if isinstance(lock, dict) else None
    return {out.get("path"): out.get("md5") for stage in (stages or {}).values() if isinstance(stage, dict)
            for out in stage.get("outs") or [] if isinstance(out, dict)}
