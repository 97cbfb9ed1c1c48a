"""Run a `firm run` command and SIGKILL it as soon as its first checkpoint exists (the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch


def kill_at_first_checkpoint(cmd: list[str], env: dict, runs: Path, steps: int, timeout: float = 300) -> Path:
    """Start ``cmd``, SIGKILL it (rank 0, the launcher: other ranks lose their peer and exit) once a
    ``last.ckpt`` appears under ``runs``, and return that run directory. Asserts the kill came mid-run."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, last = time.time() + timeout, None
    while time.time() < deadline and proc.poll() is None:
        found = list(runs.glob("*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.02)
    if last is None:
        proc.kill()
        raise AssertionError("no checkpoint appeared")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < steps, "the run finished before it could be killed; make it longer"
    return last.parent.parent
