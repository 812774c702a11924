"""Which devices this run has, and the precision that suits them (shared by training and bench)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from chromalab.errors import ChromalabError


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int] | None  # CUDA compute capability; None where the backend does not say


def gpus() -> list[Gpu]:
    """The GPUs the current Keras backend sees (empty on a CPU-only machine)."""
    import keras  # here, not above: available_cores is for processes that may never start Keras

    if keras.backend.backend() == "jax":
        import jax

        return [Gpu(d.device_kind, _capability(getattr(d, "compute_capability", None)))
                for d in jax.devices() if d.platform == "gpu"]
    import tensorflow as tf

    found = []
    for device in tf.config.list_physical_devices("GPU"):
        detail = tf.config.experimental.get_device_details(device)
        found.append(Gpu(detail.get("device_name", device.name), _capability(detail.get("compute_capability"))))
    return found


def _capability(value) -> tuple[int, int] | None:
    """(major, minor) from TensorFlow's tuple or JAX's "8.6"."""
    try:
        major, minor = (str(value).split(".") if isinstance(value, str) else value)
        return int(major), int(minor)
    except (TypeError, ValueError):
        return None


def gpu_names() -> list[str]:
    return [gpu.name for gpu in gpus()]


def precision_policy(switch: str, gpus: list[Gpu]) -> str:
    """'auto' = mixed precision only on a GPU: bfloat16 where every GPU computes it natively (compute capability
    8.0 and up: Ampere, Ada, Hopper, …), float16 with loss scaling on older ones or where unknown. 'on' on a
    CPU: bfloat16, which oneDNN computes."""
    if switch == "off" or (switch == "auto" and not gpus):
        return "float32"
    older = any(gpu.capability is None or gpu.capability < (8, 0) for gpu in gpus)  # none on a CPU (`on`)
    return "mixed_float16" if older else "mixed_bfloat16"


def xla_choice(switch: str, backend: str, gpus: list, replicas: int) -> bool:
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
