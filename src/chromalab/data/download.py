"""Stage `download`: fetch the Unsplash Lite zip and extract the tables the pipeline reads.

data/raw/ ends up with photos.tsv, keywords.tsv, colors.tsv (when the archive has it) and source.json.
The archive itself is not a DVC output: its partial download lives in data/cache/downloads/ so that
an interrupted 700 MB download resumes (HTTP Range) instead of starting over, even across `dvc repro`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import lzma
import os
import re
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from chromalab.config import Params
from chromalab.data.formats import MAX_LINE_BYTES, REQUIRED_COLUMNS, open_table
from chromalab.data.http import (MAX_REDIRECTS, NOT_HTTP, PAGE_TYPES, RETRY_STATUSES, TOO_MANY_REDIRECTS, USER_AGENT,
                                 content_type, retry_policy, transport_failure, with_headers_deadline)
from chromalab.errors import ChromalabError, printable
from chromalab.files import staged_dir, write_text_atomic

# Retries per request (connection errors, 429, 5xx; urllib3 backs off and honours Retry-After), and
# how many times in a row a dropped transfer may resume without receiving a single new byte.
DOWNLOAD_RETRIES = 5
DOWNLOAD_BACKOFF_S = 0.5
DOWNLOAD_TIMEOUT_S = (15.0, 60.0)  # (connect, read between bytes)
HEADERS_DEADLINE_S = 60.0  # for an answer's status line and headers in all (the read timeout holds per read)
# A server can drip a byte inside every read timeout and never finish: a transfer that brings fewer than
# STALL_MIN_BYTES in a window is broken off and resumed, and counts as a try without progress.
STALL_WINDOW_S = 120.0
STALL_MIN_BYTES = 1 << 17  # 128 KiB per 2 minutes, about 1 KiB/s: at that rate the archive would take weeks
TOO_SLOW = "too slow"
# A connection that drops mid-chunk loses that chunk (urllib3 discards a short read): keep chunks small.
CHUNK_BYTES = 1 << 16
ZIP_START = b"PK"  # every zip (a local file header, or the end record of an empty one)
MAX_ARCHIVE_BYTES = 4 << 30  # the Lite zip is ~700 MB: far beyond, the server is filling the disk, not sending it

# Beside the tables split reads (formats.REQUIRED_COLUMNS), colors (Unsplash's dominant colours per photo), which
# nothing here reads yet; everything else in the zip is never decompressed.
OPTIONAL_COLUMNS = {"colors": ("photo_id",)}
TABLES = {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}
# `photos.tsv`, `photos.tsv000`, and 1.3.0's tab-separated `photos.csv000`, in any folder of the zip.
TABLE_MEMBER = re.compile(r"(?:^|/)(?P<table>photos|keywords|colors)\.(?:tsv|csv)(?P<part>\d*)$", re.IGNORECASE)
# The whole zip unpacks to ~1 GB and compresses ~5-10x; tables far beyond are a broken or hostile zip (and
# DVC would cache them a second time).
MAX_TABLES_BYTES = 4 << 30
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_MIN_BYTES = 1 << 20  # a tiny member may legitimately compress very well
MAX_MEMBERS = 10_000  # the Lite zip holds a few dozen entries; zipfile keeps every one listed in memory


def run_download(params: Params, out_dir: Path = Path("data/raw"), cache_dir: Path = Path("data/cache")) -> Path:
    """Fill `out_dir` with the tables of the archive at params.data.url (or record a folder source)."""
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    if params.data.source == "folder":
        # not data.folder: the stage does not depend on it (dvc.yaml), and nothing reads it from here
        with staged_dir(out_dir) as tmp:
            _write_json(tmp / "source.json", {"source": "folder"})
        tqdm.write("download: nothing to download (data.source: folder; split reads data.folder)", file=sys.stderr)
        return out_dir

    url = params.data.url
    local = local_archive_path(url)
    if local is not None:
        if not local.is_file():
            raise ChromalabError(f"data.url: {local} does not exist; set data.url to the downloaded Lite zip")
        archive, resolved_url = local, str(local)
    else:
        archive, resolved_url = fetch_archive(url, cache_dir / "downloads")

    try:
        digest, size = check_digest(archive, url, params.data.sha256)
        with staged_dir(out_dir) as tmp:
            members, rows = extract_tables(archive, tmp)
            _write_json(tmp / "source.json", {
                "source": "unsplash", "url": url, "resolved_url": resolved_url,
                "sha256": digest, "size": size, "rows": rows, "members": members,
            })
    except ChromalabError as exc:
        if local is None:  # never leave a bad download where the next run would resume it
            raise ChromalabError(f"{exc} ({_set_aside(archive)})") from None
        raise
    except Exception as exc:  # a failure nobody foresaw: its traceback is shown, but it must not stick either
        if local is not None:
            raise
        exc.add_note(_set_aside(archive))
        raise
    if local is None:  # the tables are the stage's output; 700 MB of zip need not stay, nor a rejected one
        archive.unlink()
        _meta_path(archive).unlink(missing_ok=True)
        _rejected_path(archive).unlink(missing_ok=True)
    tqdm.write(f"download: {', '.join(f'{t} {n:,} rows' for t, n in rows.items())} -> {out_dir}", file=sys.stderr)
    return out_dir


def check_digest(archive: Path, url: str, expected: str) -> tuple[str, int]:
    """(SHA-256, size) of `archive`; an error if data.sha256 is set and differs."""
    digest, expected = sha256_file(archive), expected.strip().lower()
    if expected and digest != expected:
        raise ChromalabError(
            f"{url}: SHA-256 {digest} does not match data.sha256 {expected}; "
            "check data.sha256 against CHANGELOG.md of unsplash/datasets for this release"
        )
    return digest, archive.stat().st_size


def _set_aside(archive: Path) -> str:
    """Move a download that failed its checks out of the way of the next run's resume; says where."""
    aside = _rejected_path(archive)
    os.replace(archive, aside)
    _meta_path(archive).unlink(missing_ok=True)
    return f"the download is kept aside as {aside}; the next run downloads it afresh"


