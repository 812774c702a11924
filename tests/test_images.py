"""Stage `images` against the fake Unsplash server: every fault kind, reserve replacement, resume after a kill."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_unsplash import FakeUnsplash, encode, render_photo
from PIL import Image

from chromalab.color import mean_chroma
from chromalab.config import parse_params
from chromalab.errors import ChromalabError
from chromalab.data.images import FAIL_FAST_STREAK, run_images, sized_url

SIZE = 32


def photo_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(n)]


def write_split(split_dir: Path, image_base: str, train, test, reserve, url=None, val=()) -> None:
    """data/split as the split stage leaves it, pointing at `image_base` (or url(photo_id) for folders)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, listed in (("train", train), ("test", test), ("val", val), ("reserve", reserve)):
        with (split_dir / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["photo_id", "image_url", "reason"])
            for pid in listed:
                writer.writerow([pid, url(pid) if url else f"{image_base}/photo-{pid}", "keyword=woman conf=90.0"])


def raw_params(**images) -> dict:
    return {"base": {"image_size": SIZE, "seed": 0},
            "images": {"concurrency": 4, "timeout_s": 1.0, "retries": 3, "jpeg_quality": 90, **images}}


def params(**images):
    return parse_params(raw_params(**images))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def check_output(out: Path) -> dict[str, list[str]]:
    """Every manifest file is a whole size×size colour RGB JPEG with the listed hash; returns ids per split."""
    manifest = read_csv(out / "manifest.csv")
    assert manifest == sorted(manifest, key=lambda r: (r["split"], r["photo_id"]))
    by_split: dict[str, list[str]] = {"train": [], "test": [], "val": []}
    for row in manifest:
        data = (out / row["file"]).read_bytes()
        assert row["file"] == f"{row['split']}/{row['photo_id']}.jpg"
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
            assert mean_chroma(np.asarray(image)) >= 4.0
        by_split[row["split"]].append(row["photo_id"])
    on_disk = {f"{p.parent.name}/{p.name}" for split in ("train", "test", "val") for p in (out / split).iterdir()}
    assert on_disk == {row["file"] for row in manifest}  # nothing else: no temp files, no stale photos
    assert sorted(p.name for p in out.iterdir()) == ["fetch_settings.json", "manifest.csv", "rejected.csv", "test", "train",
                                                     "val"]
    return by_split


def test_every_fault_is_handled_and_reserves_replace_in_order(fake_unsplash, tmp_path, fast_backoff):
    train, test, val, reserve = photo_ids("tr", 16), photo_ids("te", 4), photo_ids("va", 2), photo_ids("re", 7)
    faults = {
        train[0]: "404", train[1]: "410", train[2]: "429-once", train[3]: "500-twice",
        train[4]: "truncated-once", train[5]: "corrupt", train[6]: "gray", train[7]: "rgba-png",
        train[8]: "wrong-size", train[9]: "slow", train[11]: "503-unreadable-retry-after-once", test[0]: "stall-once", test[1]: "404", val[0]: "gray",
        reserve[0]: "gray",
    }
    fake_unsplash.image_faults = faults
    fake_unsplash.stall_s = 2.5  # > timeout_s (1 s): the first try times out mid-wait
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve, val=val)

    summary = run_images(params(), tmp_path / "split", tmp_path / "images")

    # Rejected slots, in slot order (train0, train1, train5, train6, test1, val0), take reserve 0-5; reserve 0
    # is gray itself, so its slot (train0) takes reserve 6.
    got = check_output(tmp_path / "images")
    assert sorted(got["train"]) == sorted(train[2:5] + train[7:] + [reserve[6], reserve[1], reserve[2], reserve[3]])
    assert sorted(got["test"]) == sorted([test[0], *test[2:], reserve[4]])
    assert sorted(got["val"]) == sorted([val[1], reserve[5]])
    rejected_rows = read_csv(tmp_path / "images" / "rejected.csv")
    rejected = {r["photo_id"]: (r["split"], r["reason"].split(" ")[0]) for r in rejected_rows}
    assert rejected == {
        train[0]: ("train", "gone"), train[1]: ("train", "gone"), train[5]: ("train", "corrupt"),
        train[6]: ("train", "gray"), test[1]: ("test", "gone"), val[0]: ("val", "gray"), reserve[0]: ("train", "gray"),
    }
    counts = fake_unsplash.image_counts()
    # 429, two 500s, truncated body, corrupt (asked twice: the same bytes again), a 503 whose Retry-After is
    # unreadable (the usual backoff), read timeout
    retried = {train[2]: 2, train[3]: 3, train[4]: 2, train[5]: 2, train[11]: 2, test[0]: 2}
    assert counts == {pid: retried.get(pid, 1) for pid in train + test + val + reserve}
    assert summary == {"train": 16, "test": 4, "val": 2, "fetched": 29, "reused": 0, "rejected": 7,
                       "replaced_from_reserve": 7}

    # the server's size×size JPEG is kept byte for byte (no second lossy encode); the others were converted
    manifest = {r["photo_id"]: r for r in read_csv(tmp_path / "images" / "manifest.csv")}
    as_served, _ = encode(render_photo(train[10], SIZE, SIZE), "jpg", 90)
    assert (tmp_path / "images" / "train" / f"{train[10]}.jpg").read_bytes() == as_served
    served = fake_unsplash.requests_to(f"/photo-{train[10]}")[0].query
    assert served == {"w": "32", "h": "32", "fit": "crop", "crop": "faces,entropy", "fm": "jpg", "q": "90"}
    assert manifest[train[10]]["source"] == sized_url(f"{fake_unsplash.url}/photo-{train[10]}", SIZE, 90)


def test_an_answer_broken_once_is_fetched_again_not_rejected_for_good(fake_unsplash, tmp_path, fast_backoff):
    """A body cut short with no size to tell, an empty body, a page labelled as a JPEG: the network's fault."""
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 1), photo_ids("re", 2)
    fake_unsplash.image_faults = {train[0]: "cut-unsized-once", train[1]: "empty-once",
                                  train[2]: "html-as-jpeg-once", train[3]: "tiny"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"\(e.g. {train[2]}: HTTP 200 with a page labelled image/jpeg "):
        run_images(params(), tmp_path / "split", tmp_path / "images")
    run_images(params(), tmp_path / "split", tmp_path / "images")  # the portal is gone: a re-run
    got = check_output(tmp_path / "images")
    assert sorted(got["train"]) == sorted([*train[:3], reserve[0]])
    reasons = {r["photo_id"]: r["reason"] for r in read_csv(tmp_path / "images" / "rejected.csv")}
    assert reasons == {train[3]: "too small (1×1, under half of 32×32)"}  # a placeholder pixel is no photo
    counts = fake_unsplash.image_counts()
    assert [counts[pid] for pid in train] == [2, 2, 2, 1]


