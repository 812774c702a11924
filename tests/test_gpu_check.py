"""`make gpu-check` at its reduced size, on the CPU, under JAX with `import tensorflow` failing in every step:
images → tfrecords → bench (steps, then the best batch with the loop row) → train gan → train baseline →
evaluate → colorize, and its JSON + Markdown report. This is also the test that nothing imports TensorFlow
under JAX: each step records whether it did. It is the suite's one run under JAX: the bench's rows under JAX
and JAX training (both models, the GAN's losses falling) are checked on its outputs too."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from chromalab.train.models import gan_train_step_flops
from chromalab.train.checkpoint import read_history
from conftest import jax_env
from repo import ROOT

SCRIPT = ROOT / "scripts/gpu_check.py"


@pytest.fixture(scope="module")
def reduced_check(tmp_path_factory):
    """The reduced check's run (its exit, reports and work folder), once for this module's tests."""
    folder = tmp_path_factory.mktemp("gpu-check")
    reports, work = folder / "reports", folder / "work"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--size", "small", "--block-tensorflow", "--wheels", str(folder / "none"),
         "--work", str(work), "--reports", str(reports)],
        env=jax_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-5000:]
    summary = json.loads((reports / "gpu_check.json").read_text())
    return summary, reports, work


def step(summary: dict, name: str) -> dict:
    return next(s for s in summary["steps"] if s["step"] == name)


@pytest.mark.slow
def test_reduced_gpu_check_runs_end_to_end_without_tensorflow(reduced_check):
    summary, reports, work = reduced_check
    assert summary["failed"] is None and summary["backend"] == "jax"
    assert summary["tensorflow_blocked"] and summary["tensorflow_imported_by"] == []
    # The steps share JAX's persistent compilation cache: training reuses what the bench compiled.
    assert summary["jax_cache_hits"].get("train gan", 0) > 0, summary["jax_cache_hits"]
    steps = [s["step"] for s in summary["steps"]]
    assert steps == ["photos", "tfrecords", "bench: best batch, step and loop",  # one batch size: no grid
                     "train gan", "train baseline", "evaluate", "colorize"]
    parts = {(r["part"], r["variant"]) for r in summary["rows"] if r["status"] == "ok"}
    assert parts == {("gan", ""), ("gan", "loop")}  # the full size adds the baseline and more batch sizes
    assert summary["gan_loop_img_s"] > 0 and summary["loop_over_step"] > 0
    epochs = summary["settings"]["gan_epochs"]
    assert len(summary["train_epoch_seconds"]) == epochs and summary["projected_minutes_1500_epochs"] > 0
    assert (work / "reports/evaluate/metrics.json").is_file()
    assert len(list((work / "coloured").glob("*_color.jpg"))) == 4  # the 4 test photos
    table = (reports / "gpu_check.md").read_text()
    assert "| loop / step |" in table and "projected 1500 epochs" in table and "FAILED" not in table
    assert "| JAX compile cache hits / misses |" in table


@pytest.mark.slow
def test_bench_runs_under_jax_without_tensorflow(reduced_check):
    """The check's bench step: `chromalab bench` under JAX, TensorFlow blocked, its loop on the records the
    tfrecords step wrote under JAX."""
    summary, _, work = reduced_check
    bench = step(summary, "bench: best batch, step and loop")
    assert bench["keras_backend"] == "jax" and not bench["tensorflow_imported"]
    report = json.loads((work / "bench-best.json").read_text())
    assert report["backend"] == "jax" and "tensorflow" not in report["versions"]
    gan, reference, loop, *pipeline = report["rows"]
    assert (gan["part"], gan["status"], gan["xla"], gan["precision"]) == ("gan", "ok", True, "mixed_float16")
    assert (reference["variant"], reference["status"]) == ("reference", "skipped") and gan["reference_ratio"] is None
    assert "TensorFlow backend" in reference["note"]
    assert gan["images_per_s"] > 0 and gan["gflops_per_image"] == pytest.approx(gan_train_step_flops(32, 0.125) / 1e9)
    assert (loop["part"], loop["variant"], loop["status"]) == ("gan", "loop", "ok")  # records read without TF
    n_train = summary["settings"]["n_train"]
    assert loop["images_per_s"] > 0 and "loop/step" in loop["note"] and f"fit on {n_train} photos" in loop["note"]
    assert [(row["part"], row["variant"], row["status"]) for row in pipeline] == [
        ("input", "augmented", "skipped"), ("input", "no augmentation", "skipped")]
    assert all("loop rows time training's own input" in row["note"] for row in pipeline)
    table = [line for line in (work / bench["log"]).read_text().splitlines() if line.startswith("│ ")]
    # The bench's table: the input rows skipped, no peak on a CPU.
    assert [line.split("│")[1].strip() for line in table if "skipped" in line] == ["gan", "input", "input"]
    assert "n/a" in next(line for line in table if line.startswith("│ gan "))


@pytest.mark.slow
def test_jax_trains_both_models_the_gan_with_falling_losses(reduced_check):
    """The check's `train gan` and `train baseline` steps, under JAX."""
    summary, _, work = reduced_check
    assert {step(summary, name)["keras_backend"] for name in ("train gan", "train baseline")} == {"jax"}
    settings = summary["settings"]
    losses = np.array([row["g_l1"] for row in read_history(work / "reports/gan/history.csv")])
    assert len(losses) == settings["gan_epochs"] >= 4
    assert np.isfinite(losses).all() and losses[-2:].mean() < losses[:2].mean(), losses
    baseline = np.array([row["loss"] for row in read_history(work / "reports/baseline/history.csv")])
    assert len(baseline) == settings["baseline_epochs"] > 1 and np.isfinite(baseline).all()
    assert (work / "models/baseline/model.keras").is_file()


def test_a_failing_step_is_named_and_fails_the_check(tmp_path, monkeypatch):
    """A broken step stops the check with exit 1 naming it, and the report says which."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def broken(check):
        check.chromalab("photos", "--photos", "2", "1", "32")
        check.chromalab("tfrecords", "no-such-command")

    monkeypatch.setattr(gpu_check.Check, "run", broken)
    reports = tmp_path / "reports"
    assert gpu_check.cmd_run("small", tmp_path / "none", tmp_path / "work", reports, False) == 1
    summary = json.loads((reports / "gpu_check.json").read_text())
    assert summary["failed"].startswith("step 'tfrecords' failed with exit status ")
    assert [(s["step"], s["exit"] != 0) for s in summary["steps"]] == [("photos", False), ("tfrecords", True)]
    assert "**FAILED:** step 'tfrecords'" in (reports / "gpu_check.md").read_text()