def _rejected_path(archive: Path) -> Path:
    return archive.with_suffix(".rejected")


def local_archive_path(url: str) -> Path | None:
    """A plain path or file:// URL → its Path; an http(s) URL → None."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme == "file":
        return Path(url2pathname(unquote(parts.path)))
    if parts.scheme and len(parts.scheme) > 1:  # one letter is a Windows drive, i.e. a path
        raise ChromalabError(f"data.url: unsupported scheme {parts.scheme!r} in {url}; use https://, file:// or a path")
    return Path(url).expanduser()


# ---------------------------------------------------------------------------------------------- fetch


def retrying_session(retries: int, backoff_s: float) -> requests.Session:
    """A requests Session whose adapter retries connection errors, 429 and 5xx with urllib3's backoff."""
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    session.max_redirects = MAX_REDIRECTS  # requests follows them itself (urllib3's count is for photos)
    adapter = HTTPAdapter(max_retries=retry_policy(retries, backoff_s))
    with_headers_deadline(adapter.poolmanager, HEADERS_DEADLINE_S)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch_archive(url: str, downloads_dir: Path) -> tuple[Path, str]:
    """Download `url` into downloads_dir, resuming a previous partial download; returns (file, final URL).

    urllib3's Retry covers failures before a response; a connection that drops mid-body is resumed
    here with a Range request (If-Range guards against the file having changed on the server). A try that
    adds no byte to the part counts against DOWNLOAD_RETRIES, so a server that drops every transfer
    before it gets further, or never resumes, ends in an error instead of a loop.
    """
    downloads_dir.mkdir(parents=True, exist_ok=True)
    part = partial_download_path(url, downloads_dir)
    meta_path = _meta_path(part)
    session = retrying_session(DOWNLOAD_RETRIES, DOWNLOAD_BACKOFF_S)
    tries_without_progress, furthest = 0, 0
    while True:
        before = _resumable_size(part, meta_path)
        # identity: a gzip-encoded body would be stored decoded, and Range offsets count encoded bytes
        headers = {"Accept-Encoding": "identity"}
        if before:
            headers |= {"Range": f"bytes={before}-", "If-Range": _read_meta(meta_path)["validator"]}
        try:
            response = session.get(url, headers=headers, stream=True, timeout=DOWNLOAD_TIMEOUT_S)
        # urllib3's own errors pass through requests unwrapped where it maps none (a host name it cannot parse)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise ChromalabError(_unreachable_message(url, _failure_reason(exc))) from None
        with response:
            lost = _receive(response, url, part, meta_path, before)
        if lost is None:
            return part, response.url
        got = part.stat().st_size if part.exists() else 0
        # progress is getting further than ever (a part that must start over, with no validator, gets as far
        # again), at more than a drip
        progressed = got > furthest and not lost.startswith(TOO_SLOW)
        tries_without_progress = 0 if progressed else tries_without_progress + 1
        furthest = max(furthest, got)
        if tries_without_progress > DOWNLOAD_RETRIES:
            raise ChromalabError(_unreachable_message(url, f"{lost}, {DOWNLOAD_RETRIES + 1} times without progress"))
        # a server that restarts needs time: tries spent within milliseconds would end the download for nothing
        wait_s = DOWNLOAD_BACKOFF_S * 2 ** (tries_without_progress - 1) if tries_without_progress else 0.0
        tqdm.write(f"download: {lost} after {got:,} bytes; resuming" + (f" in {wait_s:g} s" if wait_s else ""),
                   file=sys.stderr)
        time.sleep(wait_s)


