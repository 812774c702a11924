"""The bench's report: its rows (Measurement; cpu_time for their CPU column), the versions, the JSON file, the table."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chromalab import __version__
from chromalab.files import write_text_atomic

TRAINING_PARTS = ("gan", "baseline")


@dataclass
class Measurement:
    """One row of the report. `items` images (or photos) went through in `seconds` of timed work."""

    part: str
    variant: str = ""
    status: str = "ok"  # "ok" or "skipped"
    note: str = ""
    image_size: int | None = None
    batch: int | None = None
    width: float | None = None
    precision: str | None = None
    xla: bool | None = None
    items: int | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None  # CPU time meanwhile: this process's threads and finished children
    s_per_step: float | None = None
    images_per_s: float | None = None
    gflops_per_image: float | None = None
    tflops_per_s: float | None = None
    utilisation: float | None = None  # fraction of the peak; None where no peak is known
    reference_ratio: float | None = None  # GAN row: its images/s ÷ the reference step's, same run


def cpu_time() -> float:
    """CPU seconds used so far by this process (every thread) and by its children that have exited."""
    children = os.times()  # children's times appear once they are reaped; process_time has finer resolution
    return time.process_time() + children.children_user + children.children_system


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "chromalab": __version__}
    for module in ("keras", "numpy", "tensorflow", "jax", "jaxlib"):
        if module in sys.modules:
            versions[module] = getattr(sys.modules[module], "__version__", "unknown")
    return versions


def write_report_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_table(rows: list[Measurement]):
    """The rows as a rich Table; utilisation shows "n/a" where no device peak is known. Notes go below it."""
    from rich.table import Table

    table = Table(title="chromalab bench", caption_justify="left")
    columns = ("part", "variant", "size", "batch", "width", "precision", "xla", "img/s", "vs ref", "s/step",
               "CPU ms/img", "GFLOP/img", "TFLOP/s", "util")
    for column in columns:
        table.add_column(column, justify="left" if column in ("part", "variant", "precision") else "right")
    notes = []
    for r in rows:
        if r.status != "ok":
            table.add_row(r.part, r.variant, *[""] * 11, "skipped")
        else:
            util = "" if r.part not in TRAINING_PARTS else "n/a" if r.utilisation is None else f"{r.utilisation:.1%}"
            cpu_ms = None if r.cpu_seconds is None else 1000 * r.cpu_seconds / r.items
            table.add_row(r.part, r.variant, _cell(r.image_size), _cell(r.batch), _cell(r.width), _cell(r.precision),
                          _cell(r.xla), _cell(r.images_per_s),
                          "" if r.reference_ratio is None else f"{r.reference_ratio:.2f}x", _cell(r.s_per_step), _cell(cpu_ms),
                          _cell(r.gflops_per_image), _cell(r.tflops_per_s), util)
        if r.note:
            notes.append(f"{' '.join(x for x in (r.part, r.variant) if x)}: {r.note}")
    table.caption = "\n".join(notes) or None
    return table
