"""Real photographs that ship with scikit-image (no download), cropped into as many samples as needed.

The benchmarks and the tests measure on them: real colour statistics, offline.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

# The astronaut is the person among them; the rest give varied, real colour statistics.
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def real_crops(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """`n` random square crops of the bundled photos, resized to size×size uint8 RGB."""
    rng = np.random.default_rng(seed)
    sources = [getattr(skdata, name)() for name in PHOTO_NAMES]
    crops = []
    for i in range(n):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.Resampling.LANCZOS)
        crops.append(np.asarray(crop))
    return crops


def write_images_stage(out_dir: Path, n_train: int, n_test: int, size: int, seed: int = 0,
                       quality: int = 95, n_val: int = 2) -> Path:
    """A data/images folder as the images stage leaves it: <split>/<id>.jpg and manifest.csv. The val photos
    come last, so asking for more of them leaves the train and test photos as they were."""
    rows = []
    for i, rgb in enumerate(real_crops(n_train + n_test + n_val, size, seed)):
        split = "train" if i < n_train else "test" if i < n_train + n_test else "val"
        photo_id = f"photo{i:04d}"
        path = out_dir / split / f"{photo_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path, quality=quality)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append({"photo_id": photo_id, "split": split, "file": f"{split}/{photo_id}.jpg",
                     "sha256": sha, "source": f"skimage:{PHOTO_NAMES[i % len(PHOTO_NAMES)]}"})
    with (out_dir / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out_dir