@pytest.mark.parametrize("fault", ["junk-as-jpeg", "cut-unsized-always", "corrupt-varying", "junk-per-photo"])
def test_undecodable_answers_that_are_not_the_photos_own_are_failures_not_rejections(
        fake_unsplash, tmp_path, fast_backoff, fault):
    """The same error body for two photos (an outage), bodies cut short with no size, other broken bytes each
    time, or an error body that is no image at all: nothing is rejected for good, so the re-run after the outage
    gets the photos themselves."""
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 1), photo_ids("re", 2)
    fake_unsplash.image_faults = {train[0]: fault, train[2]: fault}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match="of 5 photos could not be fetched"):
        run_images(params(), tmp_path / "split", tmp_path / "images")
    assert read_csv(tmp_path / "images" / "rejected.csv") == []
    fake_unsplash.image_faults = {}  # the outage is over
    run_images(params(), tmp_path / "split", tmp_path / "images")
    assert sorted(check_output(tmp_path / "images")["train"]) == train


def test_one_photo_sent_for_several_is_a_placeholder_and_kept_for_none(fake_unsplash, tmp_path, fast_backoff):
    """The same picture for two photos: the server's placeholder. Neither is kept, the one kept by an earlier
    (failed or killed) run included, and the re-run gets the photos themselves."""
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "placeholder"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    out = tmp_path / "images"
    run_images(params(), tmp_path / "split", out)  # one photo alone: nothing to tell
    for file in ("train/tr01.jpg", "test/te00.jpg", "manifest.csv"):  # as a run killed before they were written
        (out / file).unlink()

    # te00's JPEG names it in a comment: other bytes, the same picture
    fake_unsplash.image_faults = {train[1]: "placeholder", test[0]: "placeholder-tagged"}
    with pytest.raises(ChromalabError, match="^3 of 5 photos could not be fetched .*: the same photo as another "):
        run_images(params(), tmp_path / "split", out)
    assert sorted(p.stem for p in (out / "train").iterdir()) == train[2:]  # tr00 too
    # all three failed this run, whichever came first: given up alike after MAX_FAILED_RUNS, not by timing
    assert json.loads((out / "failed_runs.json").read_text()) == {train[0]: 1, train[1]: 1, test[0]: 1}
    assert read_csv(out / "rejected.csv") == []

    fake_unsplash.image_faults = {}
    run_images(params(), tmp_path / "split", out)
    assert sorted(check_output(out)["train"]) == train
    assert len({row["sha256"] for row in read_csv(out / "manifest.csv")}) == 5


def test_redirects_have_their_own_limit_and_a_loop_is_named(fake_unsplash, tmp_path):
    """A photo behind a redirect (a CDN) is fetched with images.retries 0, which counted the hop as a retry;
    a redirect loop says so instead of urllib3's "ResponseError"."""
    train, test, reserve = photo_ids("tr", 3), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "redirect", train[1]: "redirect-loop"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"^1 of 4 photos could not be fetched \(e.g. {train[1]}: too many "
                                              r"redirects \(a redirect loop\?\)"):
        run_images(params(retries=0), tmp_path / "split", tmp_path / "images")
    assert sorted(p.stem for p in (tmp_path / "images" / "train").iterdir()) == [train[0], train[2]]


@pytest.mark.parametrize(("fault", "words"), [
    ("redirect-ftp", r"sent to a URL that is not http\(s\) with a host \(URLSchemeUnknown\)"),
    ("huge-header", r"ProtocolError \(got more than 65536 bytes when reading header line\)")])
def test_a_redirect_off_http_and_a_head_too_long_to_read_are_named(fake_unsplash, tmp_path, fault, words):
    train, test, reserve = photo_ids("tr", 3), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[1]: fault}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"^1 of 4 photos could not be fetched \(e.g. {train[1]}: {words}"):
        run_images(params(retries=0), tmp_path / "split", tmp_path / "images")


def test_a_jpeg_cut_short_but_ended_as_a_whole_one_is_corrupt_not_kept_half_gray(fake_unsplash, tmp_path,
                                                                                  fast_backoff):
    """libjpeg decodes it without an error, the blocks it never got mid-gray."""
    train, test, reserve = photo_ids("tr", 3), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[1]: "cut-ending-eoi"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    run_images(params(), tmp_path / "split", tmp_path / "images")
    assert sorted(check_output(tmp_path / "images")["train"]) == sorted([train[0], train[2], reserve[0]])
    reasons = {r["photo_id"]: r["reason"] for r in read_csv(tmp_path / "images" / "rejected.csv")}
    assert reasons == {train[1]: "corrupt (the JPEG ends early: its last blocks are blank)"}


def test_one_gray_picture_sent_for_several_photos_rejects_none_of_them(fake_unsplash, tmp_path, fast_backoff):
    """A "not available" picture is gray (or a pixel): the same bytes for two photos are the server's, so neither
    photo is written off as gray for good, and the re-run gets the photos themselves."""
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 1), photo_ids("re", 2)
    # tr00's first answer does not decode, so the gray one comes on its second ask
    fake_unsplash.image_faults = {train[0]: ["junk-as-jpeg", "gray-placeholder"], train[2]: "gray-placeholder"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    out = tmp_path / "images"
    with pytest.raises(ChromalabError, match="^1 of 5 photos could not be fetched .*: unusable bytes "):
        run_images(params(), tmp_path / "split", out)
    assert read_csv(out / "rejected.csv") == []
    fake_unsplash.image_faults = {}
    run_images(params(), tmp_path / "split", out)
    assert sorted(check_output(out)["train"]) == train


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, at open, over the limit
def test_a_photo_too_large_to_decode_safely_is_rejected(fake_unsplash, tmp_path, monkeypatch):
    train, test, reserve = photo_ids("tr", 2), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "rgba-png"}  # a PNG: no reduced-scale decoding as for a JPEG
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE - 1)
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    run_images(params(), tmp_path / "split", tmp_path / "images")
    reasons = {r["photo_id"]: r["reason"] for r in read_csv(tmp_path / "images" / "rejected.csv")}
    assert reasons == {train[0]: "too large (32×32 pixels; decoded whole it would take gigabytes)"}


def test_a_photo_of_far_more_pixels_than_asked_is_rejected_before_it_is_decoded(fake_unsplash, tmp_path,
                                                                                  monkeypatch):
    """A small PNG of 88 MP took ~9 GB to convert at concurrency 8. Here the 40 MP floor is lowered, so that
    64 × 32² pixels are the limit, instead of serving such a bomb; a photo half as wide again is still used."""
    train, test, reserve = photo_ids("tr", 2), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "png-bomb", train[1]: "wrong-size"}
    monkeypatch.setattr("chromalab.data.images.FETCHED_MAX_PIXELS", 0)
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    run_images(params(), tmp_path / "split", tmp_path / "images")
    reasons = {r["photo_id"]: r["reason"] for r in read_csv(tmp_path / "images" / "rejected.csv")}
    assert reasons == {train[0]: "too large (320×320 pixels for a 32×32 photo: not the photo asked for)"}
    assert sorted(check_output(tmp_path / "images")["train"]) == [reserve[0], train[1]]


