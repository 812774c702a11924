"""Stage `images`: the train, test and val photos as image_size² RGB JPEGs, each checked, bad ones replaced.

Unsplash photos are fetched from their dynamic image URL, cropped by the server
(`fit=crop&crop=faces,entropy`); folder photos are centre-cropped here. Every photo must decode in
full and have colour (mean chroma >= images.min_chroma); a photo that is gone (404/410/451), corrupt or
gray is recorded in rejected.csv and its slot goes to the next reserve photo. Such verdicts count toward the
fail-fast streak like failures (an outage may answer 404 to every photo) and are written only once the server
shows itself healthy: a photo asked for afterwards and fetched fine, or the run's end without the server taken to be down
(corrupt ones wait for the run's end in any case). Bytes that are no image at all, or one photo sent for two
ids (a placeholder), are the server's: failures, not rejections.

out_dir persists across runs (DVC `persist: true`), which makes the stage resumable: each image is
written atomically, so a file that exists is whole and is not fetched again, and rejections are
appended once settled (above), so a gone photo is not asked for twice. A photo that could not be fetched in
MAX_FAILED_RUNS runs is given up (failed_runs.json counts them). The photos of a streak that stopped a run
(down_streak.json) are judged alone by the next, once a photo came fine: a block of gone photos must not stop
every run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import urllib3
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

from chromalab.color import mean_chroma
from chromalab.config import Params
from chromalab.files import (READ_ERRORS, clear_stale_temps, decoder_starved, in_srgb, over_white, signature_format,
                             upright, write_bytes_atomic, write_text_atomic)
from chromalab.errors import ChromalabError
from chromalab.data.formats import MANIFEST, MANIFEST_FIELDS, SAFE_PHOTO_ID, SPLIT_FIELDS, SPLITS, FETCHED_SPLITS
from chromalab.data.http import (PAGE_TYPES, RETRY_STATUSES, TOO_MANY_REDIRECTS, USER_AGENT, content_type,
                                 retry_policy, transport_failure, try_started, with_headers_deadline)

GONE_STATUSES = (404, 410, 451)  # 451: withheld for legal reasons, as final as gone
BACKOFF_FACTOR_S = 0.5  # urllib3: no wait before the 1st retry, then 1 s, 2 s, 4 s, … (capped below)
BACKOFF_MAX_S = 60.0
# A photo's whole transfer may take this many images.timeout_s (each read's limit): a server that drips its
# bytes just inside that limit cannot hold a worker for hours.
PHOTO_DEADLINE_READS = 4
# Photos in a row that could not be fetched, each after its retries, before the rest are not even tried: the
# server is down or refusing, and 2,000 more photos would take hours to fail the same way.
FAIL_FAST_STREAK = 16
NOT_TRIED = "not tried: the photos asked for before it could not be fetched either"
SHARED_JUNK = ("unusable bytes (undecodable, gray, too small) that another photo was sent too: the server's, "
               "not the photo's")
PLACEHOLDER = "the same photo as another photo was sent: the server's placeholder, not the photo"
# A fetched photo of more pixels than this many times image_size², and than FETCHED_MAX_PIXELS, is not the photo
# asked for (an Unsplash original, sent when the size is ignored, is up to ~24 MP): a small PNG can hold 88 MP
# that decode to gigabytes.
FETCHED_OVERSIZE = 64
FETCHED_MAX_PIXELS = 40_000_000
# Decodes of more pixels than this wait for one another: their memory must not multiply by images.concurrency.
BIG_DECODE_PIXELS = 4_000_000
BIG_DECODES = 2
# A size×size JPEG kept as served may have this much beside its pixels' raw bytes (EXIF, a colour profile):
# past it, it carries something else (60 MB after its end were kept as they came).
AS_SERVED_SLACK_BYTES = 64 << 10
MAX_PHOTO_BYTES = 64 << 20  # a fetched photo is image_size² pixels: far beyond this, the server is not sending one
REJECTED_FIELDS = ("photo_id", "split", "reason")
# What the files on disk were made with: another value invalidates them (only "gone" rejections survive).
SETTINGS_FILE = "fetch_settings.json"
FAILED_RUNS_FILE = "failed_runs.json"
DOWN_STREAK_FILE = "down_streak.json"
MAX_FAILED_RUNS = 2  # runs in which a photo could not be fetched before it is given up (replaced)
GONE = "gone"


class Photo(NamedTuple):
    photo_id: str
    image_url: str


@dataclass(frozen=True)
class Outcome:
    status: Literal["ok", "rejected", "failed"]  # failed = not known yet (network trouble): re-run
    detail: str = ""
    fetched: bool = False  # False: the file or the rejection was already on disk
    asked_at: float = 0.0  # a fetched photo: when the try that got it began waiting (time.monotonic)


class Rejected(Exception):
    """A permanent property of the photo (gone, corrupt, gray): replace it from the reserve."""


class Corrupt(Rejected):
    """The bytes do not decode to a photo: the photo's fault only if it sends the same bytes again."""


REFUSED = re.compile(r"HTTP 40[13]\b")  # a FetchFailed detail: the server said no to chromalab itself


class Answer(NamedTuple):
    data: bytes
    sized: bool  # its length was known (Content-Length, chunked, a file): a short body shows as broken


class FetchFailed(Exception):
    """The photo could not be fetched even after retries; nothing is known about it yet."""


class _BodyBroken(Exception):
    """An answer's body did not arrive whole in time: worth another try."""


