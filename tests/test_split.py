"""Stage `split`: the people filter on a generated Lite archive, the seeded split, the folder source."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_unsplash import DEFAULT_KINDS, SELECTED_KINDS, lite_photos, make_lite_archive
from PIL import Image

from chromalab.config import parse_params
from chromalab.data.download import run_download
from chromalab.errors import ChromalabError
from chromalab.data.split import SAFE_PHOTO_ID, run_split
from repo import ROOT

IMAGE_BASE = "https://images.example.test"


@pytest.fixture(scope="module")
def photos():
    return lite_photos(DEFAULT_KINDS, seed=3)


@pytest.fixture(scope="module")
def raw_dir(photos, tmp_path_factory):
    """data/raw as the download stage leaves it, from a 1.3.0-style archive (.csv000 parts in a folder)."""
    tmp = tmp_path_factory.mktemp("lite")
    (tmp / "lite.zip").write_bytes(make_lite_archive(photos, IMAGE_BASE, parts=2, extension="csv", folder="lite/"))
    return run_download(parse_params({"data": {"url": str(tmp / "lite.zip")}}), tmp / "raw")


def params(**split):
    """The repository's params.yaml split group (its real keyword lists), with `split` overrides (n_val 2
    unless given: the fake archive holds a few dozen candidates)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return parse_params({"base": {"seed": split.pop("seed", 7)}, "split": {**raw["split"], "n_val": 2, **split}})