def test_the_photo_asked_for_is_kept_as_served_only_without_a_load_after_its_end(fake_unsplash, tmp_path):
    train, test, reserve = photo_ids("tr", 2), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "trailing-junk"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    run_images(params(), tmp_path / "split", tmp_path / "images")
    check_output(tmp_path / "images")
    as_served, _ = encode(render_photo(train[1], SIZE, SIZE), "jpg", 90)
    assert (tmp_path / "images" / "train" / f"{train[1]}.jpg").read_bytes() == as_served
    assert (tmp_path / "images" / "train" / f"{train[0]}.jpg").stat().st_size < 16 << 10  # re-encoded


def test_the_photo_asked_for_is_kept_as_served_only_when_its_colours_are_srgb(fake_unsplash, tmp_path):
    """A camera's Adobe RGB profile on the exact-size JPEG: stored converted to sRGB (as colorize reads it),
    not as served; sRGB's own profile changes nothing, so that photo keeps its bytes."""
    from fake_unsplash import photo_profile

    from chromalab.files import in_srgb

    train, test, reserve = photo_ids("tr", 2), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "adobe-rgb", train[1]: "srgb-profile"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    run_images(params(), tmp_path / "split", tmp_path / "images")
    check_output(tmp_path / "images")
    stored = {pid: (tmp_path / "images" / "train" / f"{pid}.jpg").read_bytes() for pid in train}
    served = {pid: encode(render_photo(pid, SIZE, SIZE), "jpg", 90, photo_profile(fault))[0]
              for pid, fault in fake_unsplash.image_faults.items()}
    assert stored[train[1]] == served[train[1]]
    with Image.open(io.BytesIO(served[train[0]])) as adobe, Image.open(io.BytesIO(stored[train[0]])) as kept:
        as_shown, as_stored = np.asarray(in_srgb(adobe), np.float32), np.asarray(kept, np.float32)
        as_served = np.asarray(adobe, np.float32)
    # a photo's mean colour: what a second JPEG encoding hardly moves, and the profile does
    off = {name: np.abs((as_stored - pixels).mean(axis=(0, 1))).max() for name, pixels in
           (("shown", as_shown), ("served", as_served))}
    assert off["shown"] < 3 < 8 < off["served"]


@pytest.mark.parametrize("retry_after", ["Fri, 31 Dec 99999 23:59:59 GMT", "Fri, 31 Dec 99999999999 23:59:59 GMT"])
def test_a_retry_after_date_out_of_range_means_the_usual_backoff(fake_unsplash, tmp_path, fast_backoff, retry_after):
    train, test, reserve = photo_ids("tr", 1), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "503-unreadable-retry-after-once"}
    fake_unsplash.unreadable_retry_after = retry_after
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    run_images(params(), tmp_path / "split", tmp_path / "images")
    assert check_output(tmp_path / "images")["train"] == train
    assert fake_unsplash.image_counts()[train[0]] == 2


@pytest.mark.timeout(60)
def test_headers_dripped_for_ever_do_not_hold_a_photo(fake_unsplash, tmp_path, fast_backoff):
    train, test, reserve = photo_ids("tr", 2), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "drip-headers"}
    fake_unsplash.slow_s = 0.2  # a header line well inside every read timeout (1 s); the deadline is 4 s
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"\(e.g. {train[0]}: ReadTimeoutError after 1 retries\)"):
        run_images(params(retries=1), tmp_path / "split", tmp_path / "images")


def test_a_server_that_fails_every_photo_is_given_up_on_early(fake_unsplash, tmp_path, fast_backoff, monkeypatch):
    train, test, reserve = photo_ids("tr", 10), photo_ids("te", 2), photo_ids("re", 2)
    fake_unsplash.image_faults = {pid: "500-always" for pid in train + test}
    fake_unsplash.delay_s = 0.1  # a photo takes longer than this thread's turn to count it, even on a loaded CPU
    monkeypatch.setattr("chromalab.data.images.FAIL_FAST_STREAK", 3)
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError) as err:
        run_images(params(concurrency=1, retries=1), tmp_path / "split", tmp_path / "images")
    tried = len(fake_unsplash.image_counts())
    assert tried <= 4  # the streak's 3, and at most the one a worker had already begun
    assert str(err.value) == (f"12 of 12 photos could not be fetched (e.g. {train[0]}: HTTP 500 after 1 retries); "
                              "3 in a row gave no photo, so the server is taken to be down (what it answered "
                              f"meanwhile is not held against the photos) and {12 - tried} were not tried; "
                              "re-run the stage to fetch only what is missing")


def test_photos_settled_before_do_not_hide_a_server_that_is_down(fake_unsplash, tmp_path, fast_backoff, monkeypatch):
    """Rejections already in the journal say nothing about the server now, and once it is taken to be down no
    reserve photo is tried for the slots they free."""
    train, test, reserve = photo_ids("tr", 12), photo_ids("te", 1), photo_ids("re", 6)
    fake_unsplash.image_faults = {pid: "500-always" for pid in train + test + reserve}
    fake_unsplash.delay_s = 0.1  # a photo takes longer than this thread's turn to count it, even on a loaded CPU
    monkeypatch.setattr("chromalab.data.images.FAIL_FAST_STREAK", 3)
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "rejected.csv").write_text(
        "photo_id,split,reason\n" + "".join(f"{pid},train,gone (HTTP 404)\n" for pid in train[::3]))
    with pytest.raises(ChromalabError, match="3 in a row gave no photo, so the server is taken to be down"):
        run_images(params(concurrency=1, retries=1), tmp_path / "split", tmp_path / "images")
    assert len(fake_unsplash.image_counts()) <= 4  # the streak's 3, and at most the one a worker had begun


def test_an_outage_answering_404_to_every_photo_leaves_no_lasting_rejection(tmp_path, fast_backoff, monkeypatch):
    """404 for every photo is the server's trouble, not every photo gone: the rejections count toward the
    streak, are dropped when it ends the run, and the re-run comes out as if the outage never was."""
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 1), photo_ids("re", 2)
    monkeypatch.setattr("chromalab.data.images.FAIL_FAST_STREAK", 6)  # reached by the reserve's round

    def outputs(name, outage):
        with FakeUnsplash(image_faults={pid: "404" for pid in train + test + reserve} if outage else {}) as server:
            write_split(tmp_path / name / "split", server.url, train, test, reserve)
            if outage:
                with pytest.raises(ChromalabError, match="^5 of 5 photos .* in a row gave no photo, so the server is "):
                    run_images(params(concurrency=1), tmp_path / name / "split", tmp_path / name / "images")
                assert read_csv(tmp_path / name / "images" / "rejected.csv") == []
                server.image_faults = {}  # the outage is over
            run_images(params(concurrency=1), tmp_path / name / "split", tmp_path / name / "images")
        check_output(tmp_path / name / "images")
        manifest = [{k: v for k, v in row.items() if k != "source"}  # the source names the server's port
                    for row in read_csv(tmp_path / name / "images" / "manifest.csv")]
        return manifest, (tmp_path / name / "images" / "rejected.csv").read_text()

    assert outputs("outage", outage=True) == outputs("healthy", outage=False)