def _resumable_size(part: Path, meta_path: Path) -> int:
    """The bytes of `part` a Range request may continue from: none without a validator for If-Range, since
    then nothing tells a changed file (a new release, an error page) from the one the part began."""
    size = part.stat().st_size if part.exists() else 0
    if size and not _sendable(_read_meta(meta_path).get("validator", "")):
        part.unlink()
        return 0
    return size


def _receive(response: requests.Response, url: str, part: Path, meta_path: Path, offset: int) -> str | None:
    """Append (206) or write (200) `response`'s body to `part`: None once the file is whole, else what broke
    off the transfer (worth another try). A 4xx/5xx answer or a body that is no zip raises."""
    if response.status_code == 416 and offset:
        if _content_range_total(response) == offset:  # killed after the last byte: nothing left
            return None
        part.unlink()
        return "the server refused to resume (HTTP 416)"
    if response.status_code not in (200, 206):  # an error, or an answer with no file (204, 304, a bare 302)
        retried = f" after {DOWNLOAD_RETRIES} retries" if response.status_code in RETRY_STATUSES else ""
        raise ChromalabError(
            f"{url}: HTTP {response.status_code} {printable(response.reason or '')}{retried} instead of the zip; "
            "check data.url, or download the zip elsewhere and set data.url to its local path"
        )
    resumed = response.status_code == 206
    meta = _read_meta(meta_path)
    if resumed and (refused := _not_a_continuation(response, offset, meta.get("validator", ""), meta.get("kind"))):
        why, start_over = refused
        if start_over:  # a page (a rate limit) says nothing about the part: it stays for the next try
            part.unlink(missing_ok=True)
        return why
    # the whole file's size: a 206 names it in Content-Range, a 200 in Content-Length
    length = str(_content_range_total(response) if resumed else response.headers.get("Content-Length"))
    expected = int(length) if length.isascii() and length.isdigit() else None
    try:
        first = response.raw.read1(CHUNK_BYTES, decode_content=True)
        # judged before the part is touched: an odd answer to a resume must not cost what has arrived
        if odd := _not_the_archive(response, url, first, expected, resumed):
            return odd
        if not resumed:  # a server that ignores Range (or a changed file) sends it all again
            offset = 0
            _write_json(meta_path, {"url": url, **_validator_of(response)})
        with part.open("ab" if resumed else "wb") as f, tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc="download"
        ) as bar:
            broken = _copy_body(response, url, f, bar, first)
            got = f.tell()
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        return _failure_reason(exc, "connection lost")
    except ArchiveTooLarge:
        part.unlink(missing_ok=True)  # what came is no archive: a later resume must not start from it
        raise
    if broken or (expected is not None and got < expected):
        return broken or f"the transfer ended at {got:,} of {expected:,} bytes"
    if expected is None and not zipfile.is_zipfile(part):  # a body cut short, with no size to tell
        return "the transfer ended before the zip's end record"
    return None


