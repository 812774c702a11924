#!/usr/bin/env python3
"""`make gpu-wheels` and `make gpu-check`: measure chromalab on a GPU machine that has JAX but no TensorFlow.

    python3 scripts/gpu_check.py wheels [--dest .whl]     # here: the wheels such a machine lacks
    python3 scripts/gpu_check.py run [--wheels .whl]      # there, from a bare checkout plus that folder

`run` installs the wheels offline into a scratch folder, then, under KERAS_BACKEND=jax, each step a
`chromalab` command of its own: makes N train + M test photos (random crops of scikit-image's photos),
runs `tfrecords`, `chromalab bench` on the GAN and baseline steps at every batch size, then the best batch
again with the loop row (fit on the records, input included) beside the step row, `train gan` for a few
epochs (to time one) and `train baseline` (evaluate needs both), `evaluate` and `colorize`. It writes
reports/gpu/gpu_check.json and reports/gpu/gpu_check.md (each step's output: logs/ in the work folder) and
exits 1 naming the step that failed.

Sizes: full (default; 2,000 + 200 photos at 256 px, full width, bf16) or small
(`--size small` or CHROMALAB_GPU_CHECK_SIZE=small: 16 + 4 photos at 32 px, width 0.125, the bench in
float16 with loss scaling; a few minutes on a CPU, what the tests run).
`--block-tensorflow` makes `import tensorflow` (and `import dvc`) fail in every step, as on the GPU machine,
and the report says whether any step imported TensorFlow anyway. `--batch N` (repeatable) measures only
those batch sizes: a rerun that skips the grid.

Only the standard library here: the machine has no chromalab environment until the wheels are in.
MLflow travels as mlflow-skinny (the full package's SQL store needs SQLAlchemy, and its repository
lookup DVC; neither is on that machine), so the check tracks to a local MLflow file store in its work
folder, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine (KINDS.md of the device tool: nvidia-h200, Python 3.12) lacks of chromalab's
# run-time needs, with their own dependencies; versions come from requirements.lock.
WHEELS = ("keras", "namex", "optree", "pydantic", "pydantic_core", "annotated-types", "typing-inspection",
          "typing_extensions", "typer", "google-crc32c", "mlflow-skinny", "cachetools", "databricks-sdk",
          "google-auth", "pyasn1", "pyasn1_modules", "cryptography", "cffi", "pycparser", "fastapi",
          "starlette", "uvicorn", "gitpython", "gitdb", "smmap", "importlib_metadata", "opentelemetry-api",
          "opentelemetry-proto", "opentelemetry-sdk", "opentelemetry-semantic-conventions", "python-dotenv",
          "sqlparse")
WHEEL_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
WHEELS_LIMIT_MIB = 64  # the device tool carries at most 64 MiB of working tree

SIZES = {
    "full": {"n_train": 2000, "n_test": 200, "image_size": 256, "width": 1.0, "batches": [1, 16, 64, 128, 256],
             "steps": 20, "precision": "mixed_bfloat16", "gan_epochs": 3, "baseline_epochs": 1, "budget_s": 480,
             "best_parts": ["gan", "baseline", "loop"]},
    # The GAN's loop only: each compile costs a CPU much. Epochs cost a CPU ~1 s each (float16 is emulated
    # there): 4 show the losses fall (g_l1 falls every epoch from the 1st). float16 (with loss scaling) and
    # the input rows: the bench's other paths under JAX.
    "small": {"n_train": 16, "n_test": 4, "image_size": 32, "width": 0.125, "batches": [4], "steps": 2,
              "precision": "mixed_float16", "gan_epochs": 4, "baseline_epochs": 3, "budget_s": 1200,
              "best_parts": ["gan", "loop", "input"]},
}
SEED_EPOCHS = 1500  # the seed's GAN run: 1,500 epochs of 2,000 photos
TARGET_IMG_S, GOAL_IMG_S, TARGET_LOOP_RATIO, TARGET_MINUTES = 2000, 4000, 0.9, 15

# Every step runs chromalab's CLI through this: it optionally blocks TensorFlow and, at exit, records the
# device's peak memory and whether TensorFlow was imported (to CHROMALAB_CHECK_STATS).
PRELUDE = textwrap.dedent("""
    import atexit, json, os, sys

    if os.environ.get("CHROMALAB_BLOCK_TENSORFLOW"):
        class _HideAbsent:  # what the GPU machine lacks and no wheel brings
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "dvc"):
                    raise ImportError(f"No module named {name!r} (blocked by gpu_check)")
                return None
        sys.meta_path.insert(0, _HideAbsent())

    # Compilations this step took from the persistent cache (JAX_COMPILATION_CACHE_DIR) or added to it.
    _cache = {"jax_cache_hits": 0, "jax_cache_misses": 0}
    if sys.argv[1] != "--photos" and os.environ.get("KERAS_BACKEND") == "jax":
        import jax.monitoring

        def _count(event, **_):
            key = {"/jax/compilation_cache/cache_hits": "jax_cache_hits",
                   "/jax/compilation_cache/cache_misses": "jax_cache_misses"}.get(event)
            if key:
                _cache[key] += 1

        jax.monitoring.register_event_listener(_count)

    def _stats():
        stats = {"tensorflow_imported": any(m.split(".")[0] == "tensorflow" for m in sys.modules), **_cache}
        if "keras" in sys.modules:
            stats["keras_backend"] = sys.modules["keras"].backend.backend()
        if "jax" in sys.modules:
            import jax
            device = jax.devices()[0]
            stats.update(device=device.device_kind, platform=device.platform,
                         peak_bytes=(device.memory_stats() or {}).get("peak_bytes_in_use"))
        with open(os.environ["CHROMALAB_CHECK_STATS"], "w") as f:
            json.dump(stats, f)

    atexit.register(_stats)
    if sys.argv[1] == "--photos":
        from chromalab.bench.samples import write_images_stage
        n_train, n_test, size = map(int, sys.argv[2:5])
        write_images_stage(__import__("pathlib").Path("data/images"), n_train, n_test, size, seed=1)
    else:
        from chromalab.cli import run  # as the `chromalab` program: exit handlers, no teardown
        run(sys.argv[1:])
