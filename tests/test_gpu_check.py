"""`make gpu-check` at its reduced size, on the CPU, under JAX with `import tensorflow` failing in every step:
images → tfrecords → bench (steps, then the best batch with the loop row) → train gan → train baseline →
evaluate → colorize, and its JSON + Markdown report. This is also the test that nothing imports TensorFlow
under JAX: each step records whether it did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import jax_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/gpu_check.py"


@pytest.mark.slow
def test_reduced_gpu_check_runs_end_to_end_without_tensorflow(tmp_path):
    reports = tmp_path / "reports"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--size", "small", "--block-tensorflow", "--wheels", str(tmp_path / "none"),
         "--work", str(tmp_path / "work"), "--reports", str(reports)],
        env=jax_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-5000:]
    summary = json.loads((reports / "gpu_check.json").read_text())
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
    assert len(summary["train_epoch_seconds"]) == 2 and summary["projected_minutes_1500_epochs"] > 0
    assert (tmp_path / "work/reports/evaluate/metrics.json").is_file()
    assert len(list((tmp_path / "work/coloured").glob("*_color.jpg"))) == 4  # the 4 test photos
    table = (reports / "gpu_check.md").read_text()
    assert "| loop / step |" in table and "projected 1500 epochs" in table and "FAILED" not in table
    assert "| JAX compile cache hits / misses |" in table


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
