"""Reading evaluate's pictures back: where each picture panel is, and which picture it shows.

matplotlib draws every panel as an image inside its axes frame, titles and labels apart from it: the
frame and the image form one connected non-white region, text only small ones. Each panel is found that
way, then shrunk back to the model's resolution and compared with the picture it should hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from chromalab.color import lab_norm_to_rgb

# chromalab.evaluate.figures draws 100 dpi figures: comparison.png's cells are 2.2 in square, worst.png's 2.0 × 2.2 in.
DPI = 100
# Panel vs the picture it shows, after shrinking: nearest-neighbour upscaling by a non-integer factor
# blurs only the borders between source pixels. Measured on test_evaluate's sheets: 3.3-3.7 levels for the
# right picture; another picture of the same row differs by 15-60, but a very dark photo's colours by only
# ~5 from its gray input, so this bound alone can't tell those two apart (test_evaluate also checks that
# each panel is nearest its own picture, and each column far from the others on average).
SAME_PICTURE_MAX_MEAN_DIFF = 6.0


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        assert png.format == "PNG", f"{path} is {png.format}, not PNG"
        return np.asarray(png.convert("RGB"))


def panels(sheet: np.ndarray, min_side: int = 60) -> list[list[np.ndarray]]:
    """The sheet's picture panels as a grid (rows top to bottom, each left to right), frames cut off."""
    non_white = (sheet < 245).any(axis=-1)
    labels, _ = ndimage.label(non_white)
    boxes = [box for box in ndimage.find_objects(labels)
             if box[0].stop - box[0].start >= min_side and box[1].stop - box[1].start >= min_side]
    for rows, cols in boxes:
        height, width = rows.stop - rows.start, cols.stop - cols.start
        assert abs(height - width) <= 2, f"a {width}×{height} region is not a square panel"
    boxes.sort(key=lambda box: box[0].start)
    grid: list[list[tuple[slice, slice]]] = []
    for box in boxes:  # same row: tops within a few pixels
        if grid and abs(grid[-1][0][0].start - box[0].start) <= 3:
            grid[-1].append(box)
        else:
            grid.append([box])
    inset = 3  # the axes frame (0.8 pt) and its anti-aliasing
    return [[sheet[r.start + inset: r.stop - inset, c.start + inset: c.stop - inset]
             for r, c in sorted(row, key=lambda box: box[1].start)] for row in grid]


def shrunk(panel: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(panel).resize((size, size), Image.Resampling.BOX), dtype=np.float64)


def mean_diff(panel: np.ndarray, picture: np.ndarray) -> float:
    """Mean absolute difference (0-255 levels) between a panel and a size×size uint8 RGB picture."""
    return float(np.abs(shrunk(panel, picture.shape[0]) - picture.astype(np.float64)).mean())


def assert_shows(panel: np.ndarray, picture: np.ndarray, what: str) -> None:
    diff = mean_diff(panel, picture)
    assert diff <= SAME_PICTURE_MAX_MEAN_DIFF, f"{what}: differs from the expected picture by {diff:.1f} levels"


def gray_picture(L: np.ndarray) -> np.ndarray:
    """The gray input as it looks: Lab (100 L, 0, 0) in 8-bit sRGB (scikit-image's conversion, not ours)."""
    from skimage.color import lab2rgb

    lab = np.concatenate([100.0 * np.asarray(L, dtype=np.float64), np.zeros((*np.shape(L)[:-1], 2))], axis=-1)
    return to_uint8(lab2rgb(lab))


def colour_picture(L: np.ndarray, ab: np.ndarray) -> np.ndarray:
    return to_uint8(lab_norm_to_rgb(L, ab))


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def has_colour(hex_colour: str, image: np.ndarray, min_pixels: int = 50) -> bool:
    """Whether at least `min_pixels` pixels are drawn in exactly this matplotlib colour ("#rrggbb")."""
    rgb = np.array([int(hex_colour[i: i + 2], 16) for i in (1, 3, 5)], dtype=image.dtype)
    return int((image == rgb).all(axis=-1).sum()) >= min_pixels


def assert_comparison_sheet(path: Path, L: np.ndarray, ab: np.ndarray, predicted: dict[str, np.ndarray],
                            columns: tuple[str, ...]) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """comparison.png: one row per photo of L/ab (the first n_sheet test photos, in order), its columns gray
    input | each model in `predicted` | truth, each panel showing exactly that picture. Returns the panels
    and the pictures they show, row by row."""
    sheet = read_rgb(path)
    cell = round(2.2 * DPI)  # evaluate's square cells
    assert sheet.shape[:2] == (len(L) * cell, len(columns) * cell)
    grid = panels(sheet)
    assert [len(row) for row in grid] == [len(columns)] * len(L)
    expected = [[gray_picture(L[i]), *(colour_picture(L[i], p[i]) for p in predicted.values()),
                 colour_picture(L[i], ab[i])] for i in range(len(L))]
    for r, (row, pictures) in enumerate(zip(grid, expected)):
        for panel, picture, column in zip(row, pictures, columns):
            assert_shows(panel, picture, f"{path.name}, row {r}, {column}")
        gray = row[0].astype(np.int16)
        assert (gray.max(axis=-1) - gray.min(axis=-1)).max() <= 1  # R = G = B, up to rounding
    return grid, expected


def assert_charts_draw(reports: Path, predictors: dict[str, str]) -> None:
    """metrics_chart.png (one bar chart per metric of metrics.json, 4 a row) and delta_e00_hist.png, at the
    sizes evaluate lays them out, each predictor drawn in its own colour (`predictors`: name → "#rrggbb")."""
    import json
    import math

    chart = read_rgb(reports / "metrics_chart.png")
    n_charts = len(json.loads((reports / "metrics.json").read_text())["gray_floor"]) - 1  # all but `count`
    assert chart.shape[:2] == (round(2.6 * DPI) * math.ceil(n_charts / 4), round(3.2 * DPI) * 4)
    histogram = read_rgb(reports / "delta_e00_hist.png")
    assert histogram.shape[:2] == (4 * DPI, 7 * DPI)
    for name, colour in predictors.items():  # its bars, and its histogram line
        assert has_colour(colour, chart, min_pixels=500), name
        assert has_colour(colour, histogram), name
