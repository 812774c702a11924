"""Training on other devices, through run_train as a user would: a MirroredStrategy over two logical CPUs,
float16 with loss scaling and XLA. (Training under JAX: tests/test_gpu_check.py, on the reduced gpu-check's
`train gan` and `train baseline` steps.) (A module of its own so pytest-xdist can run it beside
tests/test_training.py, whose tiny dataset and repos it shares.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from chromalab.devices import Gpu, precision_policy, xla_choice
from chromalab.train.checkpoint import read_history
from chromalab.train.stage import run_train
from conftest import jax_env
from test_training import TINY, dataset, tiny_params, workdir  # noqa: F401  (fixtures)


def _run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env or dict(os.environ))


def test_mirrored_strategy_trains_on_two_logical_devices(workdir):
    # Global batch 2 x 2 replicas = 4 divides both splits (8 train / 4 test).
    (workdir / "params.yaml").write_text(yaml.safe_dump({**TINY, "gan": {**TINY["gan"], "epochs": 3,
                                                                          "batch_size": 2, "ema": 0.99}}))
    done = _run_python("""
        from chromalab.entry import skip_unused_extras; skip_unused_extras()  # first: TensorFlow then skips its unused imports
        import tensorflow as tf
        from chromalab.entry import exit_without_teardown
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        from chromalab.train import gan
        from chromalab.config import load_params
        from chromalab.train.stage import run_train

        # What the train step itself sees, as it is traced on each replica: how many replicas share the
        # step, and its own share of the global batch of 4.
        seen = []
        own_step = gan.Pix2Pix._tf_train_step
        def spy(self, data):
            seen.append((tf.distribute.get_replica_context().num_replicas_in_sync, data[0].shape[0]))
            return own_step(self, data)
        gan.Pix2Pix._tf_train_step = spy
        # XLA cannot run a step mirrored over several devices: `xla: on` is refused before any work.
        import yaml
        from chromalab.config import parse_params
        from chromalab.errors import ChromalabError
        raw = yaml.safe_load(open("params.yaml"))
        try:
            run_train(parse_params({**raw, "train": {**raw.get("train", {}), "xla": "on"}}), "gan", strategy=strategy)
        except ChromalabError as refused:
            print("xla on:", refused)
        run_train(load_params(), "gan", strategy=strategy)
        print("steps saw", sorted(set(seen)))
        exit_without_teardown()  # TensorFlow's interpreter teardown would take seconds
    """, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps saw [(2, 2)]" in done.stdout, done.stdout[-2000:]
    assert "xla on: train.xla: on cannot compile TensorFlow's step mirrored over 2 devices" in done.stdout
    losses = [row["g_l1"] for row in read_history(workdir / "reports/gan/history.csv")]
    assert len(losses) == 3 and np.isfinite(losses).all()


def test_float16_with_loss_scaling_and_xla_train_through_run_train(workdir, monkeypatch):
    # `mixed_precision: on` means float16 with loss scaling on GPUs without bfloat16; a CPU would get
    # bfloat16, so that choice is made for it here. `xla: on` compiles the step on the CPU too.
    from chromalab.train import stage as training

    monkeypatch.setattr(training, "precision_policy", lambda switch, gpus: "mixed_float16")
    # As for JAX (conftest.jax_env): XLA's optimisation passes take most of the compile and buy nothing here.
    # XLA reads them once, at its first compile in this process: after an earlier test's compile this step
    # compiles optimised, as before; after this one, later compiles in the process stay unoptimised.
    monkeypatch.setenv("XLA_FLAGS", jax_env()["XLA_FLAGS"])
    built = []
    build = training.build_for_training
    monkeypatch.setattr(training, "build_for_training", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    try:
        run_train(tiny_params(train={"mixed_precision": "on", "xla": "on"}, gan={"epochs": 2}), "gan")
    finally:
        import keras

        keras.mixed_precision.set_global_policy("float32")
    (model,) = built
    assert type(model.optimizer).__name__ == "LossScaleOptimizer" and model.jit_compile is True
    assert model.generator.dtype_policy.name == "mixed_float16"
    rows = read_history(workdir / "reports/gan/history.csv")
    assert len(rows) == 2 and all(np.isfinite(row["g_l1"]) and np.isfinite(row["d_loss"]) for row in rows)


@pytest.mark.parametrize(("switch", "backend", "gpus", "replicas", "compiled"), [
    ("auto", "tensorflow", [], 1, False),  # a CPU: XLA buys nothing there, only compile time
    ("auto", "tensorflow", ["NVIDIA H100"], 1, True),
    ("auto", "tensorflow", ["NVIDIA H100"] * 2, 2, False),  # mirrored: XLA cannot run it
    ("auto", "jax", [], 1, True),  # uncompiled JAX runs op by op
    ("auto", "jax", ["NVIDIA H100"] * 2, 2, True),  # JAX's data parallelism compiles as one program
    ("on", "tensorflow", [], 1, True),
    ("off", "jax", ["NVIDIA H100"], 1, False),
])
def test_xla_choice(switch, backend, gpus, replicas, compiled):
    assert xla_choice(switch, backend, gpus, replicas) is compiled


H100, A10G, T4, UNSAID = Gpu("NVIDIA H100", (9, 0)), Gpu("NVIDIA A10G", (8, 6)), Gpu("Tesla T4", (7, 5)), Gpu("GPU", None)


@pytest.mark.parametrize(("switch", "gpus", "policy"), [
    ("auto", [], "float32"),
    ("auto", [H100], "mixed_bfloat16"),
    ("auto", [A10G], "mixed_bfloat16"),
    ("auto", [Gpu("NVIDIA GeForce RTX 2080 Ti", (7, 5))], "mixed_float16"),  # Turing: no bfloat16 tensor cores
    ("auto", [T4], "mixed_float16"),
    ("auto", [H100, T4], "mixed_float16"),  # one old GPU decides for all
    ("auto", [UNSAID], "mixed_float16"),  # float16 runs on every GPU with tensor cores
    ("on", [], "mixed_bfloat16"),  # a CPU: oneDNN computes bfloat16
    ("off", [H100], "float32"),
])
def test_precision_policy_follows_the_gpus_compute_capability(switch, gpus, policy):
    assert precision_policy(switch, gpus) == policy