""")


class StepFailed(Exception):
    pass


# --- wheels (here) -------------------------------------------------------------------------------------------


def locked_versions() -> dict[str, str]:
    versions = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            versions[_norm(name)] = version.strip()
    return versions


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cmd_wheels(dest: Path) -> int:
    versions = locked_versions()
    missing = [n for n in WHEELS if _norm(n) not in versions]
    if missing:
        print(f"gpu-wheels: not in requirements.lock: {', '.join(missing)}", file=sys.stderr)
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {f"{_norm(n)}=={versions[_norm(n)]}" for n in WHEELS}
    for old in dest.glob("*.whl"):  # two versions of one package stop the whole offline install
        name, version = old.name.split("-")[:2]
        if f"{_norm(name)}=={version}" not in wanted:
            old.unlink()
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", WHEEL_PYTHON, "--implementation", "cp", *platforms, "-d", str(dest),
               *sorted(wanted)]
    if subprocess.run(command).returncode:
        print("gpu-wheels: pip download failed (see above)", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"gpu-wheels: {len(list(dest.glob('*.whl')))} wheels in {dest}: {size / 2**20:.1f} MiB "
          f"(the device tool carries at most {WHEELS_LIMIT_MIB} MiB with the working tree)")
    return 0 if size < WHEELS_LIMIT_MIB * 2**20 else 1


# --- the check (there) ---------------------------------------------------------------------------------------


class Check:
    def __init__(self, size: str, work: Path, reports: Path, block_tensorflow: bool):
        self.s = SIZES[size]
        self.size = size
        self.work, self.reports = work, reports
        self.block_tensorflow = block_tensorflow
        self.started = time.monotonic()
        self.steps: list[dict] = []
        self.result: dict = {}  # filled step by step: a failed check still reports what it measured
        self.env = dict(os.environ)

    def remaining(self) -> float:
        return self.s["budget_s"] - (time.monotonic() - self.started)

    def install(self, wheels: Path) -> None:
        site = self.work / "site"
        paths = [str(ROOT / "src")]
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if found:
            start = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                                   *map(str, found)], capture_output=True, text=True)
            self._record("install wheels", start, done.returncode, done.stdout + done.stderr)
            paths.insert(0, str(site))
        self.env.update({
            "PYTHONPATH": os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            "KERAS_BACKEND": "jax",
            "MLFLOW_TRACKING_URI": (self.work / "mlruns").as_uri(),
            "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # Same computation, same compile: the bench, train, evaluate and colorize steps reuse each other's.
            # Every compilation is kept (by default only those over 1 s: on a CPU, few are).
            "JAX_COMPILATION_CACHE_DIR": str(self.work / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "PYTHONUNBUFFERED": "1",
        })
        if self.block_tensorflow:
            self.env["CHROMALAB_BLOCK_TENSORFLOW"] = "1"

    def _record(self, name: str, start: float, rc: int, output: str, stats: dict | None = None) -> None:
        step = {"step": name, "seconds": round(time.monotonic() - start, 1), "exit": rc, **(stats or {})}
        self.steps.append(step)
        print(f"gpu-check: {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {step['seconds']} s",
              file=sys.stderr, flush=True)
        if rc != 0:
            print(output[-6000:], file=sys.stderr)
            raise StepFailed(f"step {name!r} failed with exit status {rc}")

    def chromalab(self, name: str, *args: str) -> dict:
        """One step: `chromalab ARGS` (through PRELUDE) in the work folder, within the time left."""
        stats_file = self.work / f".stats-{len(self.steps)}.json"
        env = {**self.env, "CHROMALAB_CHECK_STATS": str(stats_file)}
        start = time.monotonic()
        timeout = self.remaining()
        if timeout <= 0:
            self._record(name, start, 124, f"no time left of the {self.s['budget_s']} s budget")
        try:
            done = subprocess.run([sys.executable, "-c", PRELUDE, *args], cwd=self.work, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            rc = 124
            output = f"{exc.stdout or ''}{exc.stderr or ''}\n(out of the {self.s['budget_s']} s budget)"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        log = self.work / "logs" / f"{len(self.steps):02d}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.log"
        log.parent.mkdir(exist_ok=True)
        log.write_text(output)  # what the step printed (its tables, its epochs), kept for a look afterwards
        stats["log"] = str(log.relative_to(self.work))
        self._record(name, start, rc, output, stats)
        return stats

    def params(self, gan_batch: int, baseline_batch: int) -> None:
        s = self.s
        big = 10_000  # no validation, checkpoint or sample sheet inside the timed epochs
        text = textwrap.dedent(f"""\
            base: {{seed: 42, image_size: {s['image_size']}}}
            tfrecords: {{shard_size: 250}}
            train: {{val_every: {big}, checkpoint_every: {big}, sample_every: {big}, n_samples: 2,
                     mixed_precision: "on", xla: "on"}}
            baseline: {{epochs: {s['baseline_epochs']}, batch_size: {baseline_batch}, width: {s['width']}}}
            gan: {{epochs: {s['gan_epochs']}, batch_size: {gan_batch}, width: {s['width']}}}
            evaluate: {{n_sheet: 2, batch_size: 16}}
            """)
        (self.work / "params.yaml").write_text(text)

    def bench(self, name: str, out: str, batches: list[int], *parts: str, records: bool = False) -> dict:
        s = self.s
        args = ["bench", "-o", out, "--image-size", str(s["image_size"]), "--width", str(s["width"]),
                "--precision", s["precision"], "--steps", str(s["steps"])]
        args += [a for b in batches for a in ("--batch", str(b))] + [a for p in parts for a in ("--only", p)]
        if records:
            args += ["--records", "data/tfrecords"]
        stats = self.chromalab(name, *args)
        return {"report": json.loads((self.work / out).read_text()), "stats": stats}

    def run(self) -> None:
        s, result = self.s, self.result
        self.params(s["batches"][0], s["batches"][0])
        self.chromalab("photos", "--photos", str(s["n_train"]), str(s["n_test"]), str(s["image_size"]))
        self.chromalab("tfrecords", "tfrecords")
        if len(s["batches"]) > 1:
            grid = result["grid"] = self.bench("bench: steps at every batch", "bench-steps.json", s["batches"],
                                               "gan", "baseline")
            rows = grid["report"]["rows"]
            best = {part: max((r for r in rows if r["part"] == part and r["status"] == "ok"),
                              key=lambda r: r["images_per_s"])["batch"] for part in ("gan", "baseline")}
        else:  # one batch size: it is the best, and the run below measures its steps too
            best = {"gan": s["batches"][0], "baseline": s["batches"][0]}
        result["best"] = best
        result["best_run"] = self.bench("bench: best batch, step and loop", "bench-best.json", [best["gan"]],
                                        *s["best_parts"], records=True)
        result.setdefault("grid", {"report": {**result["best_run"]["report"], "rows": []}})
        self.params(best["gan"], best["baseline"])
        self.chromalab("train gan", "train", "gan")
        self.chromalab("train baseline", "train", "baseline")
        self.chromalab("evaluate", "evaluate")
        photos = sorted((self.work / "data/images/test").glob("*.jpg"))[:4]
        self.chromalab("colorize", "colorize", *map(str, photos), "-o", "coloured", "--overwrite")


def summarise(check: Check, failure: str | None) -> dict:
    s, result = check.s, check.result
    summary: dict = {"size": check.size, "settings": s, "failed": failure, "steps": check.steps,
                     "tracking": "MLflow file store in the work folder (mlflow-skinny: no SQL store, no DVC here)",
                     "tensorflow_blocked": check.block_tensorflow,
                     "tensorflow_imported_by": [st["step"] for st in check.steps if st.get("tensorflow_imported")],
                     "jax_cache_hits": {st["step"]: st["jax_cache_hits"] for st in check.steps if st.get("jax_cache_hits")},
                     "elapsed_s": round(time.monotonic() - check.started, 1)}
    peaks = [st["peak_bytes"] for st in check.steps if st.get("peak_bytes")]
    summary["peak_device_memory_gib"] = round(max(peaks) / 2**30, 2) if peaks else None
    if "grid" not in result:
        return summary
    grid_report = result["grid"]["report"]
    summary["device"] = grid_report["device"]
    summary["backend"] = grid_report["backend"]
    summary["versions"] = grid_report["versions"]
    best_rows = result["best_run"]["report"]["rows"] if "best_run" in result else []
    summary["rows"] = [_row(r) for r in grid_report["rows"] + best_rows]
    if not best_rows:
        return summary
    step = next(r for r in best_rows if r["part"] == "gan" and r["variant"] == "")
    loop = next(r for r in best_rows if r["part"] == "gan" and r["variant"] == "loop")
    summary["best_batch"] = result["best"]
    summary["gan_step_img_s"] = step["images_per_s"]
    summary["gan_loop_img_s"] = loop["images_per_s"]
    summary["loop_over_step"] = loop["images_per_s"] / step["images_per_s"] if loop["images_per_s"] else None
    summary["gan_share_of_peak"] = loop["utilisation"]
    summary["s_per_epoch_from_loop"] = s["n_train"] / loop["images_per_s"] if loop["images_per_s"] else None
    history = check.work / "reports/gan/history.csv"
    epochs = _epoch_seconds(history)
    # The first epoch compiles: time the later ones.
    summary["train_epoch_seconds"] = epochs
    timed = epochs[1:] or epochs
    summary["s_per_epoch_trained"] = sorted(timed)[len(timed) // 2] if timed else None
    per_epoch = summary["s_per_epoch_trained"] or summary["s_per_epoch_from_loop"]
    summary["projected_minutes_1500_epochs"] = SEED_EPOCHS * per_epoch / 60 if per_epoch else None
    return summary


def _row(r: dict) -> dict:
    keys = ("part", "variant", "status", "batch", "precision", "images_per_s", "s_per_step", "utilisation", "note")
    return {k: r.get(k) for k in keys}


def _epoch_seconds(history: Path) -> list[float]:
    if not history.is_file():
        return []
    lines = history.read_text().splitlines()
    header = lines[0].split(",")
    if "epoch_seconds" not in header:
        return []
    column = header.index("epoch_seconds")
    return [float(line.split(",")[column]) for line in lines[1:] if line]


def _fmt(value, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    s = summary["settings"]
    device = summary.get("device", {})
    lines = [f"# chromalab gpu-check ({summary['size']})", ""]
    if summary["failed"]:
        lines += [f"**FAILED:** {summary['failed']}", ""]
    lines += [f"Device: {device.get('name', '?')} ({summary.get('backend', '?')}); peak "
              f"{_fmt(device.get('peak_tflops'))} TFLOP/s [{device.get('peak_source', '?')}]. "
              f"{s['n_train']} + {s['n_test']} photos at {s['image_size']} px, width {s['width']}, {s['precision']}. "
              f"Tracking: {summary['tracking']}. TensorFlow blocked: {summary['tensorflow_blocked']}; imported by: "
              f"{', '.join(summary['tensorflow_imported_by']) or 'no step'}.", ""]
    if "rows" in summary:
        lines += ["| part | variant | batch | img/s | s/step | share of peak | note |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in summary["rows"]:
            share = "–" if r["utilisation"] is None else f"{r['utilisation']:.1%}"
            lines.append(f"| {r['part']} | {r['variant'] or 'step'} | {r['batch']} | {_fmt(r['images_per_s'])} | "
                         f"{_fmt(r['s_per_step'])} | {share} | {r['note'] or ''} |")
    if "best_batch" in summary:
        share = summary["gan_share_of_peak"]
        lines += ["", "| figure | value | target |", "| --- | --- | --- |",
                  f"| GAN training, best batch {summary['best_batch']['gan']} (loop) | "
                  f"{_fmt(summary['gan_loop_img_s'])} img/s | ≥ {TARGET_IMG_S} (goal {GOAL_IMG_S}) |",
                  f"| share of the peak | {'–' if share is None else f'{share:.1%}'} | ≈ 40 % goal |",
                  f"| loop / step | {_fmt(summary['loop_over_step'], '.2f')} | ≥ {TARGET_LOOP_RATIO} |",
                  f"| s/epoch, {s['n_train']} photos (train gan, median of epochs after the 1st) | "
                  f"{_fmt(summary['s_per_epoch_trained'])} | |",
                  f"| s/epoch from the loop row | {_fmt(summary['s_per_epoch_from_loop'])} | |",
                  f"| projected {SEED_EPOCHS} epochs | {_fmt(summary['projected_minutes_1500_epochs'])} min | "
                  f"< {TARGET_MINUTES} min |",
                  f"| peak device memory | {_fmt(summary['peak_device_memory_gib'])} GiB | |"]
    lines += ["", "| step | seconds | exit | JAX compile cache hits / misses |", "| --- | --- | --- | --- |"]
    lines += [f"| {st['step']} | {st['seconds']} | {st['exit']} | "
              f"{st.get('jax_cache_hits', '–')} / {st.get('jax_cache_misses', '–')} |" for st in summary["steps"]]
    lines.append(f"\nTotal {summary['elapsed_s']} s.")
    return "\n".join(lines) + "\n"


def cmd_run(size: str, wheels: Path, work: Path, reports: Path, block_tensorflow: bool,
            batches: list[int] | None = None) -> int:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    reports.mkdir(parents=True, exist_ok=True)
    check = Check(size, work, reports, block_tensorflow)
    if batches:
        check.s = {**check.s, "batches": sorted(set(batches))}
    failure = None
    try:
        check.install(wheels)
        check.run()
    except StepFailed as exc:
        failure = str(exc)
    summary = summarise(check, failure)
    (reports / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (reports / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    if failure:
        print(f"gpu-check FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wheels = sub.add_parser("wheels", help="download the wheels the GPU machine lacks")
    wheels.add_argument("--dest", type=Path, default=ROOT / ".whl")
    run = sub.add_parser("run", help="install the wheels offline and measure")
    run.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    run.add_argument("--size", choices=sorted(SIZES), default=os.environ.get("CHROMALAB_GPU_CHECK_SIZE", "full"))
    run.add_argument("--work", type=Path, default=ROOT / ".gpu-check")
    run.add_argument("--reports", type=Path, default=ROOT / "reports/gpu")
    run.add_argument("--block-tensorflow", action="store_true")
    run.add_argument("--batch", type=int, action="append", dest="batches", help="batch sizes (default: the size's)")
    args = parser.parse_args(argv)
    if args.command == "wheels":
        return cmd_wheels(args.dest)
    return cmd_run(args.size, args.wheels, args.work.resolve(), args.reports.resolve(), args.block_tensorflow,
                   args.batches)


if __name__ == "__main__":
    sys.exit(main())