def _not_the_archive(response: requests.Response, url: str, first: bytes, expected: int | None,
                     resumed: bool) -> str | None:
    """Why an answer whose body starts with `first` is not (the rest of) the archive: an empty answer is
    worth another try; a page, or far more than the archive, raises."""
    if (expected or 0) > MAX_ARCHIVE_BYTES:
        raise ChromalabError(_too_large_message(url, f"announces {expected:,} bytes"))
    if not first:
        return "the server sent an empty answer"
    if not resumed and not first.startswith(ZIP_START[: len(first)]):
        raise ChromalabError(_not_a_zip_message(url, response, first))
    return None


def _not_a_continuation(response: requests.Response, offset: int, validator: str,
                        kind: str | None) -> tuple[str, bool] | None:
    """(why a 206 cannot continue the part, whether the part must start over), or None if it can: other bytes
    than asked for, a page (the part is kept), or another version of the file (a server that ignores If-Range),
    also when the 206 names none. `kind`: the validator's header (parts from before it was recorded: a quoted
    value is an ETag)."""
    if _content_range_start(response) != offset or _encoded(response):
        return "the server sent other bytes than asked for", True
    if content_type(response.headers).startswith(PAGE_TYPES):
        return f"the server sent a {content_type(response.headers)} page instead of the archive's bytes", False
    kind = kind or ("ETag" if validator.startswith(('"', "W/")) else "Last-Modified")
    now = response.headers.get(kind, "")
    if validator and now != validator:  # a 206 without it may be any version: not worth a damaged zip
        return f"the file changed on the server ({kind} {printable(validator)} → {printable(now) or 'none'}); " \
            "starting over", True
    return None


def _copy_body(response: requests.Response, url: str, f, bar: tqdm, first: bytes) -> str | None:
    """Write `first`, then the rest of the body as it arrives, to `f`: None at its end, or why it was broken off
    (a drip)."""
    window_start, window_bytes, chunk = time.monotonic(), 0, first
    while chunk:
        if f.tell() + len(chunk) > MAX_ARCHIVE_BYTES:
            raise ArchiveTooLarge(_too_large_message(url, f"runs past {MAX_ARCHIVE_BYTES:,} bytes"))
        f.write(chunk)
        bar.update(len(chunk))
        window_bytes += len(chunk)
        if time.monotonic() - window_start > STALL_WINDOW_S:
            if window_bytes < STALL_MIN_BYTES:
                return f"{TOO_SLOW} ({window_bytes:,} bytes in {STALL_WINDOW_S:g} s)"
            window_start, window_bytes = time.monotonic(), 0
        # read1: what has arrived (iter_content would wait for a whole chunk), so a drip is seen as one
        chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
    return None


class ArchiveTooLarge(ChromalabError):
    """The body ran past MAX_ARCHIVE_BYTES: not the archive, whatever it is."""


def _too_large_message(url: str, what: str) -> str:
    return (f"{url}: the answer {what}, far more than the Lite zip (about 700 MB); "
            "check data.url, or download the zip elsewhere and set data.url to its path")


def partial_download_path(url: str, downloads_dir: Path) -> Path:
    """Where the download of `url` grows until it is complete (one file per URL)."""
    return downloads_dir / f"lite-{hashlib.sha256(url.encode()).hexdigest()[:16]}.zip.part"