def run_images(params: Params, split_dir: Path = Path("data/split"), out_dir: Path = Path("data/images")) -> dict:
    """Fill out_dir/train, out_dir/test and out_dir/val with exactly the listed number of checked photos; write manifest.csv."""
    split_dir, out_dir = Path(split_dir), Path(out_dir)
    lists = {name: read_split_list(split_dir / f"{name}.csv") for name in SPLITS}
    prepare_out_dir(out_dir, fetch_settings(params))
    journal = RejectionJournal(out_dir / "rejected.csv")
    failed_runs = FailedRuns(out_dir / FAILED_RUNS_FILE)
    down_streak = DownStreak(out_dir / DOWN_STREAK_FILE)
    fetcher = PhotoFetcher(params, out_dir, journal, failed_runs)

    slots = [(split, photo) for split in FETCHED_SPLITS for photo in lists[split]]
    chosen, failed, stats, streak = fill_slots(slots, deque(lists["reserve"]), fetcher, params.images.concurrency,
                                               down_streak.photos)
    down, made = streak.down, [photo for photo in chosen if photo is not None]
    made_ids = {photo.photo_id for photo in made}
    down_streak.save({photo_id for photo_id in down_streak.photos | (streak.dropped if down else set())
                      if photo_id not in made_ids and journal.reason(photo_id) is None})  # those still unsettled
    given_up = failed_runs.count([] if down else failed, made)

    if failed:
        raise ChromalabError(_failure_message(failed, len(slots), given_up, down))
    missing = Counter(split for (split, _), photo in zip(slots, chosen) if photo is None)
    if missing:
        totals = Counter(split for split, _ in slots)
        raise ChromalabError(
            "reserve exhausted: "
            + ", ".join(f"{missing[s]} of {totals[s]} {s} photos missing" for s in FETCHED_SPLITS if missing[s])
            + "; raise split.n_reserve"
        )

    down_streak.save(set())  # every slot is filled: a suspect not asked for now is none of this output's business
    failed_runs.clear()  # nor a photo that failed a run, then turned out gone: no slot asks for it
    selected = [(split, photo) for (split, _), photo in zip(slots, chosen)]
    remove_unselected(out_dir, {(split, photo.photo_id) for split, photo in selected})
    write_manifest(out_dir, selected, fetcher)
    listed = {photo.photo_id for photos in lists.values() for photo in photos}
    journal.rewrite_sorted(listed)
    summary = {
        **{split: len(lists[split]) for split in FETCHED_SPLITS},
        "fetched": stats["fetched"], "reused": stats["reused"],
        "rejected": len(journal.listed(listed)), "replaced_from_reserve": stats["replaced"],
    }
    tqdm.write(f"images: {summary}", file=sys.stderr)
    return summary


def _failure_message(failed: list[tuple[Photo, str]], n_slots: int, given_up: int = 0, down: bool = False) -> str:
    refused = [(photo, detail) for photo, detail in failed if REFUSED.match(detail)]
    not_tried = sum(detail == NOT_TRIED for _, detail in failed)
    photo, detail = (refused or [f for f in failed if f[1] != NOT_TRIED] or failed)[0]  # all: reserve checks failed
    # a refusal is the server's decision, which a re-run (at once) does not change
    why = (f"{len(refused)} of them refused (HTTP 401/403: the server blocks chromalab, or wants a sign-in; "
           "a re-run fetches them only once it lets chromalab in); " if refused else "")
    stopped = (f"{FAIL_FAST_STREAK} in a row gave no photo, so the server is taken to be down (what it answered "
               "meanwhile is not held against the photos)" + (f" and {not_tried} were not tried" if not_tried else "")
               + "; " if down else "")
    unreachable = (f"{given_up} of them have now failed in {MAX_FAILED_RUNS} runs, and the next run replaces them "
                   "from the reserve; " if given_up else "")
    return (f"{len(failed)} of {n_slots} photos could not be fetched (e.g. {photo.photo_id}: {detail}); "
            f"{why}{stopped}{unreachable}re-run the stage to fetch only what is missing")


