import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# `make test` runs the suite on two pytest-xdist workers, one per core: each worker, and every process it starts, keeps
# to one thread (set before torch is imported), so the two do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for `python -m firm` subprocesses: the repo importable, no stray run-dir from this process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("FIRM_RUN_DIR", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def python() -> str:
    return sys.executable
