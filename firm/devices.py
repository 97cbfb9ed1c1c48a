"""Which device a process's models go on, decided before the trainer has chosen one."""

from __future__ import annotations

import os

import torch


def process_device(device: str, who: str = "device") -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``) as a torch device for this process.

    ``auto`` is the GPU when there is one, else the CPU. A bare ``cuda`` is this process's GPU: ``cuda:$LOCAL_RANK``
    under a multi-process launch (torchrun, Lightning's DDP / FSDP2 launchers). Critics and scorers are built with the
    RL module, before the trainer selects each rank's GPU, so a bare ``cuda`` would otherwise put every rank's model
    on GPU 0.

    Raises:
        RuntimeError: a CUDA device on a machine without CUDA (``who`` names the caller in the message).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{who} {device!r}: CUDA is not available here; use cpu")
    if d.type == "cuda" and d.index is None and os.environ.get("LOCAL_RANK", "").isdigit():
        d = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return d
