"""Runs the tests marked `interpreter` with the Triton kernels executing in Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so they run in a separate pytest process rather than in
this one (where the ops take the torch-reference path).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from firm.kernels._common import HAS_TRITON, INTERPRETER

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETER, reason="already inside the interpreter run")
def test_triton_kernels_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    env.pop("FIRM_KERNELS", None)
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-m", "interpreter", "-q", "-p", "no:cacheprovider"]
    cmd += ["-W", "ignore::RuntimeWarning"]  # numpy's 0/0 warning for all-NaN groups (the NaN stats are intended)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter tests failed:\n{output[-6000:]}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 50, f"expected the interpreter tests to run:\n{output[-3000:]}"
    assert "skipped" not in output, f"interpreter tests were skipped:\n{output[-3000:]}"