def test_a_block_of_gone_photos_stops_one_run_not_every_run(fake_unsplash, tmp_path, fast_backoff, monkeypatch):
    """More gone photos in a row than the streak look like a server down. The next run, once a photo came fine,
    judges each of them on its own, so the stage finishes instead of stopping at them for ever; a block at the
    end of the list, with nothing else left to fetch, is judged once a reserve photo came fine."""
    monkeypatch.setattr("chromalab.data.images.FAIL_FAST_STREAK", 4)
    for name, (train, test) in {"middle": (photo_ids("tr", 10), photo_ids("te", 1)),
                                "end": (photo_ids("tr", 3), photo_ids("te", 6))}.items():
        reserve = photo_ids(f"re{name}", 8)
        gone = train[:6] if name == "middle" else test
        fake_unsplash.image_faults = {pid: "404" for pid in gone}
        split, out = tmp_path / name / "split", tmp_path / name / "images"
        write_split(split, fake_unsplash.url, train, test, reserve)
        with pytest.raises(ChromalabError, match="4 in a row gave no photo, so the server is taken to be down"):
            run_images(params(concurrency=1), split, out)
        assert read_csv(out / "rejected.csv") == []

        run_images(params(concurrency=1), split, out)
        got = check_output(out)  # down_streak.json is gone too
        assert sorted(got["train"] + got["test"]) == sorted(set(train + test) - set(gone) | set(reserve[:6]))
        assert {r["photo_id"] for r in read_csv(out / "rejected.csv")} == set(gone)


def test_a_block_of_gone_photos_at_the_front_of_the_reserve_ends_too(fake_unsplash, tmp_path, fast_backoff,
                                                                     monkeypatch):
    """The reserve photos fetched to see whether the server came back may be a gone block themselves: they stop
    that run, and the next fetches past them."""
    train, test, reserve = photo_ids("tr", 3), photo_ids("te", 6), photo_ids("re", 12)
    monkeypatch.setattr("chromalab.data.images.FAIL_FAST_STREAK", 4)
    fake_unsplash.image_faults = {pid: "404" for pid in test + reserve[:4]}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    out = tmp_path / "images"
    for _ in range(2):  # stopped by test's photos, then by the reserve's first 4 (fetched first, as a check)
        with pytest.raises(ChromalabError, match="4 in a row gave no photo, so the server is taken to be down"):
            run_images(params(concurrency=1), tmp_path / "split", out)
    run_images(params(concurrency=1), tmp_path / "split", out)
    assert sorted(check_output(out)["test"]) == sorted(reserve[4:10])
    assert {r["photo_id"] for r in read_csv(out / "rejected.csv")} == set(test + reserve[:4])


@pytest.mark.parametrize("n_reserve", [12, 1])  # 1: the reserve runs out before a streak of reserve photos
def test_an_outage_lasting_two_runs_leaves_no_lasting_rejection(fake_unsplash, tmp_path, fast_backoff, monkeypatch,
                                                                n_reserve):
    """The photos of the streak that stopped the last run count again while no photo has come fine: a server
    still down stops the next run too, and nothing it answered is believed."""
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 2), photo_ids("re", n_reserve)
    monkeypatch.setattr("chromalab.data.images.FAIL_FAST_STREAK", 4)
    fake_unsplash.image_faults = {pid: "404" for pid in train + test + reserve}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    out = tmp_path / "images"
    for _ in range(2):
        asked_before = sum(fake_unsplash.image_counts().values())
        with pytest.raises(ChromalabError, match="4 in a row gave no photo, so the server is taken to be down"):
            run_images(params(concurrency=1), tmp_path / "split", out)
        assert read_csv(out / "rejected.csv") == []
    assert sum(fake_unsplash.image_counts().values()) - asked_before <= 5  # its streak, and one already on its way
    fake_unsplash.image_faults = {}  # the outage is over
    run_images(params(concurrency=1), tmp_path / "split", out)
    assert sorted(check_output(out)["train"]) == sorted(train)
    assert read_csv(out / "rejected.csv") == []


def test_a_photo_asked_for_before_an_outage_does_not_make_its_404s_lasting(fake_unsplash, tmp_path, fast_backoff,
                                                                          monkeypatch):
    """A slow photo asked for just before an outage lands after some of the outage's 404s: it shows the server
    healthy only before it was asked for, so those 404s stay held, count on, and are dropped with the rest."""
    good, outage = photo_ids("ok", 1), photo_ids("tr", 10)
    test, reserve = photo_ids("te", 1), photo_ids("re", 4)
    fake_unsplash.delay_s, fake_unsplash.slow_s = 0.1, 0.25  # 2 to 4 404s come while the slow photo is on its way
    fake_unsplash.image_faults = {good[0]: "slow", **{pid: "404" for pid in outage + test + reserve}}
    monkeypatch.setattr("chromalab.data.images.FAIL_FAST_STREAK", 6)
    write_split(tmp_path / "split", fake_unsplash.url, good + outage, test, reserve)
    with pytest.raises(ChromalabError, match="6 in a row gave no photo, so the server is taken to be down"):
        run_images(params(concurrency=2), tmp_path / "split", tmp_path / "images")
    assert (tmp_path / "images" / "train" / f"{good[0]}.jpg").exists()
    assert fake_unsplash.image_counts()[outage[0]] == 1  # answered while the good photo was on its way
    assert read_csv(tmp_path / "images" / "rejected.csv") == []


def test_a_photo_the_server_never_sends_is_given_up_after_two_runs_instead_of_stopping_every_run(
        fake_unsplash, tmp_path, fast_backoff):
    train, test, reserve = photo_ids("tr", 3), photo_ids("te", 1), photo_ids("re", 2)
    fake_unsplash.image_faults = {train[1]: "500-always"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=r"\); re-run the stage"):
        run_images(params(retries=1), tmp_path / "split", tmp_path / "images")
    with pytest.raises(ChromalabError, match=r"1 of them have now failed in 2 runs, and the next run replaces them "):
        run_images(params(retries=1), tmp_path / "split", tmp_path / "images")
    asked = fake_unsplash.image_counts()[train[1]]
    run_images(params(retries=1), tmp_path / "split", tmp_path / "images")
    assert fake_unsplash.image_counts()[train[1]] == asked  # not asked a third time
    assert sorted(check_output(tmp_path / "images")["train"]) == sorted([train[0], train[2], reserve[0]])
    reasons = {r["photo_id"]: r["reason"] for r in read_csv(tmp_path / "images" / "rejected.csv")}
    assert reasons == {train[1]: "unreachable (could not be fetched in 2 runs, each after its retries)"}


