"""A real HTTP server on 127.0.0.1 that imitates Unsplash for offline tests.

- `make_lite_archive(...)` builds a zip in the Lite format (photos / keywords / colors / collections /
  conversions tables, tab-separated, t/f booleans), with options for numbered parts, 1.3.0's `.csv000`
  names and a sub-folder. `lite_photos(...)` makes the photo population: people tagged with confidence,
  people only a user tagged, low-confidence tags, black-and-white photos, "no people" captions, landscapes.
- `FakeUnsplash` serves that archive at /data/lite/latest (302 → the zip; Range, If-Range and ETag
  supported) and, at each photo_image_url, a colourful synthetic photo seeded by its id, rendered at
  the `w`×`h` of the query (`fm=jpg|png`, `q`). Faults can be injected per photo and for the archive,
  and every request is counted and logged so tests can assert what was fetched and how.
"""

from __future__ import annotations

import colorsys
import csv
import gzip
import io
import threading
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

PHOTO_COLUMNS = (
    "photo_id", "photo_url", "photo_image_url", "photo_submitted_at", "photo_featured", "photo_width",
    "photo_height", "photo_aspect_ratio", "photo_description", "photographer_username",
    "photographer_first_name", "photographer_last_name", "exif_camera_make", "exif_camera_model", "exif_iso",
    "exif_aperture_value", "exif_focal_length", "exif_exposure_time", "photo_location_name",
    "photo_location_latitude", "photo_location_longitude", "photo_location_country", "photo_location_city",
    "stats_views", "stats_downloads", "ai_description", "ai_primary_landmark_name",
    "ai_primary_landmark_latitude", "ai_primary_landmark_longitude", "ai_primary_landmark_confidence",
    "blur_hash",
)
KEYWORD_COLUMNS = ("photo_id", "keyword", "ai_service_1_confidence", "ai_service_2_confidence",
                   "suggested_by_user", "user_suggestion_source")
COLOR_COLUMNS = ("photo_id", "hex", "red", "green", "blue", "keyword", "ai_coverage", "ai_score")
COLLECTION_COLUMNS = ("photo_id", "collection_id", "collection_title", "photo_collected_at")
CONVERSION_COLUMNS = ("converted_at", "conversion_type", "keyword", "photo_id", "anonymous_user_id",
                      "conversion_country")

# What the people filter of params.yaml should make of each kind of photo.
SELECTED_KINDS = frozenset({"person", "person_user"})
DEFAULT_KINDS = {"person": 30, "person_user": 6, "low_confidence": 5, "bw_keyword": 5, "caption": 4, "other": 20}
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"

IMAGE_FAULTS = ("403", "404", "410", "429-once", "429-wait-an-hour", "500-twice", "500-always", "truncated-once",
                "corrupt", "gray", "rgba-png", "wrong-size", "slow", "stall-once", "html-page", "bad-exif", "drip",
                "503-unreadable-retry-after-once", "drip-headers", "cut-unsized-once", "html-as-jpeg-once",
                "empty-once", "tiny", "junk-as-jpeg", "cut-unsized-always", "corrupt-varying", "junk-per-photo",
                "placeholder", "gray-placeholder", "placeholder-tagged", "png-bomb", "trailing-junk",
                "slow-head-and-body", "redirect", "redirect-loop", "adobe-rgb", "srgb-profile")
# junk-as-jpeg: the same error bytes for every photo with it, as image/jpeg (starting as one); corrupt-varying: a truncated photo
# with its Content-Length, cut elsewhere on each request; junk-per-photo: an error body naming the request;
# placeholder: the same colour photo for every photo with it (gray-placeholder: the same gray one;
# placeholder-tagged: the same, its JPEG carrying a comment that names the photo asked for);
# png-bomb: a small palette PNG (transparency and all) ten times the size asked each way; trailing-junk: the photo asked for, then 256 KiB of noise;
# slow-head-and-body: 4 header lines, then 4 pieces of the photo, each after slow_s; redirect: a 302 to the
# same photo elsewhere (a CDN); redirect-loop: a 302 to itself; adobe-rgb, srgb-profile: the photo asked for with
# that colour profile embedded
# drop-always: every transfer breaks off half-way; no-validator: no ETag (nothing to guard a resume with);
# html-page: a 200 sign-in page instead of the zip; gzip: Content-Encoding gzip, Ranges over the encoded bytes;
# drip: 64 bytes every slow_s; cut-unsized-once: the first answer has no Content-Length and ends half-way;
# ignore-if-range: a Range is served from the archive of the day (`second_archive` from the second request
# on, with its own ETag) whatever If-Range says; html-206: a Range is answered with a 206 sign-in page;
# drip-headers (images too): a header line every slow_s, for ever; 204: HTTP 204 No Content; unquoted-etag:
# an ETag without its quotes (RFC 9110 wants them; servers omit them); odd-length: Content-Length "²"
ARCHIVE_FAULTS = ("drop-once", "drop-always", "ignore-range", "500-once", "no-validator", "html-page", "gzip",
                  "drip", "cut-unsized-once", "ignore-if-range", "html-206", "drip-headers", "204", "unquoted-etag",
                  "odd-length")