def fill_slots(slots, reserve: deque[Photo], fetcher: PhotoFetcher, concurrency: int,
               suspects: frozenset[str] = frozenset()):
    """Obtain a photo for every (split, photo) slot; returns (photo per slot or None, failures, counts, Streak).

    Rounds: fetch all pending photos concurrently, then walk the outcomes *in slot order* and hand
    each rejected slot the next reserve photo. So which reserve photo replaces which depends only on
    the photos themselves, never on which thread finished first. Once FAIL_FAST_STREAK photos in a row gave
    none (failed or rejected, retries and all), the server is down or refusing: the rest are not tried, and
    the rejections since its last good photo are dropped (the Streak says whether it came to that). On
    `suspects` see Streak.
    """
    chosen: list[Photo | None] = [None] * len(slots)
    failed: list[tuple[Photo, str]] = []
    stats: Counter[str] = Counter()
    streak = Streak(fetcher.journal, server=not fetcher.from_folder, suspects=suspects)
    unreplaced: list[tuple[Photo, str]] = []  # rejected once the reserve ran out
    pending = [(index, photo) for index, (_, photo) in enumerate(slots)]
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="images")
    try:
        with tqdm(total=len(slots), unit="photo", desc="images") as bar:
            while pending:
                futures = _submit_round(pool, concurrency, fetcher,
                                        [(slots[index][0], photo) for index, photo in pending], reserve, streak)
                if futures is None:  # the server was taken to be down before the round began
                    failed.extend((photo, NOT_TRIED) for _, photo in pending)
                    break
                _await(futures, [photo for _, photo in pending], bar, stats, streak)
                replacements = []
                for (index, photo), future in zip(pending, futures):
                    if future.cancelled():
                        failed.append((photo, NOT_TRIED))
                        continue
                    outcome = future.result()
                    stats["fetched" if outcome.fetched else "reused"] += 1
                    if outcome.status == "ok":
                        chosen[index] = photo
                    elif outcome.status == "failed" or (streak.down and photo.photo_id in streak.dropped):
                        failed.append((photo, outcome.detail))
                    elif reserve:
                        replacements.append((index, reserve.popleft()))
                        stats["replaced"] += 1
                    else:
                        unreplaced.append((photo, outcome.detail))
                if streak.down:  # its replacements would fail alike
                    failed.extend((photo, NOT_TRIED) for _, photo in replacements)
                    replacements = []
                pending = replacements
        streak.end()
        for index, photo in enumerate(chosen):  # written before its twin came: failed alike, whichever came first
            if photo is not None and photo.photo_id in fetcher.unmade:
                chosen[index] = None
                failed.append((photo, PLACEHOLDER))
        failed.extend((photo, why) for photo, why in unreplaced if streak.down and photo.photo_id in streak.dropped)
    finally:  # on Ctrl-C, drop the queued fetches instead of finishing them
        pool.shutdown(wait=True, cancel_futures=True)
    return chosen, failed, stats, streak


def _submit_round(pool, concurrency: int, fetcher: PhotoFetcher, pending: list[tuple[str, Photo]],
                  reserve: deque[Photo], streak: Streak) -> list | None:
    """The futures of one round's (split, photo) fetches; None if the server is taken to be down first. A round
    with suspects, before any photo was fetched fine, first fetches reserve photos (no suspect, none twice;
    `concurrency` at a time) until one comes (a photo never asked for, so no cache can fake it, and likely a
    stand-in later) or the server is taken to be down: the other photos may all be on disk, and then the
    suspects would count and stop the run again."""
    if streak.server and not streak.shown_healthy and any(photo.photo_id in streak.suspects for _, photo in pending):
        skip = streak.suspects | streak.probed
        checks = [photo for photo in reserve if photo.photo_id not in skip]
        for start in range(0, len(checks), concurrency):
            batch = {pool.submit(fetcher.obtain, photo, pending[0][0]): photo
                     for photo in checks[start:start + concurrency]}
            streak.probed.update(photo.photo_id for photo in batch.values())
            for future in as_completed(batch):
                streak.add(batch[future].photo_id, future.result())
            if streak.down:
                return None
            if streak.shown_healthy:
                break
    return [pool.submit(fetcher.obtain, photo, split) for split, photo in pending]


def _await(futures, photos: list[Photo], bar: tqdm, stats: Counter, streak: Streak) -> None:
    """Wait for `futures` (for `photos`) as they finish, counting on `bar` and in `streak`; once the server is
    taken to be down, cancel those not started."""
    ids = {future: photo.photo_id for future, photo in zip(futures, photos)}
    for future in as_completed(futures):
        if future.cancelled():
            continue
        outcome = future.result()
        if outcome.status == "ok":
            bar.update()
        elif outcome.status == "rejected":
            stats["rejected"] += 1
            bar.set_postfix(rejected=stats["rejected"])
        if streak.add(ids[future], outcome):
            for waiting in futures:
                waiting.cancel()  # only those not yet running: the running ones finish


class Streak:
    """Photos in a row, in the order their answers came, that gave no photo: failed or rejected alike, for a
    server in trouble may answer 404 (or junk) to every photo. Their rejections stay held in the journal until
    a photo asked for after them and fetched fine shows the server healthy; once FAIL_FAST_STREAK in a row, it is taken to be down and
    the rejections since its last good photo are dropped (`dropped`), to be asked again by the next run.

    `suspects` are the photos of the streak that stopped the last run (DownStreak): 16 gone photos in a row look
    like a server down, and would stop every run. Once this run has had a photo fetched fine (_submit_round
    fetches reserve photos first), a suspect's answer counts toward no streak (it is set `aside`, its rejection
    held as any other's); before, it counts, so a server still down stops the run again."""

    def __init__(self, journal: RejectionJournal, server: bool = True, suspects: frozenset[str] = frozenset()):
        self.journal = journal
        self.server = server  # a folder has none to be down: 16 gray photos in a row are 16 gray photos
        self.suspects = suspects
        self.shown_healthy = False  # a photo was fetched fine in this run
        self.probed: set[str] = set()  # reserve photos fetched to check the server is up (_submit_round)
        self.since_good: list[tuple[str, float]] = []  # (photo id, when counted) since the last photo fetched fine
        self.aside: list[tuple[str, float]] = []  # the same for suspects judged alone, counting toward no streak
        self.down = False
        self.dropped: set[str] = set()

    def add(self, photo_id: str, outcome: Outcome) -> bool:
        """Count one outcome; True the moment the server is taken to be down."""
        if not outcome.fetched:  # settled before (on disk, in the journal): says nothing of the server
            return False
        if self.down:  # one that was running when the server was taken to be down
            if outcome.status == "rejected":
                self.dropped.add(photo_id)
            return False
        if outcome.status == "ok":
            self.shown_healthy = True
            # only what was answered before this photo was asked for: a photo asked for before an outage began
            # may land after some of its 404s, which it shows nothing about
            self.journal.commit([photo_id for photo_id, counted in self.since_good + self.aside
                                 if counted < outcome.asked_at])
            self.since_good, self.aside = ([(photo_id, counted) for photo_id, counted in held
                                            if counted >= outcome.asked_at] for held in (self.since_good, self.aside))
            return False
        alone = photo_id in self.suspects and self.shown_healthy
        (self.aside if alone else self.since_good).append((photo_id, time.monotonic()))
        if len(self.since_good) < FAIL_FAST_STREAK or not self.server:
            return False
        self.down, self.dropped = True, {photo_id for photo_id, _ in self.since_good + self.aside}
        return True

    def end(self) -> None:
        """At the run's end: what is still held is written, unless the server was taken to be down."""
        if self.down:
            self.journal.drop_held()
        else:
            self.journal.commit(None)


