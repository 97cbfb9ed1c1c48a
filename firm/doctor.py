"""`firm doctor`: checks that this environment can import what FIRM needs, each from where it should come.

The check that matters most is the one name FIRM once shared with another package: ``kernels``. transformers 5.25
requires Hugging Face's ``kernels`` distribution and imports it when it is imported; a folder named ``kernels`` with
an ``__init__.py`` earlier on ``sys.path`` (FIRM's own fused kernels were one, at the top of the repository until the
layout moved them to ``firm.kernels``) shadows it, and transformers, diffusers and peft then fail to import. The
doctor imports the hub-kernels integration of transformers, diffusers' peft loader and FIRM's fused kernels in one
process, and says where ``kernels`` came from.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    """The outcome of one check."""

    name: str  # what was checked
    ok: bool  # False: FIRM will not work here
    detail: str  # versions, paths, or what went wrong and what to do


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_kernels_name() -> Check:
    """``import kernels`` must give Hugging Face's distribution when it is installed, and nothing of FIRM's."""
    name = "the import name `kernels`"
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError) as e:
        return Check(name, False, f"looking it up failed: {e}")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    version = _version("kernels")
    if version is None:
        if origin is None:
            return Check(name, True, "Hugging Face's `kernels` is not installed, and nothing else takes the name")
        return Check(
            name,
            False,
            f"`kernels` resolves to {origin}, which belongs to no installed distribution: a folder named kernels on "
            "sys.path (or the working directory) shadows the package name that transformers imports; rename or "
            "move it",
        )
    dist_root = Path(metadata.distribution("kernels").locate_file("")).resolve()
    if origin is None or dist_root not in origin.parents:
        where = origin or "a namespace folder"
        return Check(
            name,
            False,
            f"Hugging Face's `kernels` {version} is installed under {dist_root}, but `import kernels` gives {where}: "
            "a folder named kernels earlier on sys.path shadows it (run from another directory, or rename the "
            "folder); FIRM's own fused kernels import as firm.kernels",
        )
    return Check(name, True, f"Hugging Face's kernels {version} ({origin.parent})")


def _transformers() -> str:
    import transformers

    importlib.import_module("transformers.integrations.hub_kernels")
    from transformers.utils.import_utils import is_kernels_available

    hub = "hub kernels available" if is_kernels_available() else "hub kernels not installed"
    return f"transformers {transformers.__version__} ({hub})"


def _diffusers_peft() -> str:
    import diffusers

    importlib.import_module("diffusers.loaders.peft")
    return f"diffusers {diffusers.__version__}, peft {_version('peft')}"


def _firm_kernels() -> str:
    import torch

    from firm import kernels

    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv = kernels.group_advantages(rewards, groups)
    # Group 0 is (1, 3): below and above its mean; group 1 has no spread, so its advantages are 0.
    signs = torch.sign(adv).tolist()
    if signs[:2] != [-1.0, 1.0] or adv[2:].abs().max().item() != 0.0:
        raise RuntimeError(f"group_advantages gave {adv.tolist()} for rewards (1, 3 | 2, 2)")
    return f"firm.kernels ({Path(kernels.__file__).parent}), torch {torch.__version__}"


def _experiments() -> str:
    from firm.paths import experiments_root, is_checkout

    root = experiments_root()
    n = sum(1 for _ in root.rglob("*.yaml"))
    if n == 0:
        raise FileNotFoundError(f"{root} holds no experiment YAML")
    return f"{n} experiments under {root} ({'source checkout' if is_checkout() else 'installed package'})"


def run_checks() -> list[Check]:
    """All checks, in order; each catches its own failure, so one broken import does not hide the others."""
    checks = [check_kernels_name()]
    for name, fn in (
        ("transformers and its hub-kernels integration", _transformers),
        ("diffusers' peft loader", _diffusers_peft),
        ("FIRM's fused kernels", _firm_kernels),
        ("the shipped experiments", _experiments),
    ):
        try:
            checks.append(Check(name, True, fn()))
        except Exception as e:  # noqa: BLE001 - reported, with the line that raised it
            last = traceback.extract_tb(e.__traceback__)[-1]
            where = f"{Path(last.filename).name}:{last.lineno}"
            checks.append(Check(name, False, f"{type(e).__name__}: {e} (at {where})"))
    return checks


def main() -> int:
    """Print the checks; exit status 1 when any failed."""
    checks = run_checks()
    width = max(len(c.name) for c in checks)
    print(f"FIRM doctor (python {sys.version.split()[0]} at {sys.executable})")
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    failed = [c for c in checks if not c.ok]
    if failed:
        print(f"{len(failed)} check(s) failed.", file=sys.stderr)
        return 1
    print("all checks passed.")
    return 0