SIGN_IN_PAGE = b"<!doctype html><html><body>Please sign in to continue.</body></html>"


def archive_etag(data: bytes) -> str:
    """The strong ETag the server gives `data`."""
    return f'"{zlib.crc32(data):08x}-{len(data)}"'


def exif_that_breaks_pillow(rgb: np.ndarray) -> bytes:
    """A whole colour JPEG whose EXIF says "rotate" (orientation 6) and holds TileOffsets (a LONG tag) as text:
    it decodes, but rotating it upright makes Pillow re-pack the EXIF and raise struct.error."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Cam"  # orientation; Make (ASCII), retagged below
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", exif=exif, quality=90)
    make_entry = b"\x01\x0f\x00\x02"  # tag 0x010F, type 2 (ASCII), big-endian as Pillow writes it
    assert buffer.getvalue().count(make_entry) == 1
    return buffer.getvalue().replace(make_entry, b"\x01\x44\x00\x02")


@dataclass(frozen=True)
class LiteKeyword:
    keyword: str
    conf1: float | None = None
    conf2: float | None = None
    user: bool = False


@dataclass(frozen=True)
class LitePhoto:
    photo_id: str
    kind: str  # a key of DEFAULT_KINDS: what the people filter should decide
    keywords: tuple[LiteKeyword, ...]
    description: str = ""
    ai_description: str = ""


def lite_photos(kinds: dict[str, int] | None = None, seed: int = 0) -> list[LitePhoto]:
    """A seeded, shuffled population of Lite photos, `kinds[k]` of each kind."""
    rng = np.random.default_rng(seed)
    person_words = ["woman", "Man", "people", "portrait", "child", "couple", "girl", "boy"]
    photos = []
    for kind, count in (kinds or DEFAULT_KINDS).items():
        for i in range(count):
            photo_id = f"{kind[:2]}{i:02d}" + "".join(rng.choice(list(ID_ALPHABET), 7))
            word = person_words[i % len(person_words)]
            high = LiteKeyword(word, round(float(rng.uniform(61, 99)), 1), None)
            scenery = (LiteKeyword("outdoors", 88.0, 91.2), LiteKeyword("nature", None, 70.5))
            description, ai_description = "", f"a photo of a {word.lower()}"
            if kind == "person":
                keywords = (high, *scenery)
                if i == 0:  # old releases had a keyword holding a quoted newline
                    keywords = (LiteKeyword("smiling\nface", 55.0, None), *keywords)
            elif kind == "person_user":
                keywords = (LiteKeyword(word, None, None, user=True), LiteKeyword(word, 30.0, None), *scenery)
            elif kind == "low_confidence":
                keywords = (LiteKeyword(word, 41.0, 52.5), *scenery)
            elif kind == "bw_keyword":
                keywords = (high, LiteKeyword("Black and White", 93.0, None), *scenery)
            elif kind == "caption":
                keywords = (high, *scenery)
                ai_description = "an empty street with no people"
            elif kind == "other":
                # Look-alikes: substrings of person words, and words that tag animals or rock faces.
                keywords = (LiteKeyword("manhattan", 95.0, None), LiteKeyword("face", 90.0, 90.0),
                            LiteKeyword("adult", 88.0, None), LiteKeyword("mountain", 97.0, 96.0))
                ai_description = "a mountain lake"
            else:
                raise ValueError(f"unknown kind {kind!r}")
            photos.append(LitePhoto(photo_id, kind, keywords, description, ai_description))
    order = rng.permutation(len(photos))
    return [photos[i] for i in order]


def _tsv(columns, rows) -> list[str]:
    """Rows as TSV records (QUOTE_MINIMAL: a field with a newline or quote gets quoted)."""
    records = []
    for row in rows:
        buffer = io.StringIO()
        csv.writer(buffer, delimiter="\t", lineterminator="\n").writerow(row)
        records.append(buffer.getvalue())
    return ["\t".join(columns) + "\n", *records]


def lite_tables(photos: list[LitePhoto], image_base_url: str) -> dict[str, tuple[tuple[str, ...], list[tuple]]]:
    """Each table's (columns, rows), as in the Lite release."""
    def fmt(value):
        return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    photo_rows, keyword_rows, color_rows, collection_rows, conversion_rows = [], [], [], [], []
    for n, p in enumerate(photos):
        values = dict.fromkeys(PHOTO_COLUMNS, "")
        values.update(
            photo_id=p.photo_id, photo_url=f"https://unsplash.com/photos/{p.photo_id}",
            photo_image_url=f"{image_base_url}/photo-{p.photo_id}", photo_submitted_at="2021-03-04 05:06:07",
            photo_featured="t", photo_width="4000", photo_height="6000", photo_aspect_ratio="0.67",
            photo_description=p.description, photographer_username=f"user{n}", ai_description=p.ai_description,
            stats_views=str(1000 + n), stats_downloads=str(10 + n), blur_hash="LEHV6nWB2yk8pyo0adR*.7kCMdnj",
        )
        photo_rows.append(tuple(values[c] for c in PHOTO_COLUMNS))
        for k in p.keywords:
            keyword_rows.append((p.photo_id, k.keyword, fmt(k.conf1), fmt(k.conf2), "t" if k.user else "f",
                                 "search" if k.user else ""))
        color_rows.append((p.photo_id, "#a0522d", "160", "82", "45", "sienna", "0.31", "0.55"))
        collection_rows.append((p.photo_id, "162326", "People", "2020-01-01 00:00:00"))
        conversion_rows.append(("2020-05-05 10:00:00", "download", "person", p.photo_id, "anon1", "FR"))
    return {
        "photos": (PHOTO_COLUMNS, photo_rows),
        "keywords": (KEYWORD_COLUMNS, keyword_rows),
        "colors": (COLOR_COLUMNS, color_rows),
        "collections": (COLLECTION_COLUMNS, collection_rows),
        "conversions": (CONVERSION_COLUMNS, conversion_rows),
    }


