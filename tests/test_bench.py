"""`chromalab bench`: the report's rows and fields, FLOPs and utilisation. Its run under JAX without TensorFlow:
tests/test_gpu_check.py (the reduced gpu-check's bench step)."""

from __future__ import annotations

import json
import time

import keras
import pytest

from chromalab import bench
from chromalab.bench import Measurement, render_table, run_bench, spec_peak
from chromalab.errors import ChromalabError
from chromalab.train.models import baseline_train_step_flops, gan_train_step_flops

TINY = {"image_size": 32, "batches": [2], "width": 0.125, "steps": 2}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """Every part at 32 px, width 0.125, batch 2, 2 timed steps, few photos, a given peak of 1 TFLOP/s."""
    patch = pytest.MonkeyPatch()
    # Patched where they are read: the plan (chromalab.bench) writes the photos, bench.pipeline times the stages.
    for module, values in ((bench, {"BENCH_PHOTOS": 8, "BENCH_TEST_PHOTOS": 1}),
                           (bench.pipeline, {"BENCH_TEST_PHOTOS": 1, "INPUT_MIN_SECONDS": 0.1, "COLORIZE_PHOTOS": 2,
                                             "COLORIZE_SIDE": 64})):
        for name, value in values.items():
            patch.setattr(module, name, value)
    out = tmp_path_factory.mktemp("bench") / "report.json"
    try:
        returned = run_bench(out=out, peak_tflops=1.0, **TINY)
    finally:
        patch.undo()
    return returned, json.loads(out.read_text())


def rows_of(report: dict, part: str, variant: str | None = None) -> list[dict]:
    """`part`'s rows; for gan and baseline the step rows unless `variant` says "loop" or "reference"."""
    if variant is None and part in ("gan", "baseline"):
        variant = ""
    return [row for row in report["rows"] if row["part"] == part and variant in (None, row["variant"])]


def test_report_has_every_part_with_its_fields(tiny_report):
    returned, report = tiny_report
    assert report == json.loads(json.dumps(returned))  # what is on disk is what was returned
    assert report["backend"] == "tensorflow"
    assert report["device"]["accelerator"] == "cpu" and report["device"]["name"]
    assert {"python", "keras", "tensorflow", "numpy"} <= set(report["versions"])
    assert report["settings"]["xla"] is False  # off on a CPU unless asked for
    parts = [(row["part"], row["variant"]) for row in report["rows"]]
    assert parts == [("gan", ""), ("gan", "reference"), ("gan", "loop"), ("baseline", ""), ("baseline", "loop"),
                     ("tfrecords", "stage"), ("input", "augmented"), ("input", "no augmentation"),
                     ("colorize", "0.0041 MP gray photos")]
    assert all(row["status"] == "ok" and row["images_per_s"] > 0 for row in report["rows"])
    for part, variant in (("gan", ""), ("gan", "reference"), ("baseline", "")):
        (row,) = rows_of(report, part, variant)
        assert (row["image_size"], row["batch"], row["width"], row["precision"]) == (32, 2, 0.125, "float32")
        assert row["items"] == 2 * 2  # timed steps × batch, warm-up excluded
    for part in ("gan", "baseline"):  # real fit on the bench's 8 records, input included, timed as the step
        (loop,) = rows_of(report, part, "loop")
        (step,) = rows_of(report, part)
        assert (loop["batch"], loop["items"]) == (2, 2 * 2) and loop["images_per_s"] > 0
        assert f"loop/step {loop['images_per_s'] / step['images_per_s']:.2f}; fit on 8 photos" in loop["note"]
    (gan,), (reference,) = rows_of(report, "gan"), rows_of(report, "gan", "reference")
    assert gan["reference_ratio"] == pytest.approx(gan["images_per_s"] / reference["images_per_s"])
    assert reference["reference_ratio"] is None and "tutorial" in reference["note"]
    assert rows_of(report, "tfrecords")[0]["items"] == 8 + 1 + bench.BENCH_VAL_PHOTOS  # train, test, val
    # CPU time is counted in the workers too (child processes), not only in this process's threads.
    assert all(row["cpu_seconds"] > 0 for row in report["rows"])
    for row in rows_of(report, "input"):  # whole passes over the 8 photos, in batches of 2
        assert row["items"] >= 8 and row["items"] % 8 == 0 and f"passes over the cache: {row['items'] // 8};" in row["note"]
    assert rows_of(report, "colorize")[0]["items"] == 2


def test_training_rows_carry_flops_and_utilisation(tiny_report):
    _, report = tiny_report
    for part, flops_of in (("gan", gan_train_step_flops), ("baseline", baseline_train_step_flops)):
        row = rows_of(report, part)[0]
        flops = flops_of(32, 0.125)
        assert row["gflops_per_image"] == pytest.approx(flops / 1e9)
        assert row["tflops_per_s"] == pytest.approx(flops * row["images_per_s"] / 1e12)
        assert row["utilisation"] == pytest.approx(row["tflops_per_s"] / 1.0)  # the given 1 TFLOP/s peak
    assert report["device"]["peak_tflops"] == 1.0