def _unreachable_message(url: str, reason: str) -> str:
    return (
        f"cannot download {url}: {reason}; without internet access, download the Lite zip elsewhere "
        "and set data.url in params.yaml to its local path"
    )


def _failure_reason(exc: Exception, broken: str = "connection failed") -> str:
    """What went wrong, in words: requests reports an exhausted read timeout as a ConnectionError whose
    MaxRetryError names the real cause."""
    if isinstance(exc, requests.TooManyRedirects):
        return TOO_MANY_REDIRECTS
    if isinstance(exc, (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL)):  # a redirect's
        return f"{NOT_HTTP} ({printable(str(exc), 100)})"
    cause = exc.args[0] if exc.args else None
    cause = getattr(cause, "reason", cause)
    if isinstance(cause, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError too, in urllib3 2
        return transport_failure(cause)
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)) or \
            isinstance(cause, urllib3.exceptions.TimeoutError):
        return "timed out"
    return f"{broken} ({transport_failure(cause if isinstance(cause, Exception) else exc)})"


def _not_a_zip_message(url: str, response: requests.Response, head: bytes) -> str:
    kind = content_type(response.headers) or "no Content-Type"
    return (f"{url}: the server sent something that is not a zip archive ({kind}, starting {head[:16]!r}); "
            "check data.url (a sign-in or error page?), or download the zip elsewhere and set data.url to its path")


def _validator_of(response: requests.Response) -> dict:
    """What If-Range may carry, and which header it came from: a strong ETag, else Last-Modified (RFC 9110
    §13.1.5); none for an encoded body (a server that gzips despite Accept-Encoding: identity): the part holds
    it decoded, and a Range would count encoded bytes, so such a download starts over instead of resuming."""
    etag, modified = response.headers.get("ETag", ""), response.headers.get("Last-Modified", "")
    if _encoded(response):
        return {"validator": "", "kind": None}
    if _sendable(etag) and not etag.startswith("W/"):
        return {"validator": etag, "kind": "ETag"}
    return {"validator": modified if _sendable(modified) else "", "kind": "Last-Modified"}


def _sendable(validator: str) -> bool:
    """Whether a validator can go back in If-Range: requests refuses a header with control characters or
    leading white space before sending it, which would fail every resume of the part for good."""
    return re.fullmatch(r"[\x21-\x7e][\x20-\x7e]*", validator) is not None


def _encoded(response: requests.Response) -> bool:
    return response.headers.get("Content-Encoding", "identity").strip().lower() != "identity"


