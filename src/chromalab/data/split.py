"""Stage `split`: choose the photos of people (or the photos of your folder) → train / test / val / reserve.

Unsplash: a photo is a candidate when one of its keywords is in split.include_keywords with an AI
confidence >= split.min_confidence on either tagger, or was suggested by a person; photos tagged or
captioned as black-and-white (or "no people") are left out. The candidates, sorted by id, are
shuffled with base.seed and cut, in this order, into n_train, n_test, n_val (what training validates
on and chooses its exported checkpoint by) and n_reserve (stand-ins for photos that turn out gone or gray
in the images stage). val comes after test, so adding or resizing it never changes train or test.
Rows the images stage could not use (an id too long or unsafe for a file name, an image URL that is no http(s)
URL with a host) and further ids of an image URL already in are left out and counted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from tqdm import tqdm
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from chromalab.config import Params, SplitParams
from chromalab.data.formats import REQUIRED_COLUMNS, SAFE_PHOTO_ID, SPLIT_FIELDS, SPLITS, open_table
from chromalab.files import PHOTO_SUFFIXES, folder_photos, is_colorize_output, staged_dir
from chromalab.errors import ChromalabError

# Captions that contradict the keywords or describe a photo that teaches gray.
CAPTION_EXCLUDE = re.compile(r"\b(?:no people|black[- ]and[- ]white|monochrome|gr[ae]yscale)\b", re.IGNORECASE)


class Candidate(NamedTuple):
    photo_id: str
    image_url: str  # a URL, or an absolute file path for the folder source
    reason: str


def run_split(params: Params, raw_dir: Path = Path("data/raw"), out_dir: Path = Path("data/split")) -> dict:
    """Write train.csv, test.csv, val.csv, reserve.csv and summary.json into out_dir; returns the summary."""
    sp = params.split
    if params.data.source == "folder":
        candidates, left_out = folder_candidates(params.data.folder)
        what, more = f"photos in {params.data.folder}", f"add photos to {params.data.folder}"
    else:
        candidates, left_out = people_candidates(Path(raw_dir), sp)
        what, more = "candidate photos of people", "widen split.include_keywords / lower split.min_confidence"
    tqdm.write(
        f"split: {len(candidates):,} {what}"
        + (f" (left out: {', '.join(f'{n:,} {why}' for why, n in left_out.items())})" if left_out else ""),
        file=sys.stderr,
    )

    splits = split_candidates(candidates, params.base.seed, sp, more)
    summary = {
        "source": params.data.source,
        "candidates": len(candidates),
        "left_out": left_out,
        "counts": {name: len(rows) for name, rows in splits.items()},
        "reserve_shortfall": sp.n_reserve - len(splits["reserve"]),
        "params": {"seed": params.base.seed, "folder": params.data.folder, **sp.model_dump(mode="json")},
    }
    if summary["reserve_shortfall"]:
        tqdm.write(
            f"split: only {len(splits['reserve'])} reserve photos (split.n_reserve is {sp.n_reserve}); "
            "the images stage fails if more photos than that turn out gone or gray",
            file=sys.stderr,
        )
    with staged_dir(Path(out_dir)) as tmp:
        for name, rows in splits.items():
            with (tmp / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(SPLIT_FIELDS)
                writer.writerows(rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def split_candidates(candidates: list[Candidate], seed: int, sp: SplitParams,
                     more: str) -> dict[str, list[Candidate]]:
    """Seeded shuffle of the id-sorted candidates, cut in SPLITS order: a bigger n_val or n_reserve never
    changes train or test (val is carved from what would have been the reserve). Too few: a one-line error
    whose fix ends with `more` (the source's own way to find more)."""
    needed = sp.n_train + sp.n_test + sp.n_val
    if len(candidates) < needed:
        raise ChromalabError(
            f"only {len(candidates)} candidate photos found, {needed} needed "
            f"(split.n_train {sp.n_train} + split.n_test {sp.n_test} + split.n_val {sp.n_val}); lower them, or {more}"
        )
    ordered = sorted(candidates)
    random.Random(seed).shuffle(ordered)
    cuts = (0, sp.n_train, sp.n_train + sp.n_test, needed, needed + sp.n_reserve)
    return {name: ordered[start:stop] for name, start, stop in zip(SPLITS, cuts, cuts[1:])}


# ------------------------------------------------------------------------------------------- Unsplash


def people_candidates(raw_dir: Path, sp: SplitParams) -> tuple[list[Candidate], dict[str, int]]:
    """Photos with a person keyword confirmed by a tagger or a person; returns (candidates, left-out counts)."""
    include = {normalise_keyword(k) for k in sp.include_keywords}
    exclude = {normalise_keyword(k) for k in sp.exclude_keywords}
    if not include:
        raise ChromalabError("split.include_keywords is empty; list the keywords that mean a person is in the photo")

    best: dict[str, tuple[float, str]] = {}  # photo_id → (score, reason); a person's suggestion scores -1
    black_and_white: set[str] = set()
    for row in read_table(raw_dir / "keywords.tsv", REQUIRED_COLUMNS["keywords"]):
        photo_id, keyword = row["photo_id"], normalise_keyword(row["keyword"])
        if keyword in exclude:
            black_and_white.add(photo_id)
            continue
        if keyword not in include:
            continue
        confidences = [c for c in map(_confidence, (row["ai_service_1_confidence"], row["ai_service_2_confidence"]))
                       if c is not None]
        if confidences and max(confidences) >= sp.min_confidence:
            score, reason = max(confidences), f"keyword={keyword} conf={max(confidences):.1f}"
        elif (row["suggested_by_user"] or "").strip().lower() == "t":
            score, reason = -1.0, f"keyword={keyword} user"
        else:
            continue
        if photo_id not in best or score > best[photo_id][0]:
            best[photo_id] = (score, reason)

    left_out: Counter[str] = Counter()
    candidates: list[Candidate] = []
    seen: set[str] = set()
    urls: set[str] = set()
    for row in read_table(raw_dir / "photos.tsv", REQUIRED_COLUMNS["photos"]):
        photo_id = row["photo_id"]
        if photo_id not in best or photo_id in seen:
            continue
        seen.add(photo_id)
        caption = f"{row.get('photo_description') or ''} {row.get('ai_description') or ''}"
        url = (row["photo_image_url"] or "").strip()
        if not _usable_url(url) or not SAFE_PHOTO_ID.match(photo_id):
            left_out["no usable id or image URL"] += 1
            continue
        if url in urls:  # one photo under two ids could land in train and test: the first id keeps it
            left_out["image URL of another photo id"] += 1
            continue
        urls.add(url)
        if photo_id in black_and_white:
            left_out["black-and-white keyword"] += 1
        elif CAPTION_EXCLUDE.search(caption):
            left_out["caption says no people / black-and-white"] += 1
        else:
            candidates.append(Candidate(photo_id, url, best[photo_id][1]))
    return candidates, dict(left_out)


def _usable_url(url: str) -> bool:
    """An http(s) URL with a host that the images stage can fetch (a malformed one would stop it there)."""
    try:
        parts = urlsplit(url)
        if not (parts.scheme in ("http", "https") and parts.hostname and (parts.port or 0) >= 0):
            return False
        # as urllib3 reads the host when it connects: no spaces, each label 1 to 63 characters
        parse_url(url).host.encode("idna")
        return True
    except (ValueError, LocationParseError):  # an unclosed '[' of an IPv6 host, a port that is no number, …
        return False


def normalise_keyword(keyword: str | None) -> str:
    """Case- and whitespace-insensitive form: ' Black  and White' → 'black and white'."""
    return " ".join((keyword or "").lower().split())


def _confidence(text: str | None) -> float | None:
    """A tagger's confidence, or None where it names none: blank, no number, or not finite (NaN would compare
    false with every other confidence, and "inf" is no confidence a tagger gives)."""
    try:
        value = float(text) if text and text.strip() else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_table(path: Path, columns: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Rows of a table the download stage wrote, checking its columns; a broken row is a one-line error."""
    if not path.is_file():
        raise ChromalabError(f"{path} not found; run the download stage first (`dvc repro download`)")
    f, reader = open_table(path)
    with f:
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise ChromalabError(f"{path}: no column(s) {', '.join(missing)}; re-run the download stage")
        try:
            yield from reader
        except csv.Error as exc:
            raise ChromalabError(f"{path}: unreadable TSV at line {reader.line_num} ({exc})") from None


# --------------------------------------------------------------------------------------------- folder


def folder_candidates(folder: str) -> tuple[list[Candidate], dict[str, int]]:
    """Every photo under `folder` (recursively, hidden files skipped), with an id stable across machines, and
    how many were left out and why: copies of a photo already in (one photo in train and test would score
    training), colorize's own outputs (they teach its colours back), unreadable files and names not UTF-8."""
    if not folder:
        raise ChromalabError("data.source is 'folder' but data.folder is empty; set data.folder to a folder of photos")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ChromalabError(f"data.folder: {root} is not a folder; set data.folder to a folder of photos")
    root = root.resolve()
    paths = folder_photos(root)
    candidates, contents, left_out = [], set(), Counter()
    for path in tqdm(paths, desc="split: reading the folder", unit="photo", disable=len(paths) < 2000):
        why, content = _left_out_reason(path, contents)
        if why:
            left_out[why] += 1
            continue
        contents.add(content)
        candidates.append(Candidate(folder_photo_id(path.relative_to(root)), str(path), "folder"))
    if not candidates:
        raise ChromalabError(
            f"data.folder: no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) under {root}; add some or fix the path"
        )
    return candidates, dict(left_out)


def _left_out_reason(path: Path, contents: set[bytes]) -> tuple[str | None, bytes]:
    """(why `path` is left out, or None; the digest of its bytes)."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        return "names not UTF-8 (rename them)", b""
    try:
        with path.open("rb") as f:
            content = hashlib.file_digest(f, "sha256").digest()
    except OSError:
        return "unreadable files", b""
    if content in contents:
        return "copies of a photo already in", content
    if is_colorize_output(path):
        return "written by chromalab colorize", content
    return None, content


def folder_photo_id(relative: Path) -> str:
    """'Trip 2024/IMG_001.JPG' → 'trip-2024-img-001-<8 hex of the path>': readable, unique, a safe file name.
    The path is hashed in Unicode's composed form (NFC): macOS stores 'é' decomposed, so a copied folder would
    otherwise get other ids, and another split."""
    name = unicodedata.normalize("NFC", relative.as_posix())
    slug = re.sub(r"[^a-z0-9]+", "-", name[: -len(relative.suffix) or None].lower()).strip("-")[:48] or "photo"
    return f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