def make_lite_archive(
    photos: list[LitePhoto],
    image_base_url: str = "https://images.unsplash.com",
    *,
    parts: int = 1,
    numbered: bool = True,
    extension: str = "tsv",
    folder: str = "",
    drop_tables: tuple[str, ...] = (),
    drop_columns: dict[str, tuple[str, ...]] | None = None,
    extra_entries: dict[str, bytes] | None = None,
) -> bytes:
    """A Lite zip: `<folder><table>.<extension>000` … (each part with its header), TERMS.md, DOCS.md."""
    if not numbered and parts != 1:
        raise ValueError("unnumbered tables have one part")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{folder}TERMS.md", "Unsplash Dataset terms (test copy)\n")
        zf.writestr(f"{folder}DOCS.md", "# Lite dataset (test copy)\n")
        for table, (columns, rows) in lite_tables(photos, image_base_url).items():
            if table in drop_tables:
                continue
            dropped = set((drop_columns or {}).get(table, ()))
            keep = [i for i, c in enumerate(columns) if c not in dropped]
            columns = tuple(columns[i] for i in keep)
            rows = [tuple(r[i] for i in keep) for r in rows]
            records = _tsv(columns, rows)
            header, body = records[0], records[1:]
            chunks = np.array_split(np.arange(len(body)), parts)
            for number, chunk in enumerate(chunks):
                name = f"{folder}{table}.{extension}{number:03d}" if numbered else f"{folder}{table}.{extension}"
                zf.writestr(name, header + "".join(body[i] for i in chunk))
        for name, data in (extra_entries or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- images


def render_photo(photo_id: str, width: int, height: int) -> np.ndarray:
    """A colourful synthetic photo (gradient + ellipses, saturated hues), the same for the same id and size."""
    rng = np.random.default_rng(zlib.crc32(photo_id.encode()))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)

    def hue_rgb():
        return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0))) * 255

    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) + 0.5, 0, 1)[..., None]
    image = (1 - t) * hue_rgb() + t * hue_rgb()
    for _ in range(4):
        cy, cx, ry, rx = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.3), rng.uniform(0.08, 0.3)
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        image[inside] = hue_rgb()
    return image.astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str, quality: int, icc_profile: bytes | None = None) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    image = Image.fromarray(rgb)
    profile = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "png":
        image.save(buffer, "PNG", **profile)
        return buffer.getvalue(), "image/png"
    image.save(buffer, "JPEG", quality=quality, **profile)
    return buffer.getvalue(), "image/jpeg"