class PhotoFetcher:
    """Turns one listed photo into out_dir/<split>/<photo_id>.jpg, or says why not. Thread-safe."""

    def __init__(self, params: Params, out_dir: Path, journal: RejectionJournal, failed_runs: FailedRuns):
        ip = params.images
        self.size = params.base.image_size
        self.quality = ip.jpeg_quality
        self.min_chroma = ip.min_chroma
        self.retries = ip.retries
        self.from_folder = params.data.source == "folder"
        self.out_dir = out_dir
        self.journal = journal
        self.failed_runs = failed_runs
        # urllib3 retries what fails before an answer (connection, status); a body cut short, stalled or
        # dripping past the deadline is retried in `read`, as many times.
        self.deadline_s = PHOTO_DEADLINE_READS * ip.timeout_s
        # A Retry-After up to one deadline: a photo's tries then fit its budget ((retries + 1) deadlines), where
        # 5-minute waits held each worker up to 25 min per photo; a photo still refused is tried on the next run.
        retry = retry_policy(ip.retries, BACKOFF_FACTOR_S, retry_after_max_s=self.deadline_s, backoff_max=BACKOFF_MAX_S)
        self.unusable: dict[str, str] = {}  # SHA-256 of bytes no photo (undecodable, gray) → first to get them
        self.shared_junk: set[str] = set()  # … and those that came for more than one
        self.unusable_lock = threading.Lock()
        self.big_decodes = threading.BoundedSemaphore(BIG_DECODES)
        self.made = self._index_made()  # pixels_digest of a fetched photo → its id (see _write_unless_placeholder)
        self.made_lock = threading.Lock()
        self.unmade: set[str] = set()  # photos this run took for a placeholder after they were written
        self.http = with_headers_deadline(urllib3.PoolManager(
            maxsize=ip.concurrency, retries=retry, timeout=urllib3.Timeout(connect=ip.timeout_s, read=ip.timeout_s),
            headers={"User-Agent": USER_AGENT},
        ), self.deadline_s)

    def source(self, photo: Photo) -> str:
        return photo.image_url if self.from_folder else sized_url(photo.image_url, self.size, self.quality)

    def obtain(self, photo: Photo, split: str) -> Outcome:
        target = self.out_dir / split / f"{photo.photo_id}.jpg"
        if self._made_from_this(target, photo):
            return Outcome("ok")
        for other in FETCHED_SPLITS:  # a param change may move a photo to another split (e.g. reserve → val)
            elsewhere = self.out_dir / other / target.name
            if other != split and self._made_from_this(elsewhere, photo):
                os.replace(elsewhere, target)
                return Outcome("ok")
        # A file of your folder may have been replaced since its verdict, and reading it again costs little.
        known = None if self.from_folder else self.journal.reason(photo.photo_id)
        if known is None and self.failed_runs.given_up(photo.photo_id):
            known = f"unreachable (could not be fetched in {MAX_FAILED_RUNS} runs, each after its retries)"
        if known is not None:
            self.journal.record(photo.photo_id, split, known)  # no-op unless meant for another split now
            return Outcome("rejected", known)
        source_time = self._source_time(photo)  # before reading: a file replaced meanwhile is read again next run
        asked_at = time.monotonic()
        try:
            jpeg = self.fetched_jpeg(photo)
            asked_at = asked_at if self.from_folder else try_started()  # the try that got it
        except Rejected as exc:
            with self.unusable_lock:  # atomic with _refuse_shared_junk taking a rejection back
                if getattr(exc, "digest", None) in self.shared_junk:
                    return Outcome("failed", SHARED_JUNK, fetched=True)
                # a verdict on the bytes is written at the run's end, when no other photo can have been sent the
                # same ones (the digests are in memory: a kill must not split the verdicts); others once the server
                # shows itself healthy
                self.journal.hold(photo.photo_id, split, str(exc), until_end=hasattr(exc, "digest"))
            return Outcome("rejected", str(exc), fetched=True)
        except FetchFailed as exc:
            return Outcome("failed", str(exc), fetched=True)
        if self.from_folder:  # your own copies of a photo were left out by the split stage
            write_bytes_atomic(target, jpeg)
        elif not self._write_unless_placeholder(photo.photo_id, jpeg, target):
            return Outcome("failed", PLACEHOLDER, fetched=True)
        if source_time is not None:  # stamped with its source's time, by which _made_from_this knows the source
            os.utime(target, ns=(time.time_ns(), source_time))
            self.journal.forget(photo.photo_id)  # a file rejected before, since replaced
        return Outcome("ok", fetched=True, asked_at=asked_at)

    def _write_unless_placeholder(self, photo_id: str, jpeg: bytes, target: Path) -> bool:
        """Write `jpeg`, unless another photo came as the same picture: two photos are never one, the server sent
        a placeholder. Then neither is kept (the other's file goes, so the next run asks for it again)."""
        digest = pixels_digest(jpeg)
        with self.made_lock:  # the check and the write at once: two photos may come as the same picture together
            first = self.made.setdefault(digest, photo_id)
            if first != photo_id:
                self._unmake(first)
                self.unmade.add(first)
                return False
            write_bytes_atomic(target, jpeg)
            return True

    def _unmake(self, photo_id: str) -> None:
        for split in FETCHED_SPLITS:
            (self.out_dir / split / f"{photo_id}.jpg").unlink(missing_ok=True)

    def _index_made(self) -> dict[str, str]:
        """pixels_digest → photo id of the fetched photos on disk (a killed run's too, so that a placeholder it
        kept is found all the same); those that are the same picture as another are a placeholder: removed."""
        made: dict[str, list[str]] = {}
        for split in [] if self.from_folder else FETCHED_SPLITS:
            for path in (self.out_dir / split).glob("*.jpg"):
                made.setdefault(pixels_digest(path.read_bytes()), []).append(path.stem)
        for photo_ids in made.values():
            for photo_id in photo_ids if len(photo_ids) > 1 else []:
                self._unmake(photo_id)
        return {digest: photo_ids[0] for digest, photo_ids in made.items()}

    def _made_from_this(self, made: Path, photo: Photo) -> bool:
        """Whether `made` exists and, for your folder's photos, was made from the file there now: a file
        replaced under the same name, or another folder repeating the first's names (IMG_0001.jpg), has another
        modification time."""
        if not self.from_folder:
            return made.exists()
        try:
            return made.stat().st_mtime_ns == self._source_time(photo)
        except OSError:
            return False

    def _source_time(self, photo: Photo) -> int | None:
        """The modification time (ns) of your folder's file; None for a fetched photo or a file gone."""
        if not self.from_folder:
            return None
        try:
            return Path(photo.image_url).stat().st_mtime_ns
        except OSError:
            return None

    def fetched_jpeg(self, photo: Photo) -> bytes:
        """checked_jpeg of the photo's bytes. A fetched photo that does not decode is fetched once more: a body
        cut short with no size to tell, or a mislabelled answer, is the network's fault and must not become a
        lasting rejection. Only the same sized bytes twice, which no other photo was sent, are the photo's."""
        answer = self.read(photo)
        try:
            return self._checked_fetch(photo, answer.data)
        except Corrupt:
            if self.from_folder:
                raise
        again = self.read(photo)
        try:
            return self._checked_fetch(photo, again.data)
        except Corrupt as exc:
            if not (answer.sized and again.sized) or again.data != answer.data:
                raise FetchFailed(f"{exc}, in two different or unsized answers: cut short?") from None
            exc.digest = self._refuse_shared_junk(photo.photo_id, again.data)
            raise

    def _checked_fetch(self, photo: Photo, data: bytes) -> bytes:
        """checked_jpeg, whose verdict on a fetched picture (gray, too small, too large) carries its digest: the
        server's placeholder if another photo was sent the same bytes."""
        try:
            return self.checked_jpeg(data)
        except Corrupt:
            raise
        except Rejected as exc:
            if not self.from_folder:
                exc.digest = self._refuse_shared_junk(photo.photo_id, data)
            raise

    def _refuse_shared_junk(self, photo_id: str, data: bytes) -> str:
        """The digest of `data`, which is no photo to keep (undecodable, gray, too small): unless another photo
        was sent the same bytes, which are then the server's (an outage's error body labelled as a JPEG, a gray
        "not available" picture), not either photo's: the other photo's rejection is taken back, and this one is
        a failure to retry."""
        digest = hashlib.sha256(data).hexdigest()
        with self.unusable_lock:
            first = self.unusable.setdefault(digest, photo_id)
            if first == photo_id:
                return digest
            self.shared_junk.add(digest)
            self.journal.forget(first)
        raise FetchFailed(SHARED_JUNK)

    def read(self, photo: Photo) -> Answer:
        if self.from_folder:
            try:
                return Answer(Path(photo.image_url).read_bytes(), sized=True)
            except FileNotFoundError:
                raise Rejected(f"{GONE} (file no longer exists)") from None
            except OSError as exc:
                raise FetchFailed(f"cannot read {photo.image_url}: {exc.strerror}") from None
        # Each fetch may itself have been retried by urllib3 (a head dripped past its deadline): without a bound
        # on the whole, a server mixing slow heads and slow bodies holds a photo for (retries + 1)² deadlines.
        budget_s = (self.retries + 1) * self.deadline_s
        give_up_at = time.monotonic() + budget_s
        for attempt in range(self.retries + 1):
            if attempt:
                if time.monotonic() >= give_up_at:
                    raise FetchFailed(f"{broken}, and no whole photo in {budget_s:g} s over {attempt} tries")
                time.sleep(min(BACKOFF_MAX_S, BACKOFF_FACTOR_S * 2 ** attempt))
            try:
                return self._fetch(self.source(photo))
            except _BodyBroken as exc:
                broken = exc
        raise FetchFailed(f"{broken} after {self.retries} retries")

    def _fetch(self, url: str) -> Answer:
        """One GET (urllib3 retrying what fails before the answer), its body read whole within the deadline."""
        try:
            response = self.http.request("GET", url, preload_content=False)
            started = try_started()  # of the try that got this answer (urllib3 may have made several)
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, urllib3.exceptions.ResponseError) and "redirect" in str(exc.reason):
                raise FetchFailed(TOO_MANY_REDIRECTS) from None
            raise FetchFailed(f"{transport_failure(exc.reason)} after {self.retries} retries") from None
        except urllib3.exceptions.HTTPError as exc:
            raise FetchFailed(transport_failure(exc)) from None
        whole = False
        try:
            if response.status in GONE_STATUSES:
                raise Rejected(f"{GONE} (HTTP {response.status})")
            if response.status != 200:
                retried = f" after {self.retries} retries" if response.status in RETRY_STATUSES else ""
                raise FetchFailed(f"HTTP {response.status}{retried}")
            page = content_type(response.headers)
            if page.startswith(PAGE_TYPES):  # a sign-in, block or error page says nothing about the photo itself
                raise FetchFailed(f"HTTP 200 with a {page} page instead of a photo (blocked or rate limited?)")
            data, whole = self._body(response, started + self.deadline_s), True
            if not data:
                raise _BodyBroken("an empty answer")
            if data.lstrip()[:1] in (b"<", b"{"):  # the same page, labelled as the photo (a captive portal)
                raise FetchFailed(f"HTTP 200 with a page labelled {page or 'as nothing'} instead of a photo "
                                  "(blocked or rate limited?)")
            if signature_format(data) is None:  # an error body, which may name the request: not the photo's fault
                raise _BodyBroken(f"HTTP 200 with no image in it ({data[:24]!r}…)")
            # a body whose end is only the connection's could have been cut short anywhere
            return Answer(data, sized=response.headers.get("Content-Length") is not None or response.chunked)
        finally:  # a connection whose answer was not read to the end cannot serve the next request
            if not whole:
                response.close()
            response.release_conn()

    def _body(self, response, deadline: float) -> bytes:
        chunks, received = [], 0
        try:
            while chunk := response.read1(1 << 16):  # what has arrived: `stream` would wait for 64 KiB
                chunks.append(chunk)
                received += len(chunk)
                if received > MAX_PHOTO_BYTES:
                    raise FetchFailed(f"the answer runs past {MAX_PHOTO_BYTES >> 20} MB: not a photo of this size")
                if time.monotonic() > deadline:
                    raise _BodyBroken(f"too slow ({received:,} bytes in {self.deadline_s:g} s)")
        except urllib3.exceptions.HTTPError as exc:  # cut short (IncompleteRead), a read timing out mid-body
            raise _BodyBroken(type(exc).__name__) from None
        return b"".join(chunks)

    def checked_jpeg(self, data: bytes) -> bytes:
        """The photo as an RGB size×size JPEG, if it decodes in full and has colour."""
        size = (self.size, self.size)
        try:
            with Image.open(io.BytesIO(data)) as image:
                as_served = (
                    not self.from_folder and image.format == "JPEG" and image.mode == "RGB" and image.size == size
                    and image.getexif().get(ExifTags.Base.Orientation, 1) == 1
                    and len(data) <= 3 * self.size ** 2 + AS_SERVED_SLACK_BYTES
                )
                self._check_size(image)
                if image.format == "JPEG" and min(image.size) > self.size:
                    image.draft("RGB", size)  # decode big JPEGs at a reduced scale (still >= size): much faster
                big = image.size[0] * image.size[1] > BIG_DECODE_PIXELS
                with self.big_decodes if big else contextlib.nullcontext():
                    image.load()  # full decode: a truncated or corrupt file fails here, not in a later stage
                    if not self.from_folder and ends_blank(image):  # a server's answer, not your own photo
                        raise Corrupt("corrupt (the JPEG ends early: its last blocks are blank)")
                    # kept byte for byte only where its colours are sRGB's already (no profile, or sRGB's)
                    as_served = as_served and in_srgb(image) is image
                    rgb = image if as_served else square_rgb(image, self.size)
                    chroma = mean_chroma(np.asarray(rgb))
        except Image.UnidentifiedImageError:
            raise Corrupt("corrupt (not an image file)") from None
        except Image.DecompressionBombError:  # Pillow refuses to open it: nothing is wrong with the photo
            raise Rejected(f"too large (over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, Pillow's limit "
                           "against decompression bombs)") from None
        # Pillow's decoders and EXIF reader raise more than OSError on hostile bytes (struct.error from a
        # mistyped EXIF tag, for one); a bug of ours (or MemoryError) must not become a lasting rejection.
        except READ_ERRORS as exc:
            if decoder_starved(exc, data[:32], len(data)):
                raise FetchFailed("not enough memory to decode it: lower images.concurrency, or free memory") from None
            raise Corrupt(f"corrupt ({(str(exc).splitlines() or [''])[0][:80] or type(exc).__name__})") from None
        if chroma < self.min_chroma:
            raise Rejected(f"gray (mean chroma {chroma:.2f} < images.min_chroma {self.min_chroma:g})")
        if as_served:  # already what we want: re-encoding would only lose quality
            return data
        buffer = io.BytesIO()
        rgb.save(buffer, "JPEG", quality=self.quality)
        return buffer.getvalue()


    def _check_size(self, image: Image.Image) -> None:
        """A placeholder for the size×size photo asked for (a pixel scaled up is one flat colour), or a photo
        Pillow would decode whole into gigabytes (only JPEG decodes at a reduced scale), is no photo to learn
        from. Your own photos may be small: scaling them up is what image_size asks for."""
        width, height = image.size
        if not self.from_folder and 2 * min(width, height) < self.size:
            raise Rejected(f"too small ({width}×{height}, under half of {self.size}×{self.size})")
        if image.format != "JPEG" and width * height > Image.MAX_IMAGE_PIXELS:
            raise Rejected(f"too large ({width}×{height} pixels; decoded whole it would take gigabytes)")
        if not self.from_folder and width * height > max(FETCHED_OVERSIZE * self.size ** 2, FETCHED_MAX_PIXELS):
            raise Rejected(f"too large ({width}×{height} pixels for a {self.size}×{self.size} photo: not the "
                           "photo asked for)")


