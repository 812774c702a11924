"""The device that the bench's training steps run on, and its peak FLOP/s: what utilisation is measured against."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

from chromalab.devices import gpu_names


@dataclass(frozen=True)
class GpuPeak:
    """Dense tensor-core peaks from NVIDIA's data sheets, TFLOP/s (sparsity would double them)."""

    pattern: str  # regular expression matched against the device name; the first match wins
    model: str
    bfloat16: float | None  # None: no bfloat16 tensor cores (Volta, Turing)
    float16: float
    float32: float  # TF32 tensor cores where the GPU has them (TensorFlow and XLA use them for float32
    #                 by default), plain FP32 on Volta and Turing


PEAK_TFLOPS = (
    GpuPeak(r"H100.*PCIe", "H100 PCIe", 756.0, 756.0, 378.0),
    GpuPeak(r"H[12]00.*NVL", "H100/H200 NVL", 835.5, 835.5, 417.5),
    GpuPeak(r"H100|H200", "H100/H200 SXM", 989.4, 989.4, 494.7),
    GpuPeak(r"A100", "A100", 312.0, 312.0, 156.0),
    GpuPeak(r"\bL4\b", "L4", 121.0, 121.0, 60.0),
    GpuPeak(r"\bT4\b", "T4", None, 65.0, 8.1),
    GpuPeak(r"V100", "V100 SXM2", None, 125.0, 15.7),
)


PEAK_FIELD = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


@dataclass(frozen=True)
class Device:
    """What the training steps run on, and the peak their utilisation is measured against."""

    name: str
    accelerator: str  # "gpu" or "cpu"
    peak_tflops: float | None
    peak_source: str


def cpu_name() -> str:
    """The processor's model name (Linux reports it in /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spec_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """(dense peak TFLOP/s, which GPU) of a known GPU at this precision; None for anything else."""
    for peak in PEAK_TFLOPS:
        if re.search(peak.pattern, device_name):
            value = getattr(peak, PEAK_FIELD[precision])
            return None if value is None else (value, peak.model)
    return None


def detect_device(precision: str, peak_tflops: float | None) -> Device:
    """The backend's device; its peak is the one given, else a known GPU's spec at this precision, else none."""
    gpus = gpu_names()
    name = ", ".join(gpus) if gpus else cpu_name()
    accelerator = "gpu" if gpus else "cpu"
    if peak_tflops is not None:
        return Device(name, accelerator, peak_tflops, "given (--peak-tflops)")
    known = spec_peak(gpus[0], precision) if gpus else None
    if known is None:
        why = f"no {PEAK_FIELD[precision]} peak known for this GPU" if gpus else "CPU"
        return Device(name, accelerator, None, f"none ({why}): pass --peak-tflops")
    value, model = known
    return Device(name, accelerator, value, f"NVIDIA spec, {model} dense {PEAK_FIELD[precision]}")


def utilisation(flops_per_image: float, images_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: the fraction of the peak that the model's own arithmetic uses."""
    if peak_tflops is None:
        return None
    return flops_per_image * images_per_s / (peak_tflops * 1e12)