def photo_profile(fault: str) -> bytes | None:
    """The colour profile a photo with `fault` carries: a camera's Adobe RGB, sRGB's own, or none."""
    if fault == "adobe-rgb":
        from icc import adobe_rgb

        return adobe_rgb()
    if fault == "srgb-profile":
        from PIL import ImageCms

        return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return None


# ----------------------------------------------------------------------------------------------- server


@dataclass
class LoggedRequest:
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeUnsplash:
    """`with FakeUnsplash() as server:` a threaded HTTP server on 127.0.0.1:<free port>.

    Set `archive` (bytes) to serve at `latest_url`; `image_faults[photo_id] = "404"` etc. (IMAGE_FAULTS), or
    a list of them, one per request; `archive_faults = {"drop-once"}` (ARCHIVE_FAULTS). `counts[path]` counts
    requests as they arrive.
    """

    archive: bytes = b""
    second_archive: bytes = b""  # a new release, served from the second archive request on (if set)
    image_faults: dict[str, str | list[str]] = field(default_factory=dict)
    archive_faults: set[str] = field(default_factory=set)
    slow_s: float = 0.3  # the "slow" fault, and `delay_s` for every image
    stall_s: float = 3.0  # the "stall-once" fault: longer than the client's timeout
    delay_s: float = 0.0
    unreadable_retry_after: str = "soon"  # the 503-unreadable-retry-after-once fault's Retry-After
    counts: Counter = field(default_factory=Counter)
    log: list[LoggedRequest] = field(default_factory=list)
    archive_path: str = "/data/lite/download/unsplash-research-dataset-lite-test.zip"

    def __post_init__(self):
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def latest_url(self) -> str:
        return f"{self.url}/data/lite/latest"

    @staticmethod
    def image_path(photo_id: str) -> str:
        return f"/photo-{photo_id}"

    def requests_to(self, path: str) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if r.path == path]

    def image_counts(self) -> dict[str, int]:
        """photo_id → requests so far."""
        with self._lock:
            return {path[len("/photo-"):]: n for path, n in self.counts.items() if path.startswith("/photo-")}

    def __enter__(self) -> FakeUnsplash:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-unsplash", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _arrive(self, path: str, query: dict[str, str], headers: dict[str, str]) -> int:
        with self._lock:
            self.counts[path] += 1
            self.log.append(LoggedRequest(path, query, headers))
            return self.counts[path]


