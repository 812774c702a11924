"""The code's shape, held to what dvc.yaml and the README promise: each stage depends on every chromalab module
its entry point imports, imports run one way between the subpackages, no module borrows a helper from a
stage module, and functions read on one screen."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chromalab.code import import_closure, imported_modules, module_file, source_root
from repo import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "chromalab"
MAX_FUNCTION_LINES = 60
DATA_STAGES = ("download", "split", "images", "tfrecords")
assert source_root() == SRC, f"these tests read {SRC}, but import chromalab from {source_root()}"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, `foreach` expanded: name → {cmd, deps}."""
    stages = {}
    for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in spec:
            for item in spec["foreach"]:
                body = yaml.safe_dump(spec["do"]).replace("${item}", item)
                stages[f"{name}@{item}"] = yaml.safe_load(body)
        else:
            stages[name] = spec
    return stages


def entry_point(stage: dict) -> Path:
    match = re.search(r"\bpython (stages/\S+\.py)", stage["cmd"])
    assert match, f"cmd {stage['cmd']!r} runs no stages/*.py"
    return ROOT / match.group(1)


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


def top_level_imports(path: Path) -> list[str]:
    return [alias.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.Import)
            for alias in node.names]


STAGES = dvc_stages()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_depends_on_every_module_its_entry_point_imports(stage):
    spec = STAGES[stage]
    entry = entry_point(spec)
    deps = [str(dep) for dep in spec["deps"]]
    assert covered(entry, deps), f"dvc.yaml: stage {stage} misses its entry point {entry.relative_to(ROOT)}"
    beside = sorted(f"stages/{name}.py" for name in top_level_imports(entry)
                    if (ROOT / "stages" / f"{name}.py").is_file())
    assert beside and all(name in deps for name in beside), f"dvc.yaml: stage {stage} imports {beside}"
    missing = sorted(module_file(name).relative_to(ROOT).as_posix() for name in import_closure(entry)
                     if not covered(module_file(name), deps))
    assert not missing, f"dvc.yaml: stage {stage} imports but does not depend on {', '.join(missing)}"


def test_the_closure_follows_imports_inside_functions():
    """The check above can fail: a module reached only through a function-level import counts."""
    closure = import_closure(ROOT / "stages" / "train.py")
    assert {"chromalab.train.stage", "chromalab.train.models", "chromalab.track.runs", "chromalab.config"} <= closure
    assert "chromalab.evaluate.stage" not in closure


def test_the_gitignores_dvc_writes_beside_the_outputs_are_committed_as_it_writes_them():
    """`dvc exp apply` deleted models/<m>/checkpoint/ (git-ignored, a killed run's resume point) while DVC's
    models/<m>/.gitignore was not committed, as in a fresh clone before the first `dvc repro`."""
    expected: dict[Path, set[str]] = {}
    for spec in STAGES.values():
        for out in [*spec.get("outs", []), *spec.get("metrics", [])]:
            path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if (options or {}).get("cache", True):
                expected.setdefault(ROOT / Path(path).parent, set()).add(f"/{Path(path).name}")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
    for folder, names in expected.items():
        ignore = folder / ".gitignore"
        assert ignore.relative_to(ROOT).as_posix() in tracked, f"{ignore.relative_to(ROOT)} is not committed"
        assert set(ignore.read_text().split()) == names, ignore


def test_a_stage_runs_the_chromalab_beside_it_not_the_installed_one(tmp_path):
    """DVC runs a queued or --temp experiment in a copy of the repository, and the venv's chromalab is the
    workspace's (pip install -e): the copy's stages must import the copy's, which its dvc.lock records."""
    for folder in ("stages", "src"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    with (tmp_path / "src" / "chromalab" / "__init__.py").open("a") as init:
        init.write("\nimport sys\nprint('chromalab from', __file__, file=sys.stderr)\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "stages/split.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert f"chromalab from {tmp_path / 'src' / 'chromalab' / '__init__.py'}" in proc.stderr, proc.stderr
    assert proc.returncode == 1 and "params.yaml" in proc.stderr.splitlines()[-1]  # the copy has none


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_a_change_to_the_training_code_reruns_no_data_stage(stage):
    deps = [str(dep) for dep in STAGES[stage]["deps"]]
    for folder in ("src/chromalab/train", "src/chromalab/track", "src/chromalab/evaluate"):
        assert not any(dep.startswith(folder) for dep in deps), f"{stage} depends on {folder}"
        assert not any(folder.startswith(dep.rstrip("/") + "/") for dep in deps), f"{stage}: a dep covers {folder}"


def unit(name: str) -> str:
    """A subpackage (chromalab.train) or a root module (chromalab.color): the layers imports run between."""
    return ".".join(name.split(".")[:2])


def test_imports_run_one_way_between_the_subpackages():
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = unit(module_name(path))
        edges.setdefault(source, set()).update(
            unit(name) for name in imported_modules(path) if unit(name) not in (source, "chromalab"))

    def cycle_from(start: str, node: str, trail: list[str]) -> list[str] | None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return trail + [nxt]
            if nxt not in trail:
                found = cycle_from(start, nxt, trail + [nxt])
                if found:
                    return found
        return None

    for start in sorted(edges):
        cycle = cycle_from(start, start, [start])
        assert cycle is None, "import cycle: " + " → ".join(cycle)


def stage_modules() -> set[str]:
    """The modules whose `run_*` function a stage's entry point calls (inside its `main`)."""
    found = set()
    for spec in STAGES.values():
        main = next(node for node in ast.parse(entry_point(spec).read_text()).body
                    if isinstance(node, ast.FunctionDef) and node.name == "main")
        for node in ast.walk(main):
            if isinstance(node, ast.ImportFrom) and any(alias.name.startswith("run_") for alias in node.names):
                found.add(node.module)
    return found


def test_nothing_borrows_a_helper_from_a_stage_module():
    stages = stage_modules()
    assert {"chromalab.train.stage", "chromalab.data.tfrecords", "chromalab.evaluate.stage"} <= stages
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in stages and module_name(path) != node.module:
                helpers = [alias.name for alias in node.names if not alias.name.startswith("run_")]
                assert not helpers, f"{path.relative_to(ROOT)} imports {', '.join(helpers)} from stage {node.module}"


def long_functions(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_functions_read_on_one_screen():
    assert long_functions(PACKAGE) + long_functions(ROOT / "stages") == []