def read_split(out: Path) -> dict[str, list[dict[str, str]]]:
    splits = {}
    for name in ("train", "test", "val", "reserve"):
        with (out / f"{name}.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ["photo_id", "image_url", "reason"]
            splits[name] = list(reader)
    return splits


def ids(rows) -> list[str]:
    return [r["photo_id"] for r in rows]


def test_people_selection_honours_keywords_threshold_user_and_exclusions(photos, raw_dir, tmp_path):
    summary = run_split(params(n_train=20, n_test=5, n_val=3, n_reserve=100), raw_dir, tmp_path / "split")
    splits = read_split(tmp_path / "split")
    chosen = [row for rows in splits.values() for row in rows]
    expected = {p.photo_id: p for p in photos if p.kind in SELECTED_KINDS}

    assert sorted(ids(chosen)) == sorted(expected)  # no low-confidence, b&w, "no people", look-alikes
    assert summary["candidates"] == len(expected)
    assert summary["counts"] == {"train": 20, "test": 5, "val": 3, "reserve": len(expected) - 28}
    assert summary["left_out"] == {
        "black-and-white keyword": DEFAULT_KINDS["bw_keyword"],
        "caption says no people / black-and-white": DEFAULT_KINDS["caption"],
    }
    include = params().split.include_keywords
    for row in chosen:
        photo = expected[row["photo_id"]]
        assert row["image_url"] == f"{IMAGE_BASE}/photo-{photo.photo_id}"
        (tag,) = {k.keyword.lower() for k in photo.keywords if k.keyword.lower() in include}
        if photo.kind == "person_user":  # its only confident tag came from a person
            assert row["reason"] == f"keyword={tag} user"
        else:
            conf = max(k.conf1 for k in photo.keywords if k.keyword.lower() == tag)
            assert row["reason"] == f"keyword={tag} conf={conf:.1f}"
    # the photo whose first keyword holds a quoted newline was read correctly
    quirky = next(p for p in photos if any("\n" in k.keyword for k in p.keywords))
    assert quirky.photo_id in ids(chosen)


def test_threshold_and_exclude_list_are_parameters(photos, raw_dir, tmp_path):
    kinds = {p.photo_id: p.kind for p in photos}

    lower = run_split(params(min_confidence=40.0, n_train=1, n_test=1), raw_dir, tmp_path / "a")
    assert lower["candidates"] == sum(DEFAULT_KINDS[k] for k in ("person", "person_user", "low_confidence"))

    strict = run_split(params(min_confidence=99.5, n_train=1, n_test=1, n_reserve=100), raw_dir, tmp_path / "b")
    chosen = [row for rows in read_split(tmp_path / "b").values() for row in rows]
    assert strict["candidates"] == DEFAULT_KINDS["person_user"]  # only a person's suggestion passes
    assert {kinds[r["photo_id"]] for r in chosen} == {"person_user"}

    no_exclusions = run_split(params(exclude_keywords=[], n_train=1, n_test=1), raw_dir, tmp_path / "c")
    assert no_exclusions["candidates"] == sum(DEFAULT_KINDS[k] for k in ("person", "person_user", "bw_keyword"))


def test_include_keywords_match_whole_keywords_case_insensitively(photos, raw_dir, tmp_path):
    # "man" must catch "Man" but neither "manhattan" nor "woman"
    run_split(params(include_keywords=["MAN"], n_train=1, n_test=1, n_reserve=100), raw_dir, tmp_path / "split")
    chosen = {r["photo_id"] for rows in read_split(tmp_path / "split").values() for r in rows}
    expected = {p.photo_id for p in photos if p.kind in SELECTED_KINDS and p.keywords[0].keyword == "Man"}
    assert chosen == expected and expected


def test_split_is_seeded_and_stable(raw_dir, tmp_path):
    def run(name, **kw):
        run_split(params(n_train=20, n_test=5, **kw), raw_dir, tmp_path / name)
        return read_split(tmp_path / name)

    first, again = run("a", n_reserve=5), run("b", n_reserve=5)
    assert first == again
    assert (tmp_path / "a" / "train.csv").read_bytes() == (tmp_path / "b" / "train.csv").read_bytes()
    # ... and in another process, whose str hashes (and so set order) differ from this one's: the split
    # must not depend on anything a process picks at random.
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_split import params
        from chromalab.data.split import run_split
        run_split(params(n_train=20, n_test=5, n_reserve=5), Path({str(raw_dir)!r}), Path({str(tmp_path / "e")!r}))
    """)
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
    for name in ("train", "test", "val", "reserve"):
        assert (tmp_path / "e" / f"{name}.csv").read_bytes() == (tmp_path / "a" / f"{name}.csv").read_bytes()
    more_reserve = run("c", n_reserve=11)
    assert more_reserve["train"] == first["train"] and more_reserve["test"] == first["test"]
    assert more_reserve["reserve"][:5] == first["reserve"]
    other_seed = run("d", n_reserve=5, seed=8)
    assert ids(other_seed["train"]) != ids(first["train"])
    all_ids = ids(first["train"]) + ids(first["test"]) + ids(first["val"]) + ids(first["reserve"])
    assert len(set(all_ids)) == len(all_ids)  # disjoint


def test_val_is_carved_from_the_reserve_after_test(raw_dir, tmp_path):
    """Shuffled order is train, test, val, reserve: adding val photos (or more of them) takes them from the
    head of the reserve and leaves train and test as they were, so test stays comparable across n_val."""
    def run(name, n_val):
        summary = run_split(params(n_train=20, n_test=5, n_val=n_val, n_reserve=8), raw_dir, tmp_path / name)
        return summary, read_split(tmp_path / name)

    _, one = run("one", 1)
    summary, four = run("four", 4)
    assert four["train"] == one["train"] and four["test"] == one["test"]
    assert four["val"] == one["val"] + one["reserve"][:3]  # the reserve's head became val
    assert four["reserve"][:5] == one["reserve"][3:]
    assert summary["counts"] == {"train": 20, "test": 5, "val": 4, "reserve": 7}
    assert summary["params"]["n_val"] == 4
    assert not set(ids(four["val"])) & set(ids(four["test"]) + ids(four["train"]) + ids(four["reserve"]))


def test_n_val_must_be_at_least_one():
    from chromalab.config import ParamsError

    with pytest.raises(ParamsError, match="split.n_val: Input should be greater than or equal to 1") as err:
        params(n_val=0)
    assert "\n" not in str(err.value)


def test_too_few_candidates_says_how_many(raw_dir, tmp_path):
    found = DEFAULT_KINDS["person"] + DEFAULT_KINDS["person_user"]
    with pytest.raises(ChromalabError, match=f"only {found} candidate photos found, 52 needed .*widen "
                                             "split.include_keywords / lower split.min_confidence$") as err:
        run_split(params(n_train=40, n_test=10, n_val=2), raw_dir, tmp_path / "split")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "split").exists()


def test_short_reserve_is_reported_not_fatal(raw_dir, tmp_path):
    summary = run_split(params(n_train=30, n_test=4, n_val=1, n_reserve=10), raw_dir, tmp_path / "split")
    assert summary["counts"] == {"train": 30, "test": 4, "val": 1, "reserve": 1}
    assert summary["reserve_shortfall"] == 9
    assert json.loads((tmp_path / "split" / "summary.json").read_text()) == summary


def _raw_tables(raw: Path, urls: dict[str, str]) -> Path:
    """data/raw with one confidently tagged person per {photo_id: photo_image_url}."""
    raw.mkdir()
    (raw / "photos.tsv").write_text("photo_id\tphoto_image_url\n" + "".join(f"{i}\t{u}\n" for i, u in urls.items()))
    (raw / "keywords.tsv").write_text(
        "photo_id\tkeyword\tai_service_1_confidence\tai_service_2_confidence\tsuggested_by_user\n"
        + "".join(f"{i}\tperson\t90.0\t\tf\n" for i in urls)
    )
    return raw


def test_a_confidence_that_is_no_finite_number_is_none_in_either_column_order(tmp_path):
    # NaN compared false with everything: "NaN, 95" dropped a photo that "95, NaN" kept; "inf" counted as sure
    raw = _raw_tables(tmp_path / "raw", {i: f"{IMAGE_BASE}/photo-{i}" for i in ("a", "b", "c", "d", "e")})
    (raw / "keywords.tsv").write_text(
        "photo_id\tkeyword\tai_service_1_confidence\tai_service_2_confidence\tsuggested_by_user\n"
        "a\tperson\tNaN\t95\tf\nb\tperson\t95\tnan\tf\nc\tperson\tinf\t\tf\nd\tperson\t-inf\tNaN\tt\n"
        "e\tperson\t90\t\tf\n")
    summary = run_split(params(n_train=1, n_test=1, n_val=1, n_reserve=10), raw, tmp_path / "split")
    chosen = {r["photo_id"]: r["reason"] for rows in read_split(tmp_path / "split").values() for r in rows}
    assert chosen == {"a": "keyword=person conf=95.0", "b": "keyword=person conf=95.0", "d": "keyword=person user",
                      "e": "keyword=person conf=90.0"}
    assert summary["candidates"] == 4


def test_ids_and_urls_the_images_stage_cannot_use_are_left_out_and_counted(tmp_path):
    # a 300-character id passed the id check, then its file name was too long for the file system (OSError);
    # an unclosed IPv6 bracket passed the http:// prefix check, then stopped images with a ValueError
    good = {f"good{n}": f"{IMAGE_BASE}/photo-good{n}" for n in range(3)}
    bad = {"x" * 300: f"{IMAGE_BASE}/photo-long", "bracket": "http://[::1/photo-bracket", "nohost": "https:///p",
           "port": "http://host:port/p", "ftp": "ftp://host/p", "a/b": f"{IMAGE_BASE}/photo-slash",
           # urllib3 refuses these hosts when it connects (LocationParseError), after split had let them through
           "space": "http://images unsplash.com/p", "dots": "http://..../p", "label": f"http://{'a' * 64}.com/p"}
    raw = _raw_tables(tmp_path / "raw", {**good, **bad})
    summary = run_split(params(n_train=1, n_test=1, n_val=1), raw, tmp_path / "split")
    assert sorted(ids(r for rows in read_split(tmp_path / "split").values() for r in rows)) == sorted(good)
    assert summary["left_out"] == {"no usable id or image URL": len(bad)}
    assert SAFE_PHOTO_ID.match("a" * 64) and not SAFE_PHOTO_ID.match("a" * 65) and not SAFE_PHOTO_ID.match("a\n")


def test_one_image_url_under_two_ids_is_kept_once_under_the_first_id(tmp_path):
    # five such pairs put one photo in both test and val, and another twice in train
    urls = {f"id{n}": f"{IMAGE_BASE}/photo-{n % 4}" for n in range(10)}
    summary = run_split(params(n_train=2, n_test=1, n_val=1), _raw_tables(tmp_path / "raw", urls), tmp_path / "split")
    chosen = [r for rows in read_split(tmp_path / "split").values() for r in rows]
    assert sorted(ids(chosen)) == ["id0", "id1", "id2", "id3"]
    assert summary["left_out"] == {"image URL of another photo id": 6}


def test_missing_raw_tables(tmp_path):
    with pytest.raises(ChromalabError, match="run the download stage first"):
        run_split(params(n_train=1, n_test=1), tmp_path / "raw", tmp_path / "split")


def _photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (24, 36, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def folder_params(folder, **split):
    return parse_params({"base": {"seed": 5}, "data": {"source": "folder", "folder": str(folder)},
                         "split": {"n_train": 3, "n_test": 1, "n_val": 1, "n_reserve": 5, **split}})


def test_folder_source_lists_photos_recursively_with_stable_ids(tmp_path):
    folder = tmp_path / "my photos"
    names = ["Trip 2024/IMG_0001.JPG", "Trip 2024/day 2/beach.png", "a.jpeg", "b.webp", "c.TIFF", "d.bmp"]
    for seed, name in enumerate(names):
        _photo(folder / name, seed)
    (folder / "notes.txt").write_text("not a photo")
    _photo(folder / ".thumbnails" / "x.jpg", 99)  # hidden: skipped
    _photo(folder / ".hidden.jpg", 98)

    summary = run_split(folder_params(folder), tmp_path / "unused-raw", tmp_path / "split")
    assert summary["candidates"] == len(names)
    assert summary["counts"] == {"train": 3, "test": 1, "val": 1, "reserve": 1}
    rows = [r for rows in read_split(tmp_path / "split").values() for r in rows]
    assert sorted(r["image_url"] for r in rows) == sorted(str((folder / n).resolve()) for n in names)
    assert {r["reason"] for r in rows} == {"folder"}
    assert all(SAFE_PHOTO_ID.match(r["photo_id"]) for r in rows)
    assert len({r["photo_id"] for r in rows}) == len(names)
    by_url = {r["image_url"]: r["photo_id"] for r in rows}
    assert by_url[str((folder / "Trip 2024/IMG_0001.JPG").resolve())].startswith("trip-2024-img-0001-")

    # the same photos elsewhere get the same ids and the same split
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    run_split(folder_params(moved), tmp_path / "unused-raw", tmp_path / "split2")
    assert {k: ids(v) for k, v in read_split(tmp_path / "split2").items()} == {
        k: ids(v) for k, v in read_split(tmp_path / "split").items()
    }


def test_folder_source_leaves_out_copies_colorize_outputs_and_names_not_utf8_saying_how_many(tmp_path):
    """A copy of a photo could land in train and its twin in test, scoring what the model was trained on;
    colorize's outputs would teach the model its own colours."""
    import os

    from chromalab.colorize.photos import write_photo

    folder = tmp_path / "album"
    originals = [f"p{i}.jpg" for i in range(8)]
    for seed, name in enumerate(originals):
        _photo(folder / name, seed)
    (folder / "backup").mkdir()
    for name in originals[:3]:  # the same bytes under other names and folders
        shutil.copy(folder / name, folder / f"copy of {name}")
        shutil.copy(folder / name, folder / "backup" / name)
    with (folder / "p0_color.jpg").open("wb") as f:
        write_photo(Image.open(folder / "p0.jpg").convert("RGB"), f, "JPEG")
    latin1 = os.fsencode(folder) + b"/caf\xe9.jpg"  # a name from an old zip or camera
    with open(latin1, "wb") as f:
        f.write((folder / "p7.jpg").read_bytes()[:-1] + b"\x00")  # distinct bytes: left out for its name alone

    summary = run_split(folder_params(folder), tmp_path / "unused-raw", tmp_path / "split")
    assert summary["candidates"] == len(originals)
    assert summary["left_out"] == {"copies of a photo already in": 6, "written by chromalab colorize": 1,
                                   "names not UTF-8 (rename them)": 1}
    rows = [r for rows in read_split(tmp_path / "split").values() for r in rows]
    contents = [Path(r["image_url"]).read_bytes() for r in rows]
    assert len(set(contents)) == len(contents) == len(originals)


def test_folder_ids_do_not_depend_on_how_the_file_system_composes_accents():
    import unicodedata

    from chromalab.data.split import folder_photo_id

    name = "été 2024/café.jpg"
    composed, decomposed = (Path(unicodedata.normalize(form, name)) for form in ("NFC", "NFD"))
    assert composed != decomposed and folder_photo_id(composed) == folder_photo_id(decomposed)


def test_folder_source_errors(tmp_path):
    with pytest.raises(ChromalabError, match="data.folder is empty"):
        run_split(folder_params(""), tmp_path / "raw", tmp_path / "split")
    with pytest.raises(ChromalabError, match="is not a folder"):
        run_split(folder_params(tmp_path / "missing"), tmp_path / "raw", tmp_path / "split")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    with pytest.raises(ChromalabError, match="no photos"):
        run_split(folder_params(tmp_path / "empty"), tmp_path / "raw", tmp_path / "split")
    _photo(tmp_path / "two" / "a.jpg", 0)
    _photo(tmp_path / "two" / "b.jpg", 1)
    with pytest.raises(ChromalabError, match=r"only 2 candidate photos found, 5 needed .*; lower them, or add "
                                             r"photos to .*two$"):  # not the keyword filters, which folders skip
        run_split(folder_params(tmp_path / "two"), tmp_path / "raw", tmp_path / "split")


def test_the_split_does_not_depend_on_the_order_of_the_rows(tmp_path):
    """Candidates are sorted by id before the seeded shuffle: a table with its rows in another order (another
    download's parts, an edited export) gives the same photos the same splits."""
    urls = {f"p{n:02d}": f"{IMAGE_BASE}/photo-{n}" for n in range(24)}
    forward = _raw_tables(tmp_path / "forward", urls)
    backward = _raw_tables(tmp_path / "backward", dict(reversed(urls.items())))
    for raw in (forward, backward):
        run_split(params(n_train=10, n_test=4, n_val=3, n_reserve=7), raw, tmp_path / f"split-{raw.name}")
    assert read_split(tmp_path / "split-forward") == read_split(tmp_path / "split-backward")


def test_each_photo_is_chosen_for_its_most_confident_person_keyword_and_once(tmp_path):
    # either tagger's confidence counts, the threshold itself included (split.min_confidence 60);
    # a repeated photos.tsv row (another URL for the same id) must not put one photo in two splits
    raw = _raw_tables(tmp_path / "raw", {i: f"{IMAGE_BASE}/photo-{i}" for i in "abcd"})
    with (raw / "photos.tsv").open("a") as f:
        f.write(f"a\t{IMAGE_BASE}/photo-a-again\n")
    (raw / "keywords.tsv").write_text(
        "photo_id\tkeyword\tai_service_1_confidence\tai_service_2_confidence\tsuggested_by_user\n"
        "a\tman\t90\t50\tf\na\tperson\t80\t80\tf\n"  # man's best tagger (90) beats person's (80)
        "b\tperson\t\t\tt\nb\twoman\t70\t\tf\n"  # a tagger's 70 beats a person's suggestion
        "c\tman\t61\t\tf\nc\tperson\t\t75\tf\n"  # the second tagger's 75
        "d\tchild\t60\t\tf\n")
    summary = run_split(params(n_train=1, n_test=1, n_val=1, n_reserve=10), raw, tmp_path / "split")
    rows = [r for rows in read_split(tmp_path / "split").values() for r in rows]
    assert sorted((r["photo_id"], r["reason"]) for r in rows) == [
        ("a", "keyword=man conf=90.0"), ("b", "keyword=woman conf=70.0"), ("c", "keyword=person conf=75.0"),
        ("d", "keyword=child conf=60.0")]
    assert summary["candidates"] == 4