def test_table_shows_the_utilisation(tiny_report):
    returned, _ = tiny_report
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(render_table([Measurement(**row) for row in returned["rows"]]))
    text = console.export_text()
    gan_line = next(line for line in text.splitlines() if line.startswith("│ gan"))
    assert f"{100 * rows_of(returned, 'gan')[0]['utilisation']:.1f}%" in gan_line
    assert f"{rows_of(returned, 'gan')[0]['reference_ratio']:.2f}x" in gan_line


@pytest.mark.parametrize("step_flops", [baseline_train_step_flops, gan_train_step_flops])
def test_flops_per_image_follow_size_and_width(step_flops):
    """The FLOPs the training rows report (checked above to be these) grow as the layer shapes do."""
    small = step_flops(32, 0.125)
    # 2× the side: 4× the positions for every layer; the U-Net gains a level at 64 px (a little more).
    assert step_flops(64, 0.125) / small == pytest.approx(4.0 if step_flops is baseline_train_step_flops else 4.5,
                                                          rel=0.02)
    # 2× the channels: 4× for hidden layers, 2× for the first and last (1 input, 2 output channels).
    assert 3.5 < step_flops(32, 0.25) / small < 4.0


def test_utilisation_is_na_without_a_peak():
    row = Measurement("gan", image_size=32, batch=2, width=0.125, precision="float32", xla=False,
                      images_per_s=10.0, s_per_step=0.2, gflops_per_image=1.0, tflops_per_s=0.01)
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(render_table([row]))
    assert "n/a" in console.export_text()
    assert bench.utilisation(2e12, 10.0, None) is None
    assert bench.utilisation(2e12, 10.0, 100.0) == pytest.approx(0.2)


@pytest.mark.parametrize(("device", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "mixed_bfloat16", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7),
    ("NVIDIA H100 PCIe", "mixed_bfloat16", 756.0),
    ("NVIDIA H200", "mixed_float16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "mixed_bfloat16", 312.0),
    ("NVIDIA L4", "mixed_bfloat16", 121.0),
    ("Tesla T4", "mixed_float16", 65.0),
    ("Tesla V100-SXM2-16GB", "mixed_float16", 125.0),
])
def test_known_gpus_have_their_spec_peak(device, precision, peak):
    assert spec_peak(device, precision)[0] == peak


@pytest.mark.parametrize("device", ["NVIDIA GeForce RTX 4090", "NVIDIA L40S", "AMD EPYC"])
def test_unknown_devices_have_no_peak(device):
    assert spec_peak(device, "mixed_bfloat16") is None


def test_steps_are_timed_after_the_warm_up_and_an_interrupted_run_keeps_its_finished_rows(tmp_path, monkeypatch):
    """One baseline bench (one trace) for two behaviours: its row times only the steps after the warm-up, and
    when the next part is interrupted that row is on disk, with its dtype policy, and the policy is restored."""
    # Each step made slower by a known sleep: 3 s in the first (warm-up) step, 0.25 s in every other.
    # s/step must include the 0.25 s of each timed step and none of the warm-up's 3 s.
    class SlowSteps(bench.steps._StepClock):
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(3.0 if batch == 0 else 0.25)
            super().on_train_batch_end(batch, logs)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.steps, "_StepClock", SlowSteps)
    monkeypatch.setattr(bench, "time_colorize", interrupted)
    out = tmp_path / "report.json"
    with pytest.raises(KeyboardInterrupt):
        run_bench(out=out, only=["baseline", "colorize"], precision="mixed_bfloat16", **{**TINY, "steps": 3})
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["part"], row["precision"], row["status"]) == ("baseline", "mixed_bfloat16", "ok")
    assert 0.25 <= row["s_per_step"] < 1.0
    assert row["seconds"] == pytest.approx(3 * row["s_per_step"]) and row["items"] == 3 * 2
    assert keras.mixed_precision.global_policy().name == "float32"
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


@pytest.mark.parametrize(("options", "message"), [
    ({"precision": "float8"}, "precision 'float8'"),
    ({"only": ["gpu"]}, "--only gpu"),
    ({"batches": [0]}, "batch sizes"),
    ({"peak_tflops": -1.0}, "--peak-tflops"),
    ({"image_size": 48}, "power of two"),
    ({"width": 0.0}, "width"),
    ({"out": "."}, "is a folder"),
])
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(ChromalabError, match=message) as caught:
        run_bench(**{"out": tmp_path / "r.json", **TINY, **options})
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "r.json").exists()
