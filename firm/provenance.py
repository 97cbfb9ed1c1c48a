"""Where a result came from: the source commit and the machine, recorded in run metadata and benchmark reports."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def git_commit() -> str | None:
    """The commit of FIRM's checkout (None for an installed copy, or without git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name() -> str:
    """The first CUDA device's name, else the CPU's with its core count: what measured numbers are labelled with."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment() -> dict[str, Any]:
    """Host, device name, torch version, FIRM's commit and the date, for a report's ``environment`` entry."""
    import torch

    return {
        "host": socket.gethostname(),
        "device": device_name(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
