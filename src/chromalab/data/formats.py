"""What each data stage hands the next, defined once: the raw Lite tables, the split lists, the images manifest."""

from __future__ import annotations

import csv
import re
from pathlib import Path

# download → split: Unsplash Lite's tables, tab-separated, and the columns split reads from each.
REQUIRED_COLUMNS = {
    "photos": ("photo_id", "photo_image_url"),
    "keywords": ("photo_id", "keyword", "ai_service_1_confidence", "ai_service_2_confidence", "suggested_by_user"),
}
# split → images: one list per split, these columns; photo ids become file names in the images stage.
# The shuffled candidates are cut in this order, so a larger n_val or n_reserve never changes train or test.
SPLITS = ("train", "test", "val", "reserve")
SPLIT_FIELDS = ("photo_id", "image_url", "reason")
# Unsplash ids are 11 characters; a limit keeps a file name (id + suffix) far below the file system's 255 bytes.
SAFE_PHOTO_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z: "$" would pass a final newline
# images → tfrecords: the fetched photos and where each came from.
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("photo_id", "split", "file", "sha256", "source")
# The splits the images stage fetches and the records hold: train fits, val chooses (curves, the kept
# checkpoint), test is only for the evaluate stage.
FETCHED_SPLITS = ("train", "test", "val")
# A row is a few KB; csv holds each line (and field) whole, so a 400 MB one would sit in memory. A description
# of 200 KB is still a row: csv's own field limit (128 KiB) is raised to this.
MAX_LINE_BYTES = 1 << 20


def open_table(path: Path):
    """A csv reader for one of the Lite tables (tab-separated, QUOTE_MINIMAL: keywords may hold quoted newlines)."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    f = path.open(newline="", encoding="utf-8-sig")
    return f, csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