def _content_range_start(response: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _content_range_total(response: requests.Response) -> int | None:
    match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- extract


def extract_tables(archive: Path, out_dir: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Write out_dir/<table>.tsv for each table the pipeline reads; returns (members used, row counts)."""
    _check_member_count(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:  # ValueError: a name that is no UTF-8
        raise ChromalabError(f"{archive}: not a readable zip archive ({exc}); check data.url") from None
    with zf:
        parts = _table_parts(zf, archive)
        total = sum(info.file_size for infos in parts.values() for info in infos)
        members: dict[str, list[str]] = {}
        rows: dict[str, int] = {}
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="extract") as bar:
            for table, infos in parts.items():
                dest = out_dir / f"{table}.tsv"
                try:
                    starts = _concatenate_parts(zf, infos, dest, table, archive, bar)
                    rows[table] = count_rows(dest)
                except RowsRunTogether as exc:
                    raise ChromalabError(
                        f"{archive}: table '{table}', {_zip_line(starts, exc.line)}: rows run together (a quote "
                        "never closed); the zip is damaged: download it again, or check data.url") from None
                except (UnicodeDecodeError, csv.Error) as exc:
                    raise ChromalabError(f"{archive}: table '{table}' is not UTF-8 tab-separated text ({exc}); "
                                         "is this an Unsplash Lite zip?") from None
                # a directory that reads, data that doesn't: damaged (each decompressor says so its own way),
                # encrypted (RuntimeError), or compressed in a way zipfile cannot read (NotImplementedError)
                except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, RuntimeError, NotImplementedError,
                        OSError, ValueError, struct.error) as exc:
                    raise ChromalabError(f"{archive}: damaged or unreadable zip archive ({exc}); check data.url, "
                                         "or download the zip again") from None
                members[table] = [info.filename for info in infos]
    return members, rows


def _table_parts(zf: zipfile.ZipFile, archive: Path) -> dict[str, list[zipfile.ZipInfo]]:
    """The members of each table, in part order, after refusing unsafe entries."""
    found: dict[str, list[tuple[int, zipfile.ZipInfo]]] = {}
    for info in zf.infolist():
        name = info.filename
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
            raise ChromalabError(f"{archive}: unsafe entry {name!r} (absolute path or '..'); refusing this archive")
        match = TABLE_MEMBER.search(path.as_posix())
        if info.is_dir() or not match:
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise ChromalabError(
                f"{archive}: entry {name!r} has a compression ratio over {MAX_COMPRESSION_RATIO}:1 "
                "(a zip bomb?); refusing this archive"
            )
        part = int(match["part"]) if match["part"] else -1
        found.setdefault(match["table"].lower(), []).append((part, info))

    # zipfile never reads a member past the size the zip lists for it, so the listed sizes bound the disk used
    listed = sum(info.file_size for numbered in found.values() for _, info in numbered)
    if listed > MAX_TABLES_BYTES:
        raise ChromalabError(f"{archive}: its tables unpack to {listed:,} bytes (the whole Lite zip unpacks to "
                             f"about 1 GB, limit {MAX_TABLES_BYTES:,}); refusing this archive: check data.url")
    for table in REQUIRED_COLUMNS:
        if table not in found:
            raise ChromalabError(
                f"{archive}: no '{table}' table (expected {table}.tsv000 or similar); is this an Unsplash Lite zip?"
            )
    parts: dict[str, list[zipfile.ZipInfo]] = {}
    for table, numbered in found.items():
        numbered.sort(key=lambda item: item[0])
        numbers = [n for n, _ in numbered]
        folders = {str(PurePosixPath(info.filename).parent) for _, info in numbered}
        kinds = {(PurePosixPath(info.filename).suffix.lower().rstrip("0123456789"), n < 0) for n, info in numbered}
        # photos.tsv beside photos.csv000 (or tsv000): two copies of one table, not two parts of it
        if len(set(numbers)) != len(numbers) or len(folders) > 1 or len(kinds) > 1:
            names = ", ".join(info.filename for _, info in numbered)
            raise ChromalabError(f"{archive}: ambiguous parts for table '{table}' ({names}); repack the archive")
        parts[table] = [info for _, info in numbered]
    return parts


def _check_member_count(archive: Path) -> None:
    """Refuse a zip listing over MAX_MEMBERS entries before zipfile reads them all: it holds each entry's record
    in memory (README, "Measured figures behind the code")."""
    end_record = getattr(zipfile, "_EndRecData", None)  # private, but zipfile's own (zip64-aware) reader
    try:
        with archive.open("rb") as f:
            end = end_record(f) if end_record else None
    except (OSError, zipfile.BadZipFile, struct.error):
        return  # ZipFile names the problem
    entries = end[zipfile._ECD_ENTRIES_TOTAL] if end else 0
    if entries > MAX_MEMBERS:
        raise ChromalabError(f"{archive}: {entries:,} entries (the Lite zip has a few dozen, limit {MAX_MEMBERS:,}); "
                             "refusing this archive: check data.url")


def _concatenate_parts(zf, infos, dest: Path, table: str, archive: Path, bar: tqdm) -> list[tuple[int, str, int]]:
    """Parts may each start with the header row: keep the first part's header once, check the others'. Returns
    where each part begins: (line of `dest`, member, line of the member), to name a line of the zip."""
    header: bytes | None = None
    starts, line = [], 1
    with dest.open("wb") as out:
        for info in infos:
            with zf.open(info) as member:
                first, at = member.readline(MAX_LINE_BYTES + 1), 1  # capped: a header is a few hundred bytes
                if len(first) > MAX_LINE_BYTES:
                    raise ChromalabError(_long_line_message(archive, info.filename, 1))
                if header is None:
                    _check_columns(first, table, info.filename, archive)
                    header = first
                elif _is_header(first):  # a part's own copy of the header: checked, not copied
                    if _bare(first) != _bare(header):
                        raise ChromalabError(
                            f"{archive}: {info.filename} has other columns than {infos[0].filename}; "
                            "repack the archive"
                        )
                    bar.update(len(first))
                    first, at = b"", 2
                starts.append((line, info.filename, at))
                line += _copy_member(member, out, bar, first, at, info.filename, archive)
    return starts


def _copy_member(member, out, bar: tqdm, first: bytes, at: int, name: str, archive: Path) -> int:
    """Copy `first`, then the rest of `member` (from its line `at`), to `out`; returns the lines copied (a last
    line without its newline is ended: the next part must start on a line of its own)."""
    lines, chunk = 0, first or member.read(CHUNK_BYTES)
    open_bytes = 0  # of the line not yet ended
    while chunk:
        newline = chunk.find(b"\n")  # lines inside a chunk are shorter than it, and CHUNK_BYTES < MAX_LINE_BYTES
        if open_bytes + (len(chunk) if newline < 0 else newline) > MAX_LINE_BYTES:
            raise ChromalabError(_long_line_message(archive, name, at + lines))
        lines += chunk.count(b"\n")
        open_bytes = open_bytes + len(chunk) if newline < 0 else len(chunk) - chunk.rindex(b"\n") - 1
        out.write(chunk)
        bar.update(len(chunk))
        chunk = member.read(CHUNK_BYTES)
    if open_bytes:
        out.write(b"\n")
        lines += 1
    return lines


def _long_line_message(archive: Path, name: str, line: int) -> str:
    return (f"{archive}: {name} line {line} runs past {MAX_LINE_BYTES:,} bytes (a row is a few KB); "
            "the zip is damaged or no Unsplash Lite zip: check data.url, or download it again")


def _zip_line(starts: list[tuple[int, str, int]], line: int) -> str:
    """Line `line` of a table joined from parts, as the member and line of the zip it came from."""
    start, name, at = [s for s in starts if s[0] <= line][-1]
    return f"{name} line {line - start + at}"


def _bare(header_line: bytes) -> bytes:
    """A header line as its columns: without a byte-order mark (a part of its own may start with one)."""
    return header_line.removeprefix(codecs.BOM_UTF8).rstrip(b"\r\n")


def _is_header(line: bytes) -> bool:
    return line.decode("utf-8-sig", errors="replace").split("\t", 1)[0].strip() == "photo_id"


def _check_columns(header_line: bytes, table: str, member: str, archive: Path) -> None:
    columns = next(csv.reader([header_line.decode("utf-8-sig", errors="replace").rstrip("\r\n")], delimiter="\t"), [])
    missing = [c for c in TABLES[table] if c not in columns]
    if missing:
        raise ChromalabError(
            f"{archive}: table '{table}' ({member}) lacks column(s) {', '.join(missing)}; "
            "is this an Unsplash Lite zip?"
        )


class RowsRunTogether(Exception):
    """A field holding tabs and line ends: the rows after a quote never closed, run into it."""

    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


def count_rows(path: Path) -> int:
    """The rows of an extracted table; RowsRunTogether at the first row that swallowed the ones after it."""
    f, reader = open_table(path)
    with f:
        if reader.fieldnames is None:  # reads the header (so line_num is where the rows begin); none: no rows
            return 0
        rows, end = 0, reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            fields = [v for v in row.values() if isinstance(v, str)]  # extra fields are a list, missing ones None
            # A quoted newline is a field's own (an old release had one in a keyword; descriptions may have
            # several), but a tab beside it is the next row's columns, swallowed by a quote never closed.
            if any("\t" in v and "\n" in v for v in fields):
                raise RowsRunTogether(start)
            rows += 1
    return rows


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