def test_a_photo_that_failed_a_run_then_turned_out_gone_leaves_no_count_in_the_finished_output(
        fake_unsplash, tmp_path, fast_backoff):
    """Found by a randomized hostile server (helper-54): failed_runs.json outlived the run that completed."""
    train, test, reserve = photo_ids("tr", 3), photo_ids("te", 1), photo_ids("re", 2)
    fake_unsplash.image_faults = {train[1]: ["500-always", "404"]}  # one 500 (no retries), then gone
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"\(e.g. {train[1]}: HTTP 500 after 0 retries\)"):
        run_images(params(retries=0), tmp_path / "split", tmp_path / "images")
    run_images(params(retries=0), tmp_path / "split", tmp_path / "images")
    assert sorted(check_output(tmp_path / "images")["train"]) == sorted([train[0], train[2], reserve[0]])


def test_replacement_does_not_depend_on_thread_timing(tmp_path, fast_backoff):
    train, test, reserve = photo_ids("tr", 10), photo_ids("te", 3), photo_ids("re", 5)
    faults = {train[1]: "404", train[4]: "gray", test[0]: "corrupt", reserve[1]: "404", train[7]: "slow"}

    def run(name, concurrency):
        with FakeUnsplash(image_faults=dict(faults), slow_s=0.2) as server:
            write_split(tmp_path / name / "split", server.url, train, test, reserve)
            run_images(params(concurrency=concurrency), tmp_path / name / "split", tmp_path / name / "images")
        rows = read_csv(tmp_path / name / "images" / "manifest.csv")
        rejected = (tmp_path / name / "images" / "rejected.csv").read_text()
        return [(r["photo_id"], r["split"], r["sha256"]) for r in rows], rejected

    assert run("serial", 1) == run("parallel", 8)


def test_reserve_exhausted_is_a_clear_error(fake_unsplash, tmp_path):
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 4), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "gray", test[0]: "404", test[1]: "410"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError) as err:
        run_images(params(), tmp_path / "split", tmp_path / "images")
    assert str(err.value) == "reserve exhausted: 2 of 4 test photos missing; raise split.n_reserve"
    assert not (tmp_path / "images" / "manifest.csv").exists()


def test_network_failure_asks_for_a_rerun_which_fetches_only_what_is_missing(fake_unsplash, tmp_path, fast_backoff):
    train, test, reserve = photo_ids("tr", 6), photo_ids("te", 2), photo_ids("re", 2)
    fake_unsplash.image_faults = {train[1]: "500-always", train[2]: "404"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"1 of 8 photos could not be fetched \(e.g. {train[1]}: HTTP 500 after 1 "
                                             "retries\\); re-run the stage"):
        run_images(params(retries=1), tmp_path / "split", tmp_path / "images")
    assert not (tmp_path / "images" / "manifest.csv").exists()
    assert fake_unsplash.image_counts()[train[1]] == 2  # tried, retried once
    assert fake_unsplash.image_counts()[reserve[0]] == 1  # the 404 was replaced; the 500 was not

    del fake_unsplash.image_faults[train[1]]  # the server recovers
    before = fake_unsplash.image_counts()
    summary = run_images(params(retries=1), tmp_path / "split", tmp_path / "images")
    after = fake_unsplash.image_counts()
    assert {pid: after[pid] - before.get(pid, 0) for pid in after if after[pid] != before.get(pid, 0)} == {train[1]: 1}
    assert summary["fetched"] == 1
    got = check_output(tmp_path / "images")
    assert sorted(got["train"]) == sorted([t for t in train if t != train[2]] + [reserve[0]])


def test_a_server_refusing_photos_is_named_as_such_and_not_taken_for_photos_gone(fake_unsplash, tmp_path,
                                                                                 fast_backoff):
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 2), photo_ids("re", 2)
    fake_unsplash.image_faults = {train[1]: "403", train[3]: "403", test[0]: "500-always"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError) as err:
        run_images(params(retries=1), tmp_path / "split", tmp_path / "images")
    assert str(err.value).startswith(f"3 of 6 photos could not be fetched (e.g. {train[1]}: HTTP 403); 2 of them "
                                     "refused (HTTP 401/403: the server blocks chromalab")
    assert fake_unsplash.image_counts()[train[1]] == 1  # a refusal is not retried, nor replaced from the reserve
    assert not (tmp_path / "images" / "rejected.csv").read_text().count(train[1])


def test_an_error_page_is_a_failure_to_retry_and_a_photo_with_odd_exif_is_kept_upright(fake_unsplash, tmp_path,
                                                                                       fast_backoff):
    train, test, reserve = photo_ids("tr", 4), photo_ids("te", 2), photo_ids("re", 2)
    fake_unsplash.image_faults = {train[0]: "html-page", train[1]: "bad-exif"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"1 of 6 photos could not be fetched \(e.g. {train[0]}: HTTP 200 with a "
                                             r"text/html page instead of a photo .*\); re-run the stage"):
        run_images(params(), tmp_path / "split", tmp_path / "images")
    # a page says nothing about the photo: not recorded, so it is asked again; the EXIF that breaks Pillow's
    # exif_transpose (it rotated, then raised re-writing a mistyped tag) does not stop the photo from being turned
    assert read_csv(tmp_path / "images" / "rejected.csv") == []

    del fake_unsplash.image_faults[train[0]]  # the host lets us in again
    run_images(params(), tmp_path / "split", tmp_path / "images")
    got = check_output(tmp_path / "images")
    assert sorted(got["train"]) == sorted(train)
    kept = np.asarray(Image.open(tmp_path / "images" / "train" / f"{train[1]}.jpg"), dtype=float)
    turned = np.rot90(render_photo(train[1], SIZE, SIZE), -1).astype(float)  # orientation 6: 90° clockwise
    assert np.abs(kept - turned).mean() < np.abs(kept - np.rot90(turned, 2)).mean() / 4


def test_a_photo_dripped_byte_by_byte_fails_at_its_deadline_instead_of_holding_the_stage(fake_unsplash, tmp_path,
                                                                                          fast_backoff):
    train, test, reserve = photo_ids("tr", 3), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "drip"}
    # between 64-byte pieces: inside the 1 s read timeout, ~10 s for a photo. (With 0.5 s a loaded CI machine's
    # server could miss the timeout on a head, which urllib3 retries: one request more than the tries.)
    fake_unsplash.slow_s = 0.4
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"1 of 4 photos could not be fetched \(e.g. {train[0]}: too slow "
                                             r"\([\d,]+ bytes in 4 s\) after 1 retries\)") as err:
        run_images(params(timeout_s=1.0, retries=1), tmp_path / "split", tmp_path / "images")
    assert fake_unsplash.image_counts()[train[0]] == 2
    # given up at the deadline, part-way: not after waiting for the whole photo
    received = int(str(err.value).split("too slow (")[1].split(" bytes")[0].replace(",", ""))
    photo, _ = encode(render_photo(train[0], SIZE, SIZE), "jpg", 90)
    assert 0 < received < len(photo)


