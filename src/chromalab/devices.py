"""Which devices this run has, and the precision that suits them (shared by training and bench)."""

from __future__ import annotations

import os
import sys


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpu_names() -> list[str]:
    """The GPUs the current Keras backend sees (empty on a CPU-only machine)."""
    import keras  # here, not above: available_cores is for processes that may never start Keras

    if keras.backend.backend() == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    import tensorflow as tf

    return [tf.config.experimental.get_device_details(d).get("device_name", d.name)
            for d in tf.config.list_physical_devices("GPU")]


def precision_policy(switch: str, gpus: list[str]) -> str:
    """'auto' = mixed precision only on a GPU: bf16 where it's native (Ampere+), float16 otherwise."""
    if switch == "off" or (switch == "auto" and not gpus):
        return "float32"
    old_gpu = any(tag in name for name in gpus for tag in ("V100", "T4", "P100", "K80"))
    return "mixed_float16" if old_gpu else "mixed_bfloat16"


def hide_gpus_from_tensorflow() -> None:
    """Under the JAX backend, keep a TensorFlow that something else imported off the GPU (it would claim memory)."""
    # Only where something already imported it: under JAX chromalab itself never imports TensorFlow.
    import keras

    tf = sys.modules.get("tensorflow")
    if keras.backend.backend() == "tensorflow" or tf is None:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TensorFlow's devices are already initialised (an earlier run in this process)
