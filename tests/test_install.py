"""The install: FIRM's import names collide with nothing, through every entry point and from any directory.

transformers 5.25 requires Hugging Face's ``kernels`` and imports it on import. FIRM's fused kernels used to be a
top-level package of the same name; from the repository root it shadowed Hugging Face's (transformers, diffusers and
peft failed to import), and from the console script Hugging Face's shadowed FIRM's. `firm doctor` imports
transformers' hub-kernels integration, diffusers' peft loader and FIRM's fused kernels in one process; these tests run
it through the console script, ``python -m firm`` and pytest, each from the repository root and from elsewhere, and
show that it fails when a top-level ``kernels`` package is put back.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from firm.doctor import run_checks

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IN_PROCESS = f"{REPO / 'tests' / 'test_install.py'}::test_this_process_imports_transformers_diffusers_and_firm_kernels"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_this_process_imports_transformers_diffusers_and_firm_kernels():
    """pytest itself: the repository root is on sys.path here (pyproject's pythonpath)."""
    failed = [f"{c.name}: {c.detail}" for c in run_checks() if not c.ok]
    assert not failed, "\n".join(failed)


def test_firm_ships_one_import_name():
    """Every importable name FIRM installs is its own: only `firm` (no top-level kernels, datamodules, ...)."""
    top = metadata.distribution("firm").read_text("top_level.txt")
    assert top is not None, "the installed firm distribution has no top_level.txt"
    assert set(top.split()) == {"firm"}
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["firm", "tests"], f"top-level packages at the repository root: {packages}"


def _entry_points() -> dict[str, list[str]]:
    script = BIN / "firm"
    assert script.is_file(), f"no console script at {script}: install FIRM first (make test does)"
    return {
        "console script": [str(script), "doctor"],
        "python -m firm": [sys.executable, "-m", "firm", "doctor"],
        "pytest": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", IN_PROCESS],
    }


@pytest.mark.slow
def test_every_entry_point_from_the_repo_root_and_from_elsewhere(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    procs = {
        (entry, str(cwd)): subprocess.Popen(
            cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for entry, cmd in _entry_points().items()
        for cwd in (REPO, elsewhere)
    }
    failures = []
    for (entry, cwd), proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"--- {entry} from {cwd}: exit {proc.returncode}\n{out[-3000:]}")
        elif entry != "pytest":
            assert re.search(r"ok\s+the import name `kernels`", out), out
    assert not failures, "\n".join(failures)


def test_the_doctor_fails_when_a_top_level_kernels_package_is_back(tmp_path):
    """The old layout, restored beside the working directory: FIRM's fused kernels as a top-level `kernels`."""
    if not _installed("kernels"):
        pytest.skip("Hugging Face's kernels is not installed: there is nothing for a top-level kernels to shadow")
    old = tmp_path / "kernels"
    shutil.copytree(REPO / "firm" / "kernels", old, ignore=shutil.ignore_patterns("__pycache__"))
    for f in old.glob("*.py"):
        f.write_text(f.read_text().replace("from firm.kernels", "from kernels").replace("from firm import", "import"))
    r = subprocess.run(
        [sys.executable, "-m", "firm", "doctor"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"FAIL\s+the import name `kernels`.*shadows it", r.stdout), r.stdout
    assert re.search(r"FAIL\s+transformers and its hub-kernels integration", r.stdout), r.stdout


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False
