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


@pytest.mark.slow  # a `firm doctor` subprocess
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


@pytest.mark.slow
def test_a_wheel_runs_the_shipped_experiments_by_name_from_elsewhere(tmp_path):
    """`pip install .` (not editable): the experiments, prompts and tiny models come inside the package."""
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("firm-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    env = {**_env(), "PYTHONPATH": str(site)}  # ahead of this venv's editable firm

    def firm(*args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "firm", *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, f"firm {' '.join(args)}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    listed = firm("list")
    assert f"under {site / 'firm' / 'experiments'}" in listed and "demo/shapes_edit_cme.yaml" in listed
    resolved = firm("run", "demo/shapes_edit_cme", "--dry-run")
    assert f"pretrained: {site / 'firm' / 'synthetic' / 'checkpoints' / 'shapes_edit'}" in resolved, resolved
    assert "--fresh" in firm("shapes", "critic-proof", "--help")
    # Every file the shipped YAMLs name through ${shipped:...} is in the wheel.
    named = {
        m for y in (REPO / "experiments").rglob("*.yaml") for m in re.findall(r"\$\{shipped:([^}]+)\}", y.read_text())
    }
    assert named, "the shipped YAMLs name no files through ${shipped:...}"
    missing = sorted(n for n in named if not (site / "firm" / n.removeprefix("firm/")).exists())
    assert not missing, f"named by the shipped YAMLs but missing from the wheel: {missing}"