def pixels_digest(jpeg: bytes) -> str:
    """SHA-256 of the picture a JPEG decodes to: a JPEG kept as served carries the server's metadata (a comment,
    EXIF naming the photo id), which must not make one placeholder look like many photos."""
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            return hashlib.sha256(repr(image.size).encode() + image.convert("RGB").tobytes()).hexdigest()
    except READ_ERRORS:  # a file on disk changed under us: its bytes are all there is to compare
        return hashlib.sha256(jpeg).hexdigest()


def ends_blank(image: Image.Image) -> bool:
    """Whether a decoded JPEG was cut short: libjpeg decodes the blocks a file ended (by an end-of-image marker)
    before sending as blank, exactly mid-gray, and warns only; they run to the last, bottom-right, block. A
    photo's last block is never one exact value."""
    if image.format != "JPEG" or image.mode not in ("L", "RGB"):
        return False
    width, height = image.size
    return bool((np.asarray(image.crop((max(width - 8, 0), max(height - 8, 0), width, height))) == 128).all())


def square_rgb(image: Image.Image, size: int) -> Image.Image:
    """Upright (EXIF), sRGB (from its colour profile), RGB (transparency over white, as a browser shows it),
    centre-cropped to size×size."""
    image = over_white(in_srgb(upright(image)))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    return image


