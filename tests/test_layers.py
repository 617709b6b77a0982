"""The package's layers, as pyproject.toml's import-linter contracts state them, hold for the source tree.

``lint-imports`` reads the imports of every module (function-level ones included) without running them. The
second test plants an upward import and an import circle in a copy of the package, so the contracts are seen
to catch what they forbid.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                                                                  "lint_imports_command()"]
    return subprocess.run(cmd + ["--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_the_source_tree_keeps_its_layers():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_an_upward_import_and_a_circle_break_the_contracts(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "fastdiff", tmp_path / "fastdiff", symlinks=True,
                    ignore=shutil.ignore_patterns("assets", "*.so", "__pycache__"))
    (tmp_path / "fastdiff" / "models" / "_upward.py").write_text("from fastdiff.pipelines import sd1  # noqa\n")
    (tmp_path / "fastdiff" / "samplers" / "_circle.py").write_text("import fastdiff.samplers.sampling  # noqa\n")
    with open(tmp_path / "fastdiff" / "samplers" / "schedules.py", "a") as f:
        f.write("\nimport fastdiff.samplers._circle  # noqa: E402\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0
    assert "fastdiff.models is not allowed to import fastdiff.pipelines" in r.stdout, r.stdout[-4000:]
    assert "0 kept, 2 broken" in r.stdout, r.stdout[-4000:]