def test_slow_heads_and_slow_bodies_together_do_not_hold_a_photo_past_its_tries_deadlines(fake_unsplash, tmp_path,
                                                                                          fast_backoff):
    """A head dripped past its deadline is retried inside one fetch, a body dripped past it by another fetch:
    alternating, a photo took (retries + 1)² deadlines (at the defaults, 36 × 120 s). It stops once (retries + 1)
    deadlines (8 s here) have passed."""
    train, test, reserve = photo_ids("tr", 2), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: ["drip-headers", "drip"] * 2}
    fake_unsplash.slow_s = 0.4  # a header line or a 64-byte piece inside every 1 s read timeout (as above)
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"\(e.g. {train[0]}: too slow \([\d,]+ bytes in 4 s\), and no whole "
                                             r"photo in 8 s over 1 tries\)"):
        run_images(params(timeout_s=1.0, retries=1), tmp_path / "split", tmp_path / "images")
    assert fake_unsplash.image_counts()[train[0]] == 2  # not 4


def test_a_retry_after_longer_than_a_photo_s_deadline_is_cut_to_it_and_the_photo_tried_next_run(
        fake_unsplash, tmp_path, fast_backoff):
    """A 429 asking for an hour was waited up to 5 minutes per retry: a worker held for (retries × 5) min per photo,
    far past its (retries + 1) deadlines. Each wait is cut to one deadline (4 s here); not written off."""
    train, test, reserve = photo_ids("tr", 2), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "429-wait-an-hour"}
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    started = time.monotonic()
    with pytest.raises(ChromalabError, match=rf"\(e.g. {train[0]}: HTTP 429 after 1 retries\)"):
        run_images(params(timeout_s=1.0, retries=1), tmp_path / "split", tmp_path / "images")
    assert 4 <= time.monotonic() - started < 30
    fake_unsplash.image_faults = {}
    run_images(params(timeout_s=1.0, retries=1), tmp_path / "split", tmp_path / "images")
    assert sorted(check_output(tmp_path / "images")["train"]) == train


def test_a_photo_s_head_and_body_share_one_deadline_per_try(fake_unsplash, tmp_path, fast_backoff):
    """The head and the body each inside 4 × timeout_s (4 s here), together past it: too slow."""
    train, test, reserve = photo_ids("tr", 2), photo_ids("te", 1), photo_ids("re", 1)
    fake_unsplash.image_faults = {train[0]: "slow-head-and-body"}
    fake_unsplash.slow_s = 0.7  # ~2.8 s for the head, as much for the body; each piece well inside the 1 s timeout
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    with pytest.raises(ChromalabError, match=rf"\(e.g. {train[0]}: too slow \([\d,]+ bytes in 4 s\) after 0 retries"):
        run_images(params(timeout_s=1.0, retries=0), tmp_path / "split", tmp_path / "images")


KILL_SCRIPT = """
import json, sys
from pathlib import Path
from chromalab.config import parse_params
from chromalab.data.images import run_images
run_images(parse_params(json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]))
"""


def _kill_once_five_are_made(settings: dict, split_dir: Path, out: Path) -> None:
    """Run the stage in a process of its own and kill it (-9) once five train photos are written."""
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(settings), str(split_dir), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((out / "train").glob("*.jpg"))) < 5:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.kill()
    process.wait()


def test_killed_run_resumes_without_fetching_anything_twice(fake_unsplash, tmp_path):
    train, test, reserve = photo_ids("tr", 16), photo_ids("te", 4), photo_ids("re", 3)
    fake_unsplash.image_faults = {train[0]: "404"}
    fake_unsplash.delay_s = 0.15  # every image is slow, so the kill lands mid-run
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    out = tmp_path / "images"
    settings = raw_params(concurrency=2)

    _kill_once_five_are_made(settings, tmp_path / "split", out)
    time.sleep(0.3)  # let in-flight requests reach the server's log
    done_at_kill = {p.stem for split in ("train", "test") for p in (out / split).glob("*.jpg")}
    counts_at_kill = fake_unsplash.image_counts()
    assert not (out / "manifest.csv").exists()
    assert len(counts_at_kill) < len(train + test)  # killed part-way
    assert counts_at_kill[train[0]] == 1 and train[0] in (out / "rejected.csv").read_text()
    half_written = [out / "train" / f".{train[9]}.jpg.0123abcd.tmp", out / ".rejected.csv.89abcdef.tmp"]
    for temp in half_written:  # as a kill mid-write leaves them, whatever this kill hit
        temp.write_bytes(b"half a file")

    run_images(parse_params(settings), tmp_path / "split", out)
    assert not any(temp.exists() for temp in half_written)

    counts = fake_unsplash.image_counts()
    in_flight = set(counts_at_kill) - done_at_kill - {train[0]}  # requested, but killed before the file was whole
    for pid in done_at_kill | {train[0]}:
        assert counts[pid] == 1, f"{pid} was fetched again"
    for pid in set(counts) - done_at_kill - {train[0]}:
        assert counts[pid] == (2 if pid in in_flight else 1)
    got = check_output(out)
    assert sorted(got["train"]) == sorted(train[1:] + [reserve[0]])
    assert sorted(got["test"]) == sorted(test)


def test_a_kill_between_two_photos_sent_the_same_junk_does_not_change_the_verdict(fake_unsplash, tmp_path):
    """Which undecodable bytes came for which photo is known in memory only: a corrupt verdict is written at
    the run's end, so a run killed between two photos sent the same junk has kept neither verdict."""
    train, test, reserve = photo_ids("tr", 16), photo_ids("te", 4), photo_ids("re", 3)
    fake_unsplash.image_faults = {train[0]: "junk-as-jpeg", test[3]: "junk-as-jpeg"}
    fake_unsplash.delay_s = 0.15  # every image is slow, so the kill lands mid-run
    write_split(tmp_path / "split", fake_unsplash.url, train, test, reserve)
    out = tmp_path / "images"
    settings = raw_params(concurrency=2)
    _kill_once_five_are_made(settings, tmp_path / "split", out)
    assert fake_unsplash.image_counts()[train[0]] == 2 and test[3] not in fake_unsplash.image_counts()
    assert read_csv(out / "rejected.csv") == []

    fake_unsplash.delay_s = 0.0
    with pytest.raises(ChromalabError, match=rf"^1 of 20 photos could not be fetched \(e.g. {test[3]}: unusable bytes "):
        run_images(parse_params(settings), tmp_path / "split", out)  # tr00's slot was refilled before te03 came
    assert read_csv(out / "rejected.csv") == []
    fake_unsplash.image_faults = {}
    run_images(parse_params(settings), tmp_path / "split", out)
    assert sorted(check_output(out)["train"]) == train