def sized_url(image_url: str, size: int, quality: int) -> str:
    """The dynamic image URL for a size×size JPEG; keeps the URL's own query parameters."""
    parts = urlsplit(image_url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(w=str(size), h=str(size), fit="crop", crop="faces,entropy", fm="jpg", q=str(quality))
    return urlunsplit(parts._replace(query=urlencode(query, safe=",")))


class FailedRuns:
    """failed_runs.json: in how many runs each photo could not be fetched (each time after its retries). A
    photo that fails MAX_FAILED_RUNS runs is given up: one the server never sends (always 500, 403 or a page)
    would otherwise stop every run of the stage."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.runs: dict[str, int] = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError, TypeError):  # none yet, or cut short by a kill: start counting
            self.runs = {}

    def given_up(self, photo_id: str) -> bool:
        return self.runs.get(photo_id, 0) >= MAX_FAILED_RUNS

    def count(self, failed: list[tuple[Photo, str]], fetched: list[Photo]) -> int:
        """Count this run's failures, unless it stopped early (the server down: no photo's fault), forget those
        fetched now, save; returns how many photos this run gave up on."""
        if any(detail == NOT_TRIED for _, detail in failed):
            failed = []
        now, fetched_ids = {photo.photo_id for photo, _ in failed}, {photo.photo_id for photo in fetched}
        # those fetched now need no count, nor those given up before (rejected.csv has them now)
        self.runs = {photo_id: n for photo_id, n in self.runs.items()
                     if photo_id not in fetched_ids and (photo_id in now or not self.given_up(photo_id))}
        for photo_id in now:
            self.runs[photo_id] = self.runs.get(photo_id, 0) + 1
        _save_json(self.path, self.runs)
        return sum(self.given_up(photo.photo_id) for photo, _ in failed)

    def clear(self) -> None:
        self.runs = {}
        _save_json(self.path, self.runs)


class DownStreak:
    """down_streak.json: the photos of the streak that made a run take the server to be down, until each is
    fetched or its rejection written: the next run's suspects (Streak)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.photos = frozenset(str(photo_id) for photo_id in json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):  # none (no run was stopped), or cut short by a kill
            self.photos = frozenset()

    def save(self, photos: set[str]) -> None:
        _save_json(self.path, sorted(photos))


