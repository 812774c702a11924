"""scripts/curve_frontier.py, the chroma curve's trade-off on trained runs: it takes an exported model's curve
off exactly, reads its strength back, and scores each strength as the evaluate stage scores a model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from chromalab.evaluate.metrics import photo_metrics, summarise
from chromalab.train.models import build_model, with_chroma_curve
from repo import ROOT

SIZE, PIVOT, TINY = 32, 17.0, 0.125


def load_script():
    spec = importlib.util.spec_from_file_location("curve_frontier", ROOT / "scripts/curve_frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    L = rng.uniform(-1, 1, (3, SIZE, SIZE, 1)).astype(np.float32)
    ab = rng.uniform(-0.3, 0.3, (3, SIZE, SIZE, 2)).astype(np.float32)
    return L, ab


def test_the_curve_comes_off_an_exported_model_and_its_strength_reads_back(photos):
    script, L = load_script(), photos[0]
    generator = build_model("gan", SIZE, width=TINY)
    raw, strength, pivot = script.without_curve(with_chroma_curve(generator, 12.5, 0.8))
    assert (strength, pivot) == (pytest.approx(0.8), pytest.approx(12.5))
    np.testing.assert_allclose(raw.predict(L, verbose=0), generator.predict(L, verbose=0), atol=1e-6)
    assert script.without_curve(generator) == (generator, 0.0, None)  # a model without a curve, as the CNN


def test_each_strength_is_scored_as_the_evaluate_stage_scores_that_model(photos):
    script, (L, ab) = load_script(), photos
    generator = build_model("gan", SIZE, width=TINY)
    points = script.frontier(generator, L, ab, PIVOT, strengths=(0.0, 1.0))
    for point in points:
        pred = with_chroma_curve(generator, PIVOT, point["k"]).predict(L, verbose=0)
        expected = summarise(photo_metrics(L[i], ab[i], pred[i]) for i in range(len(L)))
        assert point["delta_e00"] == pytest.approx(expected["delta_e00"])
        assert point["colourfulness_pct"] == pytest.approx(
            100 * expected["colourfulness_gap"] / expected["colourfulness_true"])
    assert points[0]["delta_e00"] != pytest.approx(points[1]["delta_e00"])  # the curve changed something


def test_like_for_like_takes_the_baseline_strength_closest_to_the_gan_colour_without_passing_it():
    script = load_script()

    def point(k, colour, per_photo):
        return {"k": k, "colourfulness_pct": colour, "delta_e00": float(np.mean(per_photo)),
                "per_photo": np.array(per_photo, dtype=float)}

    gan = {"exported_k": 0.75, "points": [point(0.0, -30, [0, 0, 0]), point(0.75, -9, [1, 2, 3])]}
    baseline = {"exported_k": 0.0, "points": [point(0.0, -34, [9, 9, 9]), point(1.0, -10, [1.5, 2.5, 3.0]),
                                              point(1.2, -5, [0, 0, 0])]}
    matched = script.like_for_like(gan, baseline)
    assert matched["baseline_k"] == 1.0  # -5 % would pass the GAN's -9 %; -34 % is further
    assert matched["gap"] == pytest.approx(-1 / 3)
    assert matched["gan_closer_share"] == pytest.approx(2 / 3)
    assert matched["gap_95"][0] <= matched["gap"] <= matched["gap_95"][1]
    assert script.like_for_like(gan, {"exported_k": 0.0, "points": [point(0.0, 18, [5, 5, 5])]}) is None
    far = -9 - script.MATCH_PCT - 1  # a model this much duller is not alike: no match, not a flattering gap
    assert script.like_for_like(gan, {"exported_k": 0.0, "points": [point(1.2, far, [9, 9, 9])]}) is None
