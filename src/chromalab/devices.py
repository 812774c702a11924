"""Which devices this run has, and the precision that suits them (shared by training and bench)."""

from __future__ import annotations

import os
import sys

from chromalab.errors import ChromalabError


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


def xla_choice(switch: str, backend: str, gpus: list[str], replicas: int) -> bool:
    """Whether the train step is compiled with XLA. 'auto': under JAX always (uncompiled JAX runs op by op, far
    slower), under TensorFlow on GPUs, but not for a MirroredStrategy over several devices, which Keras 3
    compiles as one function that XLA cannot run (it reads each replica's variables from another device)."""
    mirrored = backend == "tensorflow" and replicas > 1
    if switch == "on" and mirrored:
        raise ChromalabError(
            f"train.xla: on cannot compile TensorFlow's step mirrored over {replicas} devices (XLA reads each "
            "replica's variables from another device): set train.xla: auto or off, or train with KERAS_BACKEND=jax"
        )
    if switch != "auto":
        return switch == "on"
    return backend == "jax" or (bool(gpus) and not mirrored)


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