def _save_json(path: Path, data: dict | list) -> None:
    """`data` as JSON at `path`, written atomically; none removes the file (a stage that completes leaves nothing
    to count or suspect in its output)."""
    if data:
        write_text_atomic(path, json.dumps(data, sort_keys=True) + "\n")
    else:
        path.unlink(missing_ok=True)


class RejectionJournal:
    """rejected.csv, appended as rejections are settled, so a re-run never asks for a gone photo again."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.RLock()  # `forget` rewrites under it
        self.rows: dict[str, tuple[str, str]] = {}  # photo_id → (split, reason); the last line wins
        self.held: dict[str, tuple[str, str, bool]] = {}  # rejections not yet settled (see Streak): …, until_end
        if path.exists():
            with path.open(newline="", encoding="utf-8") as f:
                for row in csv.reader(f):
                    # A run killed mid-line leaves a short last line: skip it, that photo is asked again.
                    if len(row) == len(REJECTED_FIELDS) and row[0] != REJECTED_FIELDS[0] and row[2]:
                        self.rows[row[0]] = (row[1], row[2])
        self.rewrite_sorted(None)  # drops such a short line, so that appended lines start on their own

    def reason(self, photo_id: str) -> str | None:
        with self.lock:
            entry = self.rows.get(photo_id)
        return entry[1] if entry else None

    def record(self, photo_id: str, split: str, reason: str) -> None:
        with self.lock:
            if self.rows.get(photo_id) == (split, reason):
                return
            self.rows[photo_id] = (split, reason)
            line = io.StringIO()
            csv.writer(line, lineterminator="\n").writerow((photo_id, split, reason))
            with self.path.open("a", encoding="utf-8", newline="") as f:
                f.write(line.getvalue())  # one small write: a kill leaves the line whole or short

    def hold(self, photo_id: str, split: str, reason: str, until_end: bool = False) -> None:
        with self.lock:
            self.held[photo_id] = (split, reason, until_end)

    def commit(self, photo_ids: list[str] | None) -> None:
        """Write the held rejections of `photo_ids` that are still held, but those held until the run's end;
        None: all (at the run's end)."""
        with self.lock:
            for photo_id in list(self.held) if photo_ids is None else photo_ids:
                if photo_id in self.held and (photo_ids is None or not self.held[photo_id][2]):
                    split, reason, _ = self.held.pop(photo_id)
                    self.record(photo_id, split, reason)

    def drop_held(self) -> None:
        with self.lock:
            self.held.clear()

    def forget(self, photo_id: str) -> None:
        """Take a rejection back: the photo is asked for again by the next run."""
        with self.lock:
            self.held.pop(photo_id, None)
            if photo_id in self.rows:
                self.rewrite_sorted(set(self.rows) - {photo_id})

    def listed(self, photo_ids: set[str] | None) -> dict[str, tuple[str, str]]:
        return {pid: entry for pid, entry in self.rows.items() if photo_ids is None or pid in photo_ids}

    def rewrite_sorted(self, photo_ids: set[str] | None) -> None:
        """Rewrite atomically, sorted by split then id, keeping only `photo_ids` (None: all)."""
        with self.lock:
            rows = sorted(((split, pid, reason) for pid, (split, reason) in self.listed(photo_ids).items()))
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(REJECTED_FIELDS)
            writer.writerows((pid, split, reason) for split, pid, reason in rows)
            write_text_atomic(self.path, text.getvalue())
            self.rows = {pid: (split, reason) for split, pid, reason in rows}


def fetch_settings(params: Params) -> dict:
    ip = params.images
    return {"source": params.data.source, "image_size": params.base.image_size,
            "jpeg_quality": ip.jpeg_quality, "min_chroma": ip.min_chroma}


def prepare_out_dir(out_dir: Path, settings: dict) -> None:
    """Keep what a previous run made with the same settings; drop temp files and the stale manifest."""
    settings_path = out_dir / SETTINGS_FILE
    previous = json.loads(settings_path.read_text()) if settings_path.is_file() else None
    if previous is not None and previous != settings:
        tqdm.write(f"images: settings changed ({previous} -> {settings}); fetching again", file=sys.stderr)
        for split in FETCHED_SPLITS:
            shutil.rmtree(out_dir / split, ignore_errors=True)
        journal = RejectionJournal(out_dir / "rejected.csv")
        journal.rewrite_sorted({pid for pid, (_, why) in journal.rows.items() if why.startswith(GONE)})
    for split in FETCHED_SPLITS:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, *(out_dir / split for split in FETCHED_SPLITS)):  # a killed run's half-written files
        clear_stale_temps(folder)
    # Until this run completes, out_dir must not look complete to the next stage.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    write_text_atomic(settings_path, json.dumps(settings, sort_keys=True) + "\n")


