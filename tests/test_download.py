"""Stage `download`: a real HTTP server (tests/fake_unsplash.py), local archives, hostile zips."""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import socket
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fake_unsplash import PHOTO_COLUMNS, archive_etag, lite_photos, make_lite_archive

from chromalab.data import download
from chromalab.config import parse_params
from chromalab.data.download import open_table, partial_download_path, run_download
from chromalab.errors import ChromalabError

KINDS = {"person": 6, "person_user": 2, "low_confidence": 2, "bw_keyword": 2, "caption": 1, "other": 4}


@pytest.fixture(scope="module")
def photos():
    return lite_photos(KINDS, seed=1)


def params(**data):
    return parse_params({"data": data})


def read_rows(path: Path) -> list[dict[str, str]]:
    f, reader = open_table(path)
    with f:
        return list(reader)


def check_tables(out: Path, photos, archive: bytes) -> dict:
    """The extracted tables hold every photo and keyword row; source.json describes the zip."""
    source = json.loads((out / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(archive).hexdigest()
    assert source["size"] == len(archive)
    n_keywords = sum(len(p.keywords) for p in photos)
    assert source["rows"] == {"photos": len(photos), "keywords": n_keywords, "colors": len(photos)}
    assert [r["photo_id"] for r in read_rows(out / "photos.tsv")] == [p.photo_id for p in photos]
    keywords = [r["keyword"] for r in read_rows(out / "keywords.tsv")]
    assert len(keywords) == n_keywords
    assert "smiling\nface" in keywords  # the quoted newline survived as one field of one row
    return source


def filled_archive(photos, base_url: str, seed: int, size: int = 300_000) -> bytes:
    """A Lite zip with `size` incompressible bytes beside the tables, so that a transfer is several chunks long
    and a drop happens mid-file."""
    filler = np.random.default_rng(seed).bytes(size)
    return make_lite_archive(photos, base_url, extra_entries={"DOCS-media.bin": filler})


def downloaded(fake_unsplash, photos, tmp_path: Path, faults: set[str], seed: int, size: int = 300_000):
    """A filled archive served with `faults` and downloaded: (the archive, the stage's output folder)."""
    archive = filled_archive(photos, fake_unsplash.url, seed, size)
    fake_unsplash.archive, fake_unsplash.archive_faults = archive, faults
    return archive, run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")


def left_by_a_killed_run(fake_unsplash, tmp_path: Path, archive: bytes) -> Path:
    """The partial download a killed run leaves behind: the first 123,456 bytes and their validator."""
    part = partial_download_path(fake_unsplash.latest_url, tmp_path / "cache" / "downloads")
    part.parent.mkdir(parents=True)
    part.write_bytes(archive[:123_456])
    meta = {"url": fake_unsplash.latest_url, "validator": archive_etag(archive)}
    download._meta_path(part).write_text(json.dumps(meta))
    return part


def test_download_follows_redirect_and_extracts_only_the_needed_tables(fake_unsplash, photos, tmp_path):
    archive = make_lite_archive(photos, fake_unsplash.url)
    fake_unsplash.archive = archive
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")

    assert out == tmp_path / "raw"
    assert sorted(p.name for p in out.iterdir()) == ["colors.tsv", "keywords.tsv", "photos.tsv", "source.json"]
    source = check_tables(out, photos, archive)
    assert source["url"] == fake_unsplash.latest_url
    assert source["resolved_url"] == fake_unsplash.url + fake_unsplash.archive_path
    assert source["members"]["photos"] == ["photos.tsv000"]
    # the finished download does not linger (the tables are the DVC output), nor do temp folders
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "raw"]


def test_dropped_connection_resumes_with_a_range_request(fake_unsplash, photos, tmp_path):
    archive, out = downloaded(fake_unsplash, photos, tmp_path, {"drop-once"}, 0, 400_000)

    first, second = fake_unsplash.requests_to(fake_unsplash.archive_path)
    assert "Range" not in first.headers
    assert first.headers["Accept-Encoding"] == "identity"  # a gzip-encoded body would break the byte offsets
    start = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(archive) // 2  # resumed from what had arrived, not from zero
    assert second.headers["If-Range"]  # guarded against the file changing in between
    check_tables(out, photos, archive)


def test_server_that_ignores_range_means_starting_over(fake_unsplash, photos, tmp_path):
    archive, out = downloaded(fake_unsplash, photos, tmp_path, {"drop-once", "ignore-range"}, 1)

    assert "Range" in fake_unsplash.requests_to(fake_unsplash.archive_path)[1].headers
    check_tables(out, photos, archive)  # a 200 answer replaced the part instead of being appended to it


def test_partial_download_from_an_earlier_run_is_resumed(fake_unsplash, photos, tmp_path):
    archive = filled_archive(photos, fake_unsplash.url, 2)
    fake_unsplash.archive = archive
    part = left_by_a_killed_run(fake_unsplash, tmp_path, archive)

    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    (only,) = fake_unsplash.requests_to(fake_unsplash.archive_path)
    assert only.headers["Range"] == "bytes=123456-"
    check_tables(out, photos, archive)
    assert not part.exists()


@pytest.mark.timeout(60)  # the bug this guards against is an endless loop
def test_server_that_drops_every_transfer_and_never_resumes_is_an_error_not_a_loop(
        fake_unsplash, photos, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    filler = np.random.default_rng(3).bytes(300_000)
    fake_unsplash.archive = make_lite_archive(photos, fake_unsplash.url, extra_entries={"DOCS-media.bin": filler})
    fake_unsplash.archive_faults = {"drop-always", "ignore-range"}
    with pytest.raises(ChromalabError, match="times without progress") as err:
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert "\n" not in str(err.value)
    # the first try gets half, each later one starts over and gets the same half: no progress
    assert len(fake_unsplash.requests_to(fake_unsplash.archive_path)) == download.DOWNLOAD_RETRIES + 2
    # a try with progress resumes at once; each try without waits twice as long as the one before (a server that
    # restarts gets seconds, not milliseconds)
    assert waits == [0.0] + [download.DOWNLOAD_BACKOFF_S * 2 ** k for k in range(download.DOWNLOAD_RETRIES)]

    fake_unsplash.archive_faults = {"drop-always", "no-validator"}  # each try must start over by itself
    with pytest.raises(ChromalabError, match="times without progress"):
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")


@pytest.mark.timeout(60)
def test_a_server_dripping_bytes_inside_every_timeout_is_an_error_not_a_wait_of_weeks(
        fake_unsplash, photos, tmp_path, monkeypatch, fast_backoff):
    archive = filled_archive(photos, fake_unsplash.url, 3)
    fake_unsplash.archive, fake_unsplash.archive_faults, fake_unsplash.slow_s = archive, {"drip"}, 0.01
    monkeypatch.setattr(download, "STALL_WINDOW_S", 0.3)  # ~2 KB arrive per window, far under the minimum
    with pytest.raises(ChromalabError, match=r"too slow \([\d,]+ bytes in 0.3 s\), 6 times without progress"):
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    tries = fake_unsplash.requests_to(fake_unsplash.archive_path)
    assert len(tries) == download.DOWNLOAD_RETRIES + 1
    assert all("Range" in t.headers for t in tries[1:])  # each try resumed what the last one brought

    # what a slow try brought is kept: a fair server finishes the transfer from there
    fake_unsplash.archive_faults = set()
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    check_tables(out, photos, archive)
    assert int(fake_unsplash.requests_to(fake_unsplash.archive_path)[-1].headers["Range"][6:-1]) > 0


@pytest.mark.timeout(60)
def test_headers_dripped_for_ever_are_an_error_not_a_wait(fake_unsplash, photos, tmp_path, monkeypatch, fast_backoff):
    fake_unsplash.archive = make_lite_archive(photos, fake_unsplash.url)
    fake_unsplash.archive_faults = {"drip-headers"}
    fake_unsplash.slow_s = 0.2  # a header line well inside every read timeout
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT_S", (1.0, 1.0))
    monkeypatch.setattr(download, "HEADERS_DEADLINE_S", 2.0)
    monkeypatch.setattr(download, "DOWNLOAD_RETRIES", 1)
    with pytest.raises(ChromalabError, match="cannot download .*: timed out; without internet access"):
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")


def test_a_part_without_a_validator_is_downloaded_afresh_not_resumed(fake_unsplash, photos, tmp_path):
    # no validator: nothing would tell a changed file apart
    archive, out = downloaded(fake_unsplash, photos, tmp_path, {"drop-once", "no-validator"}, 4)
    assert ["Range" in r.headers for r in fake_unsplash.requests_to(fake_unsplash.archive_path)] == [False, False]
    check_tables(out, photos, archive)


def test_a_gzip_encoded_download_starts_over_instead_of_resuming(fake_unsplash, photos, tmp_path):
    # gzip: the part holds decoded bytes, a Range counts encoded ones
    archive, out = downloaded(fake_unsplash, photos, tmp_path, {"drop-once", "gzip"}, 5)
    assert ["Range" in r.headers for r in fake_unsplash.requests_to(fake_unsplash.archive_path)] == [False, False]
    check_tables(out, photos, archive)


def test_an_error_page_is_one_line_and_never_the_start_of_a_resume(fake_unsplash, photos, tmp_path):
    archive = make_lite_archive(photos, fake_unsplash.url)
    fake_unsplash.archive = archive
    fake_unsplash.archive_faults = {"html-page"}
    with pytest.raises(ChromalabError, match=r"not a zip archive \(text/html") as err:
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert "\n" not in str(err.value) and "check data.url" in str(err.value)
    assert list((tmp_path / "cache" / "downloads").glob("*.part")) == []

    fake_unsplash.archive_faults = set()  # signed in again
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert "Range" not in fake_unsplash.requests_to(fake_unsplash.archive_path)[-1].headers
    check_tables(out, photos, archive)


def test_a_page_answering_a_resume_with_200_keeps_what_had_arrived(fake_unsplash, photos, tmp_path):
    archive = filled_archive(photos, fake_unsplash.url, 7)
    fake_unsplash.archive = archive
    part = left_by_a_killed_run(fake_unsplash, tmp_path, archive)
    fake_unsplash.archive_faults = {"html-page"}  # a sign-in page, 200, whatever was asked
    with pytest.raises(ChromalabError, match="not a zip archive"):
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert part.stat().st_size == 123_456
    fake_unsplash.archive_faults = set()
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert fake_unsplash.requests_to(fake_unsplash.archive_path)[-1].headers["Range"] == "bytes=123456-"
    check_tables(out, photos, archive)


@pytest.mark.parametrize("fault", ["unquoted-etag", "odd-length"])
def test_odd_but_readable_headers_still_resume(fake_unsplash, photos, tmp_path, fault):
    """An ETag without quotes is still an ETag (not a date); a Content-Length Python calls a digit but int()
    refuses is no length."""
    archive, out = downloaded(fake_unsplash, photos, tmp_path, {"drop-once", fault}, 8)
    first, resumed = fake_unsplash.requests_to(fake_unsplash.archive_path)  # resumed, not started over
    assert "Range" in resumed.headers
    check_tables(out, photos, archive)


def test_an_etag_that_cannot_be_sent_back_means_starting_over_not_a_download_broken_for_good(
        fake_unsplash, photos, tmp_path):
    """requests refuses an If-Range with a control character before sending it: such a validator is none."""
    archive, out = downloaded(fake_unsplash, photos, tmp_path, {"drop-once", "control-etag"}, 9)
    assert ["Range" in r.headers for r in fake_unsplash.requests_to(fake_unsplash.archive_path)] == [False, False]
    check_tables(out, photos, archive)

    # a part an earlier run kept with such a validator is started afresh too
    part = left_by_a_killed_run(fake_unsplash, tmp_path / "again", archive)
    download._meta_path(part).write_text(json.dumps({"validator": "\x1c" + archive_etag(archive)}))
    fake_unsplash.archive_faults = set()
    check_tables(run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "again" / "cache"),
                 photos, archive)
    assert "Range" not in fake_unsplash.requests_to(fake_unsplash.archive_path)[-1].headers


def test_a_servers_words_reach_the_terminal_escaped(fake_unsplash, photos, tmp_path):
    """A reason phrase holding terminal controls would erase the error line and print a success of its own."""
    fake_unsplash.archive = make_lite_archive(photos, fake_unsplash.url)
    fake_unsplash.archive_faults = {"terminal-escapes"}
    with pytest.raises(ChromalabError, match=r"HTTP 403 \\x1b\[2K\\rdownload: OK\\x07 instead of the zip") as err:
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert str(err.value).isprintable()


def test_a_damaged_download_is_set_aside_and_fetched_afresh(fake_unsplash, photos, tmp_path):
    archive = make_lite_archive(photos, fake_unsplash.url)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        member = zf.getinfo("photos.tsv000")
    data_start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    middle = data_start + member.compress_size // 2
    damaged = archive[:middle] + bytes(b ^ 0xFF for b in archive[middle:middle + 8]) + archive[middle + 8:]
    fake_unsplash.archive = damaged  # its directory reads; its data does not
    with pytest.raises(ChromalabError, match="damaged or unreadable zip archive.*kept aside as") as err:
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert [p.suffix for p in (tmp_path / "cache" / "downloads").iterdir()] == [".rejected"]

    fake_unsplash.archive = archive
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert "Range" not in fake_unsplash.requests_to(fake_unsplash.archive_path)[-1].headers
    check_tables(out, photos, archive)
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []  # the rejected zip (700 MB) too


def test_a_redirect_loop_is_named(fake_unsplash, tmp_path):
    fake_unsplash.archive = b"PK"
    fake_unsplash.archive_path = "/data/lite/latest"  # latest redirects to itself
    with pytest.raises(ChromalabError, match="too many redirects"):
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")


def test_transient_server_error_is_retried(fake_unsplash, photos, tmp_path, fast_backoff):
    archive = make_lite_archive(photos, fake_unsplash.url)
    fake_unsplash.archive = archive
    fake_unsplash.archive_faults = {"500-once"}
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert len(fake_unsplash.requests_to(fake_unsplash.archive_path)) == 2
    check_tables(out, photos, archive)


def test_sha256_mismatch_is_an_error_and_leaves_no_output(fake_unsplash, photos, tmp_path):
    archive = make_lite_archive(photos, fake_unsplash.url)
    fake_unsplash.archive = archive
    downloads = tmp_path / "cache" / "downloads"
    with pytest.raises(ChromalabError, match="does not match data.sha256") as err:
        run_download(params(url=fake_unsplash.latest_url, sha256="ab" * 32), tmp_path / "raw", tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists()
    assert [p.suffix for p in downloads.iterdir()] == [".rejected"]
    assert not partial_download_path(fake_unsplash.latest_url, downloads).exists()  # never resumed from

    # with the right (pinned, any case) hash it downloads afresh and succeeds
    right = hashlib.sha256(archive).hexdigest().upper()
    run_download(params(url=fake_unsplash.latest_url, sha256=right), tmp_path / "raw", tmp_path / "cache")
    assert len(fake_unsplash.requests_to(fake_unsplash.archive_path)) == 2
    check_tables(tmp_path / "raw", photos, archive)


@pytest.mark.parametrize("as_uri", [True, False], ids=["file-url", "plain-path"])
def test_local_archive_by_file_url_or_path(photos, tmp_path, as_uri):
    archive = make_lite_archive(photos)
    zip_path = tmp_path / "by hand" / "unsplash-research-dataset-lite-latest.zip"
    zip_path.parent.mkdir()
    zip_path.write_bytes(archive)
    url = zip_path.as_uri() if as_uri else str(zip_path)
    out = run_download(params(url=url, sha256=hashlib.sha256(archive).hexdigest()), tmp_path / "raw")
    check_tables(out, photos, archive)
    assert zip_path.read_bytes() == archive  # the user's own file is never moved or deleted


def test_default_relative_paths(photos, tmp_path, monkeypatch):
    """DVC runs the stage from the repository root with the default data/raw and data/cache."""
    archive = make_lite_archive(photos)
    (tmp_path / "lite.zip").write_bytes(archive)
    monkeypatch.chdir(tmp_path)
    assert run_download(params(url="lite.zip")) == Path("data/raw")
    check_tables(tmp_path / "data" / "raw", photos, archive)


def test_missing_local_archive(tmp_path):
    with pytest.raises(ChromalabError, match="nowhere.zip does not exist"):
        run_download(params(url=str(tmp_path / "nowhere.zip")), tmp_path / "raw")


def test_unreachable_url_is_one_line_naming_the_url_and_the_way_out(tmp_path, monkeypatch, fast_backoff):
    monkeypatch.setattr(download, "DOWNLOAD_RETRIES", 1)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data/lite/latest"
    with pytest.raises(ChromalabError) as err:
        run_download(params(url=url), tmp_path / "raw", tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message
    assert f"{url}: no connection (connection refused)" in message  # it said "timed out"
    assert "download the Lite zip elsewhere and set data.url" in message
    assert not (tmp_path / "raw").exists()


def test_a_host_name_that_cannot_be_parsed_is_one_line(tmp_path):
    url = f"http://{'a' * 64}.example/lite.zip"  # a label over DNS's 63 characters: refused before any connection
    with pytest.raises(ChromalabError, match=r"cannot download http://a+\.example/lite\.zip: .*cannot parse") as err:
        run_download(params(url=url), tmp_path / "raw", tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_http_error_names_the_status(fake_unsplash, tmp_path):
    with pytest.raises(ChromalabError, match="HTTP 404"):
        run_download(params(url=f"{fake_unsplash.url}/data/lite/9.9.9"), tmp_path / "raw", tmp_path / "cache")


def test_an_answer_without_a_file_is_named_not_read_as_a_broken_zip(fake_unsplash, photos, tmp_path):
    fake_unsplash.archive = make_lite_archive(photos, fake_unsplash.url)
    fake_unsplash.archive_faults = {"204"}
    with pytest.raises(ChromalabError, match="HTTP 204 No Content instead of the zip; check data.url"):
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")


@pytest.mark.parametrize(
    "options",
    [
        {"parts": 3, "extension": "csv", "folder": "unsplash-research-dataset-lite-1.3.0/"},
        {"parts": 2, "extension": "tsv", "folder": ""},
        {"parts": 1, "numbered": False, "folder": "lite/"},
    ],
    ids=["csv000-parts-in-subfolder", "tsv-parts", "unnumbered"],
)
def test_multipart_and_renamed_tables_concatenate_to_the_same_tables(photos, tmp_path, options):
    reference = tmp_path / "reference.zip"
    reference.write_bytes(make_lite_archive(photos))
    run_download(params(url=str(reference)), tmp_path / "expected")

    variant = make_lite_archive(photos, **options)
    (tmp_path / "variant.zip").write_bytes(variant)
    out = run_download(params(url=str(tmp_path / "variant.zip")), tmp_path / "raw")
    for table in ("photos.tsv", "keywords.tsv", "colors.tsv"):
        assert (out / table).read_bytes() == (tmp_path / "expected" / table).read_bytes(), table
    members = json.loads((out / "source.json").read_text())["members"]["keywords"]
    assert len(members) == options["parts"]
    assert members == sorted(members)


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tables_zip(photos, extra: dict[str, bytes]) -> bytes:
    """A valid Lite zip plus `extra` entries."""
    with zipfile.ZipFile(io.BytesIO(make_lite_archive(photos))) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    return _zip({**entries, **extra})


def test_a_transfer_cut_short_without_a_size_resumes_in_the_same_run(fake_unsplash, photos, tmp_path):
    # no Content-Length: the end of the connection looked like the end of the file
    archive, out = downloaded(fake_unsplash, photos, tmp_path, {"cut-unsized-once"}, 3)
    first, second = fake_unsplash.requests_to(fake_unsplash.archive_path)
    assert second.headers["Range"] == f"bytes={len(archive) // 2}-"
    check_tables(out, photos, archive)


def test_a_206_of_a_new_release_is_not_spliced_onto_the_old_one(fake_unsplash, photos, tmp_path):
    """A server that ignores If-Range answers a resume with the new file's bytes (and its new ETag)."""
    old, new = filled_archive(photos, fake_unsplash.url, 4), filled_archive(photos, fake_unsplash.url, 5, 310_000)
    fake_unsplash.archive, fake_unsplash.second_archive = old, new
    fake_unsplash.archive_faults = {"drop-once", "ignore-if-range"}
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert [bool(r.headers.get("Range")) for r in fake_unsplash.requests_to(fake_unsplash.archive_path)] == \
        [False, True, False]  # the 206 of the new release was dropped, and the new release fetched whole
    check_tables(out, photos, new)


def test_a_206_without_a_validator_is_not_spliced_onto_a_part_that_has_one(fake_unsplash, photos, tmp_path):
    """A server that ignores If-Range and sends no ETag: the 206 may be another release's bytes."""
    old, new = filled_archive(photos, fake_unsplash.url, 4), filled_archive(photos, fake_unsplash.url, 5, 310_000)
    left_by_a_killed_run(fake_unsplash, tmp_path, old)
    fake_unsplash.archive, fake_unsplash.archive_faults = new, {"no-validator", "ignore-if-range"}
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert [bool(r.headers.get("Range")) for r in fake_unsplash.requests_to(fake_unsplash.archive_path)] == \
        [True, False]  # spliced on, it made a zip with a bad CRC, and a wasted run
    check_tables(out, photos, new)


def test_a_page_answering_a_resume_is_not_appended_to_the_archive_and_keeps_it(fake_unsplash, photos, tmp_path, fast_backoff):
    archive = filled_archive(photos, fake_unsplash.url, 6)
    fake_unsplash.archive, fake_unsplash.archive_faults = archive, {"drop-once", "html-206"}
    with pytest.raises(ChromalabError, match="text/html page instead of the archive's bytes, 6 times"):
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    part = partial_download_path(fake_unsplash.latest_url, tmp_path / "cache" / "downloads")
    assert part.stat().st_size == len(archive) // 2  # a rate-limit page said nothing about the file
    fake_unsplash.archive_faults = set()
    out = run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert fake_unsplash.requests_to(fake_unsplash.archive_path)[-1].headers["Range"] == f"bytes={len(archive) // 2}-"
    check_tables(out, photos, archive)


@pytest.mark.parametrize("lie", [False, True], ids=["endless-body", "announced-size"])
def test_an_answer_far_larger_than_the_archive_is_refused_before_it_fills_the_disk(
        fake_unsplash, photos, tmp_path, monkeypatch, lie):
    archive = make_lite_archive(photos, fake_unsplash.url)
    fake_unsplash.archive = archive
    fake_unsplash.archive_faults = set() if lie else {"cut-unsized-once"}  # no Content-Length: it might never end
    monkeypatch.setattr(download, "MAX_ARCHIVE_BYTES", len(archive) - 1 if lie else len(archive) // 4)
    what = "announces" if lie else "runs past"
    with pytest.raises(ChromalabError, match=f"the answer {what} .* far more than the Lite zip") as err:
        run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert list((tmp_path / "cache" / "downloads").glob("*.part")) == []


def _table_bytes(photos) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(make_lite_archive(photos))) as zf:
        return {name: zf.read(name) for name in ("photos.tsv000", "keywords.tsv000")}


def _flag_bits(data: bytes, offsets: dict[bytes, tuple[int, int]]) -> bytes:
    """`data` with, in every header whose signature is a key, the byte at the offset set (|) or replaced."""
    out = bytearray(data)
    for signature, (offset, value) in offsets.items():
        at = 0
        while (at := out.find(signature, at)) >= 0:
            out[at + offset] = value if value > 1 else out[at + offset] | value
            at += len(signature)
    return bytes(out)


def _hostile_zip(photos, kind: str) -> bytes:
    tables = _table_bytes(photos)
    if kind == "latin-1 table":
        tables["photos.tsv000"] = tables["photos.tsv000"].replace(b"\n", "\tcaf\xe9\n".encode("latin-1"), 2)
    if kind == "CR-only line ends":
        tables["photos.tsv000"] = tables["photos.tsv000"].replace(b"\n", b"\r")
    if kind == "undecodable member name":  # flagged UTF-8 (é); its central record's copy is broken below
        tables["README\u00e9.txt"] = b"about"
    method = {"encrypted member": zipfile.ZIP_STORED, "deflate64 member": zipfile.ZIP_STORED,
              "corrupt lzma member": zipfile.ZIP_LZMA}.get(kind, zipfile.ZIP_DEFLATED)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as zf:
        for name, data in tables.items():
            zf.writestr(name, data)
    data = bytearray(buffer.getvalue())
    if kind == "corrupt lzma member":  # past the local header, LZMA's 4-byte header and 5 bytes of properties
        start = data.find(b"photos.tsv000") + len("photos.tsv000") + 4 + 5
        data[start:start + 20] = bytes(b ^ 0x5A for b in data[start:start + 20])
    if kind == "undecodable member name":
        data[data.rfind("README\u00e9".encode()) + 6] = 0xFF
    if kind == "two-disk zip64 locator":  # zipfile reads it before any entry, and refuses spanned archives
        end = data.rfind(b"PK\x05\x06")
        data[end:end] = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2)
    if kind in ("corrupt lzma member", "undecodable member name", "two-disk zip64 locator"):
        return bytes(data)
    local, central = b"PK\x03\x04", b"PK\x01\x02"
    if kind == "encrypted member":  # general-purpose flag bit 0
        return _flag_bits(buffer.getvalue(), {local: (6, 1), central: (8, 1)})
    if kind == "deflate64 member":  # compression method 9, which zipfile cannot read
        return _flag_bits(buffer.getvalue(), {local: (8, 9), central: (10, 9)})
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["latin-1 table", "CR-only line ends", "encrypted member", "deflate64 member",
                                  "corrupt lzma member", "undecodable member name", "two-disk zip64 locator"])
def test_a_zip_that_cannot_be_read_is_one_line_and_set_aside(fake_unsplash, photos, tmp_path, kind):
    fake_unsplash.archive = _hostile_zip(photos, kind)
    for _ in range(2):  # each run fetches afresh: the bad zip is never resumed (nor 'complete' after a 416)
        with pytest.raises(ChromalabError, match="kept aside") as err:
            run_download(params(url=fake_unsplash.latest_url), tmp_path / "raw", tmp_path / "cache")
        assert "\n" not in str(err.value)
    assert [r.headers.get("Range") for r in fake_unsplash.requests_to(fake_unsplash.archive_path)] == [None, None]


def _parts_with(photos, member: str, edit) -> dict[str, bytes]:
    """The entries of a two-part Lite zip, with `member`'s lines passed through `edit`."""
    with zipfile.ZipFile(io.BytesIO(make_lite_archive(photos, parts=2))) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    entries[member] = b"\n".join(edit(entries[member].split(b"\n")))
    return entries


def test_an_unclosed_quote_that_runs_rows_together_is_named_not_counted(photos, tmp_path):
    # the rows after it were silently merged into one keyword (139 of 242 rows); quotes stay supported: this
    # part also holds the keyword with a quoted newline of an old release
    def unclosed(lines):
        assert lines[9].startswith(b"pe007rUku_A\twoman\t30")
        return [*lines[:9], lines[9].replace(b"\t", b'\t"', 1), *lines[10:]]

    (tmp_path / "a.zip").write_bytes(_zip(_parts_with(photos, "keywords.tsv001", unclosed)))
    with pytest.raises(ChromalabError, match=r"table 'keywords', keywords.tsv001 line 10: rows run together .* "
                                             r"the zip is damaged") as err:
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("poem", ["\n".join(f"line {i}" for i in range(12)), "a long day " * 20_000],
                         ids=["many lines", "200 KB"])
def test_a_description_of_many_quoted_lines_is_one_field_of_one_row(photos, tmp_path, poem):
    """A user's description may hold line breaks; quoted, they are the field's own, however many. A long one is
    still a row (csv's own field limit is 128 KiB)."""

    def described(lines):
        fields = lines[3].split(b"\t")
        fields[PHOTO_COLUMNS.index("photo_description")] = b'"' + poem.encode() + b'"'
        return [*lines[:3], b"\t".join(fields), *lines[4:]]

    (tmp_path / "a.zip").write_bytes(_zip(_parts_with(photos, "photos.tsv001", described)))
    out = run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")
    rows = read_rows(out / "photos.tsv")
    assert [r["photo_id"] for r in rows] == [p.photo_id for p in photos]
    assert poem in [r["photo_description"] for r in rows]


@pytest.mark.parametrize("line", [0, 5], ids=["header", "row"])
def test_a_line_too_long_to_read_is_named_by_its_member_and_line(photos, tmp_path, monkeypatch, line):
    # a 400 MB line took 868 MB of memory, and its error named a temporary folder that was gone
    monkeypatch.setattr(download, "MAX_LINE_BYTES", 5000)
    monkeypatch.setattr(download, "CHUNK_BYTES", 1000)  # below the limit, as in a real run
    long = _parts_with(photos, "photos.tsv001", lambda lines: [*lines[:line], lines[line] + b"x" * 6000,
                                                               *lines[line + 1:]])
    (tmp_path / "a.zip").write_bytes(_zip(long))
    with pytest.raises(ChromalabError, match=rf"a.zip: photos.tsv001 line {line + 1} runs past 5,000 bytes") as err:
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")
    assert ".tmp" not in str(err.value) and "\n" not in str(err.value)


def test_a_zip_of_too_many_entries_is_refused_before_they_are_read(photos, tmp_path, monkeypatch):
    # a million empty entries took 600 MB of memory
    monkeypatch.setattr(download, "MAX_MEMBERS", 20)
    (tmp_path / "a.zip").write_bytes(_tables_zip(photos, {f"x/{n}": b"" for n in range(20)}))
    with pytest.raises(ChromalabError, match=r"a.zip: 27 entries \(the Lite zip has a few dozen, limit 20\)"):
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")


@pytest.mark.parametrize("name", ["../photos.tsv000", "/etc/keywords.tsv", "lite/../../evil.txt", "C:/x/colors.tsv"])
def test_unsafe_entry_names_are_refused(photos, tmp_path, name):
    (tmp_path / "a.zip").write_bytes(_tables_zip(photos, {name: b"photo_id\n"}))
    with pytest.raises(ChromalabError, match="unsafe entry"):
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_a_part_of_its_own_may_start_with_a_byte_order_mark(photos, tmp_path):
    with zipfile.ZipFile(io.BytesIO(make_lite_archive(photos, parts=2))) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    reference = tmp_path / "reference.zip"
    reference.write_bytes(_zip(entries))
    entries["keywords.tsv001"] = codecs.BOM_UTF8 + entries["keywords.tsv001"]  # its header is the first's
    (tmp_path / "bom.zip").write_bytes(_zip(entries))
    expected = run_download(params(url=str(reference)), tmp_path / "expected")
    out = run_download(params(url=str(tmp_path / "bom.zip")), tmp_path / "raw")
    assert (out / "keywords.tsv").read_bytes() == (expected / "keywords.tsv").read_bytes()


@pytest.mark.parametrize("copy", ["photos.tsv", "photos.csv001"])
def test_a_second_copy_of_a_table_is_refused_not_concatenated(photos, tmp_path, copy):
    with zipfile.ZipFile(io.BytesIO(make_lite_archive(photos))) as zf:
        table = zf.read("photos.tsv000")
    (tmp_path / "a.zip").write_bytes(_tables_zip(photos, {copy: table}))
    with pytest.raises(ChromalabError, match="ambiguous parts for table 'photos'"):
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")


def test_zip_bomb_ratio_is_refused(photos, tmp_path):
    bomb = b"photo_id\tkeyword\n" + b"\t" * 20_000_000  # 20 MB that deflate to ~20 KB
    (tmp_path / "a.zip").write_bytes(_tables_zip(photos, {"keywords.tsv001": bomb}))
    with pytest.raises(ChromalabError, match="compression ratio over 100:1"):
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")


def test_tables_unpacking_past_the_limit_are_refused_before_any_is_written(photos, tmp_path, monkeypatch):
    """Each part under the limit, together over it: the sum counts (zipfile never reads past a listed size)."""
    archive = make_lite_archive(photos)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        sizes = [info.file_size for info in zf.infolist() if download.TABLE_MEMBER.search(info.filename)]
    monkeypatch.setattr(download, "MAX_TABLES_BYTES", sum(sizes) - 1)
    assert max(sizes) < sum(sizes) - 1
    (tmp_path / "a.zip").write_bytes(archive)
    with pytest.raises(ChromalabError, match=rf"its tables unpack to {sum(sizes):,} bytes .*limit {sum(sizes) - 1:,}"):
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    monkeypatch.setattr(download, "MAX_TABLES_BYTES", sum(sizes))
    assert (run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw") / "photos.tsv").is_file()


def test_missing_table_is_named(photos, tmp_path):
    (tmp_path / "a.zip").write_bytes(make_lite_archive(photos, drop_tables=("keywords",)))
    with pytest.raises(ChromalabError, match="no 'keywords' table"):
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")


def test_missing_column_is_named(photos, tmp_path):
    (tmp_path / "a.zip").write_bytes(make_lite_archive(photos, drop_columns={"keywords": ("suggested_by_user",)}))
    with pytest.raises(ChromalabError, match="table 'keywords' .* lacks column\\(s\\) suggested_by_user"):
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")


def test_colors_table_is_optional(photos, tmp_path):
    (tmp_path / "a.zip").write_bytes(make_lite_archive(photos, drop_tables=("colors",)))
    out = run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")
    assert not (out / "colors.tsv").exists()
    assert set(json.loads((out / "source.json").read_text())["rows"]) == {"photos", "keywords"}


def test_not_a_zip(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"<html>Sign in to download</html>")
    with pytest.raises(ChromalabError, match="not a readable zip archive"):
        run_download(params(url=str(tmp_path / "a.zip")), tmp_path / "raw")


def test_failed_run_leaves_the_previous_output_untouched(photos, tmp_path):
    (tmp_path / "good.zip").write_bytes(make_lite_archive(photos))
    out = run_download(params(url=str(tmp_path / "good.zip")), tmp_path / "raw")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    (tmp_path / "bad.zip").write_bytes(make_lite_archive(photos, drop_columns={"photos": ("photo_image_url",)}))
    with pytest.raises(ChromalabError, match="photo_image_url"):
        run_download(params(url=str(tmp_path / "bad.zip")), tmp_path / "raw")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "good.zip", "raw"]  # no temp folders


def test_folder_source_downloads_nothing_and_says_so(tmp_path, capsys):
    out = run_download(parse_params({"data": {"source": "folder", "folder": "my/photos"}}), tmp_path / "raw")
    assert sorted(p.name for p in out.iterdir()) == ["source.json"]
    assert "nothing to download (data.source: folder" in capsys.readouterr().err  # DVC shows the stage run
    # data.folder is no parameter of the download stage (dvc.yaml): its output must not depend on it
    assert json.loads((out / "source.json").read_text()) == {"source": "folder"}