def test_param_and_split_changes_reuse_what_still_holds(fake_unsplash, tmp_path):
    train, test, reserve = photo_ids("tr", 6), photo_ids("te", 2), photo_ids("re", 3)
    fake_unsplash.image_faults = {train[0]: "404", train[1]: "gray"}
    split_dir, out = tmp_path / "split", tmp_path / "images"
    write_split(split_dir, fake_unsplash.url, train, test, reserve)
    first = run_images(params(), split_dir, out)
    assert first["fetched"] == 10

    assert run_images(params(), split_dir, out)["fetched"] == 0  # a re-run with nothing to do fetches nothing

    # another JPEG quality invalidates the files and the gray verdict, not the 404
    before = fake_unsplash.image_counts()
    changed = run_images(params(jpeg_quality=80), split_dir, out)
    after = fake_unsplash.image_counts()
    assert after[train[0]] == before[train[0]] == 1
    assert changed["fetched"] == 9
    assert {r["source"].rsplit("q=", 1)[1] for r in read_csv(out / "manifest.csv")} == {"80"}

    # a new split: dropped photos disappear, a photo moved from train to test is moved, not fetched
    new_train, new_test = train[3:] + ["new00"], [train[2], test[0]]
    write_split(split_dir, fake_unsplash.url, new_train, new_test, reserve)
    before = fake_unsplash.image_counts()
    run_images(params(jpeg_quality=80), split_dir, out)
    after = fake_unsplash.image_counts()
    assert {pid for pid in after if after[pid] != before.get(pid, 0)} == {"new00"}
    got = check_output(out)
    assert sorted(got["train"]) == sorted(new_train) and sorted(got["test"]) == sorted(new_test)
    assert {r["photo_id"] for r in read_csv(out / "rejected.csv")} == set()  # none of the listed photos was rejected