class _Handler(BaseHTTPRequestHandler):
    """FakeUnsplash's answers; `fake` is the server it answers for (set per server by `_make_handler`)."""

    fake: FakeUnsplash
    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN does; every response has a Content-Length

    def log_message(self, *args):  # quiet: tests read the FakeUnsplash log instead
        pass

    def do_GET(self):
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        n = self.fake._arrive(parts.path, query, dict(self.headers.items()))
        try:
            if parts.path == "/data/lite/latest":
                self._send(302, b"", headers={"Location": self.fake.url + self.fake.archive_path})
            elif parts.path == self.fake.archive_path and self.fake.archive:
                self._archive(n)
            elif parts.path.startswith("/photo-"):
                self._image(parts.path[len("/photo-"):], query, n)
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, killed)
            self.close_connection = True

    def _send(self, status, body, content_type="text/plain", headers=None, send_bytes=None, drip=False, sized=True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if sized:
            self.send_header("Content-Length", str(len(body)))
        else:  # the end of the body is the end of the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if drip:  # 64 bytes at a time, each well inside a read timeout, the whole far beyond any patience
            for start in range(0, len(body), 64):
                self.wfile.write(body[start:start + 64])
                self.wfile.flush()
                time.sleep(self.fake.slow_s)
            return
        self.wfile.write(body if send_bytes is None else body[:send_bytes])
        if send_bytes is not None and send_bytes < len(body):  # a dropped connection
            self.close_connection = True

    def _archive(self, n):
        faults = self.fake.archive_faults
        gzipped = "gzip" in faults  # whatever the client accepts: a misbehaving proxy
        data = self.fake.second_archive if self.fake.second_archive and n > 1 else self.fake.archive
        data = gzip.compress(data, mtime=0) if gzipped else data
        etag = archive_etag(data).strip('"') if "unquoted-etag" in faults else archive_etag(data)
        if "500-once" in self.fake.archive_faults and n == 1:
            return self._send(500, b"internal error")
        if "terminal-escapes" in faults:  # a reason phrase that would erase the line and print its own
            self.send_response(403, "\x1b[2K\rdownload: OK\x07")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if "html-page" in faults:
            return self._send(200, SIGN_IN_PAGE, "text/html")
        if "drip-headers" in faults:
            return self._drip_headers()
        if "204" in faults:
            return self._send(204, b"")
        if "control-etag" in faults:  # one requests refuses to send back in If-Range
            etag = "\x1c" + etag
        headers = {"Accept-Ranges": "bytes"} | ({} if "no-validator" in faults else {"ETag": etag})
        if "unquoted-etag" in faults:  # beside a date, which must not be taken for the validator
            headers["Last-Modified"] = "Wed, 02 Dec 2026 10:00:00 GMT"
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        start = 0
        ranged = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if ranged.startswith("bytes=") and "html-206" in faults:
            return self._send(206, SIGN_IN_PAGE, "text/html", headers={
                "Content-Range": f"bytes {ranged[len('bytes='):].split('-')[0]}-{len(data) - 1}/{len(data)}"})
        if ranged.startswith("bytes=") and "ignore-range" not in faults and \
                (if_range in (None, etag) or "ignore-if-range" in faults):
            start = int(ranged[len("bytes="):].split("-")[0])
            if start >= len(data):
                return self._send(416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        unsized = "cut-unsized-once" in faults and n == 1
        dropping = "drop-always" in faults or ("drop-once" in faults and n == 1) or unsized
        drop = len(body) // 2 if dropping else None
        if "odd-length" in faults:  # a digit to str.isdigit, not to int()
            headers["Content-Length"], unsized = "\u00b2", True
        self._send(206 if start else 200, body, "application/zip", headers, send_bytes=drop,
                   drip="drip" in faults, sized=not unsized)

    def _image(self, photo_id, query, n):
        fault = self.fake.image_faults.get(photo_id, "")
        if isinstance(fault, list):  # one fault per request, the last one for every request after
            fault = fault[min(n, len(fault)) - 1]
        delay = self.fake.delay_s + (self.fake.slow_s if fault == "slow" else 0.0)
        if fault == "stall-once" and n == 1:
            delay += self.fake.stall_s
        time.sleep(delay)
        if fault in ("403", "404", "410"):
            return self._send(int(fault), b"gone")
        if fault == "redirect-ftp":  # a redirect urllib3 cannot follow
            return self._send(302, b"", headers={"Location": "ftp://127.0.0.1/photo.jpg"})
        if fault == "huge-header":  # past http.client's 64 KiB a line
            return self._send(200, b"", "image/jpeg", headers={"X-Padding": "x" * (100 << 10)})
        if fault == "redirect-loop" or (fault == "redirect" and "hop" not in query):
            return self._send(302, b"", headers={"Location": self.path + ("&hop=1" if fault == "redirect" else "")})
        if fault == "drip-headers":
            return self._drip_headers()
        if fault == "empty-once" and n == 1:
            return self._send(200, b"", "image/jpeg")
        if fault == "html-as-jpeg-once" and n == 1:  # a captive portal's page, labelled as what was asked for
            return self._send(200, SIGN_IN_PAGE, "image/jpeg")
        if fault == "junk-as-jpeg":  # an outage's error body, the same for every photo, that starts as a JPEG
            return self._send(200, b"\xff\xd8\xff\xe0Service Unavailable", "image/jpeg")
        if fault == "junk-per-photo":  # labelled as nothing in particular
            return self._send(200, b"Service unavailable for " + self.path.encode(), "application/octet-stream")
        if fault == "html-page":
            return self._send(200, SIGN_IN_PAGE, "text/html")
        if fault == "png-bomb":
            bomb, buffer = Image.new("P", (10 * int(query["w"]), 10 * int(query["h"]))), io.BytesIO()
            bomb.putpalette([255, 0, 0, 0, 255, 0])
            bomb.save(buffer, "PNG", transparency=1)
            return self._send(200, buffer.getvalue(), "image/png")
        if (fault == "429-once" and n == 1):
            return self._send(429, b"slow down", headers={"Retry-After": "1"})
        if fault == "429-wait-an-hour":
            return self._send(429, b"slow down", headers={"Retry-After": "3600"})
        if fault == "503-unreadable-retry-after-once" and n == 1:  # RFC 9110 allows only seconds or a date
            return self._send(503, b"busy", headers={"Retry-After": self.fake.unreadable_retry_after})
        if (fault == "500-twice" and n <= 2) or fault == "500-always":
            return self._send(500, b"internal error")
        width, height = int(query.get("w", 640)), int(query.get("h", 480))
        if fault == "tiny":  # a placeholder pixel, scaled up it is one flat colour
            width, height = 1, 1
        if fault == "wrong-size":
            width, height = width + width // 2, height
        placeholder = fault in ("placeholder", "gray-placeholder", "placeholder-tagged")
        rgb = render_photo("placeholder" if placeholder else photo_id, width, height)
        if fault in ("gray", "gray-placeholder"):
            rgb = np.repeat(rgb.mean(axis=-1, keepdims=True), 3, axis=-1).astype(np.uint8)
        if fault == "rgba-png":
            alpha = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, axis=0)
            body, content_type = encode(np.dstack([rgb, alpha]), "png", 0)
        else:
            body, content_type = encode(rgb, query.get("fm", "jpg"), int(query.get("q", 75)), photo_profile(fault))
        if fault == "bad-exif":
            body = exif_that_breaks_pillow(rgb)
        if fault == "placeholder-tagged":  # a COM segment after SOI: other bytes, the same pixels
            comment = photo_id.encode()
            body = body[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + body[2:]
        if fault == "trailing-junk":  # decoders stop at the end-of-image marker
            body += np.random.default_rng(0).bytes(256 << 10)
        if fault == "corrupt":  # consistent bytes, correctly framed: only a full decode notices
            body = body[: len(body) // 2]
        if fault == "cut-ending-eoi":  # cut short, then ended as a whole JPEG ends: Pillow decodes it without error
            scan = body.index(b"\xff\xda")  # start of scan: the coded pixels follow
            body = body[: scan + (len(body) - scan) * 2 // 5] + b"\xff\xd9"
        if fault == "corrupt-varying":
            body = body[: len(body) // (2 + n % 2)]
        cut = fault in ("truncated-once", "cut-unsized-once") and n == 1 or fault == "cut-unsized-always"
        unsized = fault == "cut-unsized-once" and n == 1 or fault == "cut-unsized-always"
        if fault == "slow-head-and-body":
            return self._slow_head_and_body(body, content_type)
        self._send(200, body, content_type, send_bytes=len(body) // 3 if cut else None, drip=fault == "drip",
                   sized=not unsized)

    def _slow_head_and_body(self, body, content_type):
        self.send_response_only(200)
        self.flush_headers()
        for i in range(4):
            time.sleep(self.fake.slow_s)
            self.wfile.write(b"X-Wait-%d: 1\r\n" % i)
            self.wfile.flush()
        self.wfile.write(b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n" % (content_type.encode(), len(body)))
        for start in range(0, len(body), -(-len(body) // 4)):
            time.sleep(self.fake.slow_s)
            self.wfile.write(body[start:start - (-len(body) // 4)])
            self.wfile.flush()

    def _drip_headers(self):
        self.send_response_only(200)
        self.flush_headers()
        for i in range(10_000):
            self.wfile.write(b"X-Wait-%d: 1\r\n" % i)
            self.wfile.flush()
            time.sleep(self.fake.slow_s)



def _make_handler(server: FakeUnsplash) -> type[_Handler]:
    return type("Handler", (_Handler,), {"fake": server})