def read_split_list(path: Path) -> list[Photo]:
    if not path.is_file():
        raise ChromalabError(f"{path} not found; run the split stage first (`dvc repro split`)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != SPLIT_FIELDS:
            raise ChromalabError(f"{path}: expected columns {','.join(SPLIT_FIELDS)}; re-run the split stage")
        photos = [Photo(row["photo_id"], row["image_url"]) for row in reader]
    bad = next((p.photo_id for p in photos if not SAFE_PHOTO_ID.match(p.photo_id)), None)
    if bad is not None:
        raise ChromalabError(f"{path}: photo_id {bad!r} is not a safe file name; re-run the split stage")
    return photos


def remove_unselected(out_dir: Path, keep: set[tuple[str, str]]) -> None:
    """After a param change, files of photos no longer selected must not reach the next stage."""
    for split in FETCHED_SPLITS:
        for path in (out_dir / split).iterdir():
            if (split, path.stem) not in keep or path.suffix != ".jpg":
                path.unlink()


def write_manifest(out_dir: Path, selected: list[tuple[str, Photo]], fetcher: PhotoFetcher) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    for split, photo in sorted(selected, key=lambda item: (item[0], item[1].photo_id)):
        file = f"{split}/{photo.photo_id}.jpg"
        sha = hashlib.sha256((out_dir / file).read_bytes()).hexdigest()
        writer.writerow((photo.photo_id, split, file, sha, fetcher.source(photo)))
    write_text_atomic(out_dir / MANIFEST, text.getvalue())