def test_folder_source_orients_converts_crops_and_checks(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    # 48x32, left half red, right half blue, EXIF orientation 6 (shown rotated 90° clockwise: red on top)
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (220, 30, 30)
    rgb[:, 24:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif, quality=95)
    rgba = np.dstack([rgb, np.full((32, 48), 128, np.uint8)])
    Image.fromarray(rgba).save(folder / "transparent.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(rgb[:, ::-1]).save(folder / "spare1.webp")
    Image.fromarray(rgb[::-1]).save(folder / "spare2.tif")
    Image.fromarray(rgb[:12, 18:30]).save(folder / "small.png")  # under half of SIZE: your own, so scaled up

    def path(pid):
        return str(folder / {"rot": "rotated.jpg", "alpha": "transparent.png", "pal": "palette.png", "gray": "gray.jpg",
                             "broken": "broken.jpg", "sp1": "spare1.webp", "sp2": "spare2.tif",
                             "small": "small.png"}[pid])

    write_split(tmp_path / "split", "", ["rot", "alpha", "gray", "pal", "small"], ["broken"], ["sp1", "sp2"], url=path)
    folder_params = parse_params({**raw_params(), "data": {"source": "folder", "folder": str(folder)}})
    run_images(folder_params, tmp_path / "split", tmp_path / "images")

    got = check_output(tmp_path / "images")
    assert sorted(got["train"]) == ["alpha", "pal", "rot", "small", "sp1"] and got["test"] == ["sp2"]
    reasons = {r["photo_id"]: r["reason"] for r in read_csv(tmp_path / "images" / "rejected.csv")}
    assert reasons["gray"].startswith("gray") and reasons["broken"].startswith("corrupt")
    rotated = np.asarray(Image.open(tmp_path / "images" / "train" / "rot.jpg")).astype(int)
    assert rotated[4, 16, 0] > 150 > rotated[4, 16, 2]  # top: red
    assert rotated[27, 16, 2] > 150 > rotated[27, 16, 0]  # bottom: blue
    sources = {r["photo_id"]: r["source"] for r in read_csv(tmp_path / "images" / "manifest.csv")}
    assert sources["rot"] == path("rot")


def test_a_webp_that_memory_could_not_decode_is_tried_again_not_rejected_as_corrupt(tmp_path, monkeypatch):
    """Short of memory, Pillow's WebP decoder says "could not create decoder object", as it does for a file cut
    short: a whole file is the machine's fault, so the run fails (re-run), and the photo is not replaced for good."""
    from PIL import WebPImagePlugin

    folder = tmp_path / "mine"
    folder.mkdir()
    for i, pid in enumerate(("a", "b", "c")):  # large enough to starve a decoder (files.STARVING_PIXELS)
        Image.new("RGB", (2100, 2000), (200, 60 + 40 * i, 40)).save(folder / f"{pid}.webp")
    whole = (folder / "a.webp").read_bytes()
    (folder / "cut.webp").write_bytes(whole[:len(whole) // 2])
    path = {pid: str(folder / f"{pid}.webp") for pid in ("a", "b", "c", "cut")}
    write_split(tmp_path / "split", "", ["a", "cut"], ["b"], ["c"], url=path.__getitem__)
    params = parse_params({**raw_params(), "data": {"source": "folder", "folder": str(folder)}})

    def starved(*args, **kwargs):
        raise OSError("could not create decoder object")
    with monkeypatch.context() as patch:
        patch.setattr(WebPImagePlugin._webp, "WebPAnimDecoder", starved)
        with pytest.raises(ChromalabError, match=r"a: not enough memory to decode it: lower images.concurrency"):
            run_images(params, tmp_path / "split", tmp_path / "images")
    run_images(params, tmp_path / "split", tmp_path / "images")
    got = check_output(tmp_path / "images")
    assert got["train"] == ["a", "c"] and got["test"] == ["b"]  # a kept; the cut-short file replaced by c
    reasons = {r["photo_id"]: r["reason"] for r in read_csv(tmp_path / "images" / "rejected.csv")}
    assert set(reasons) == {"cut"} and reasons["cut"].startswith("corrupt")


def test_a_photo_is_stored_as_it_looks_in_srgb_and_on_white(tmp_path):
    """What the model learns from is the photo as shown: an Adobe RGB photo's lightness through its profile (as
    colorize reads one), a transparent part white (as colorize feeds one to the model)."""
    from icc import ADOBE_RGB_GAMMA, adobe_rgb, neutral_lightness

    from chromalab.color import rgb_to_lab_norm
    from chromalab.data.images import square_rgb

    Image.new("RGB", (40, 40), (30, 30, 30)).save(tmp_path / "adobe.png", icc_profile=adobe_rgb())
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    with Image.open(tmp_path / "adobe.png") as adobe, Image.open(tmp_path / "clear.png") as clear:
        stored, blank = square_rgb(adobe, 32), square_rgb(clear, 32)
    lightness = rgb_to_lab_norm(np.asarray(stored))[..., 0] * 100
    np.testing.assert_allclose(lightness, neutral_lightness(30, ADOBE_RGB_GAMMA), atol=0.6)
    assert blank.mode == "RGB" and np.asarray(blank).min() == 255


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest's capture resets our filter
def test_a_photo_past_pillows_bomb_limit_is_too_large_not_corrupt_and_one_near_it_is_used_quietly(
        tmp_path, monkeypatch):
    """Pillow refuses past twice MAX_IMAGE_PIXELS (179 MP) and warns past it; here the limit is lowered to what a
    test photo passes, instead of writing a 200-megapixel file."""
    folder = tmp_path / "mine"
    folder.mkdir()
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24], rgb[:, 24:] = (220, 30, 30), (30, 30, 220)
    Image.fromarray(rgb).save(folder / "near.jpg", quality=95)  # 1,536 pixels: warned about, used
    Image.fromarray(np.tile(rgb, (2, 1, 1))).save(folder / "huge.jpg", quality=95)  # 3,072: refused
    Image.fromarray(rgb[::-1]).save(folder / "spare.jpg", quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    write_split(tmp_path / "split", "", ["near"], ["huge"], ["spare"], url=lambda pid: str(folder / f"{pid}.jpg"))
    run_images(parse_params({**raw_params(), "data": {"source": "folder", "folder": str(folder)}}),
               tmp_path / "split", tmp_path / "images")
    reasons = {r["photo_id"]: r["reason"] for r in read_csv(tmp_path / "images" / "rejected.csv")}
    assert list(reasons) == ["huge"] and reasons["huge"].startswith("too large (over ")
    assert check_output(tmp_path / "images") == {"train": ["near"], "test": ["spare"], "val": []}
    # Pillow's two-line warning about attacks, for each such photo (pytest's own warning capture would hide it)
    opened = subprocess.run([sys.executable, "-c", "import sys; import chromalab.data.images; from PIL import Image; "
                             "Image.MAX_IMAGE_PIXELS = 1200; Image.open(sys.argv[1]).load()", str(folder / "near.jpg")],
                            capture_output=True, text=True, check=True)
    assert "DecompressionBombWarning" not in opened.stderr


def test_a_folder_of_many_gray_photos_in_a_row_is_not_taken_for_a_server_that_is_down(tmp_path):
    """The fail-fast streak is a server's: your own folder's 16 gray photos in a row are rejected each, and
    their slots go to the reserve."""
    folder = tmp_path / "mine"
    folder.mkdir()
    gray, colour = photo_ids("gr", FAIL_FAST_STREAK + 1), photo_ids("co", FAIL_FAST_STREAK + 3)
    for pid in gray + colour:
        value = (90, 90, 90) if pid in gray else (200, 40 + colour.index(pid), 40)
        Image.fromarray(np.full((32, 48, 3), value, np.uint8)).save(folder / f"{pid}.jpg", quality=95)
    write_split(tmp_path / "split", "", gray, colour[:2], colour[2:], url=lambda pid: str(folder / f"{pid}.jpg"))
    folder_params = parse_params({**raw_params(concurrency=1), "data": {"source": "folder", "folder": str(folder)}})
    run_images(folder_params, tmp_path / "split", tmp_path / "images")
    assert sorted(r["photo_id"] for r in read_csv(tmp_path / "images" / "rejected.csv")) == gray
    assert sorted(check_output(tmp_path / "images")["train"]) == colour[2:]


def test_another_folder_with_the_same_file_names_is_fetched_afresh(tmp_path):
    """The folder source's ids are relative paths, which another folder (another camera's IMG_0001.jpg)
    repeats with other photos: its photos must not be taken for the first folder's."""
    outputs = {}
    for folder, colour in (("first", (200, 40, 40)), ("second", (40, 40, 200))):
        for name in ("a.jpg", "b.jpg", "c.jpg"):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.fromarray(np.full((32, 48, 3), colour, np.uint8)).save(tmp_path / folder / name, quality=95)
        write_split(tmp_path / "split", "", ["a", "b"], ["c"], [], url=lambda pid: str(tmp_path / folder / f"{pid}.jpg"))
        folder_params = parse_params({**raw_params(), "data": {"source": "folder", "folder": str(tmp_path / folder)}})
        summary = run_images(folder_params, tmp_path / "split", tmp_path / "images")
        assert summary["fetched"] == 3 and summary["reused"] == 0
        outputs[folder] = np.asarray(Image.open(tmp_path / "images" / "train" / "a.jpg")).astype(int)
    assert outputs["second"][..., 2].mean() > 150 > outputs["second"][..., 0].mean()  # the second folder's blue


def test_a_photo_replaced_in_your_folder_is_read_again_and_a_mended_one_taken_back(tmp_path):
    """The same name, new content: the output made from the old file, or the old file's rejection, must not
    stand in for it."""
    folder = tmp_path / "mine"
    folder.mkdir()

    def save(name, colour, mtime_s):
        Image.fromarray(np.full((32, 48, 3), colour, np.uint8)).save(folder / name, quality=95)
        os.utime(folder / name, (mtime_s, mtime_s))

    save("a.jpg", (200, 40, 40), 1_000_000)
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 half a photo")
    save("c.jpg", (40, 200, 40), 1_000_000)
    save("d.jpg", (40, 40, 200), 1_000_000)
    write_split(tmp_path / "split", "", ["a", "b"], ["c"], ["d"], url=lambda pid: str(folder / f"{pid}.jpg"))
    folder_params = parse_params({**raw_params(), "data": {"source": "folder", "folder": str(folder)}})
    run_images(folder_params, tmp_path / "split", tmp_path / "images")
    assert check_output(tmp_path / "images")["train"] == ["a", "d"]  # b rejected, d from the reserve

    save("a.jpg", (40, 40, 200), 2_000_000)  # a retaken photo under the same name
    save("b.jpg", (200, 200, 40), 2_000_000)  # the broken file, mended
    summary = run_images(folder_params, tmp_path / "split", tmp_path / "images")
    assert check_output(tmp_path / "images")["train"] == ["a", "b"] and summary["fetched"] == 2
    a = np.asarray(Image.open(tmp_path / "images" / "train" / "a.jpg")).astype(int)
    assert a[..., 2].mean() > 150 > a[..., 0].mean()  # the new, blue a
    assert read_csv(tmp_path / "images" / "rejected.csv") == []


def test_sized_url_merges_an_existing_query():
    url = sized_url("https://images.unsplash.com/photo-1?ixid=abc&w=1080", 256, 90)
    assert url == "https://images.unsplash.com/photo-1?ixid=abc&w=256&h=256&fit=crop&crop=faces,entropy&fm=jpg&q=90"


def test_missing_split_lists(tmp_path):
    with pytest.raises(ChromalabError, match="run the split stage first"):
        run_images(params(), tmp_path / "split", tmp_path / "images")
