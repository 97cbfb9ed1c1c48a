"""Where the files that ship with FIRM are: the experiments, their prompt and data files, the committed tiny models.

Two layouts hold them:

* a source checkout (``pip install -e .`` or ``PYTHONPATH=.``): ``<repo>/experiments/`` beside ``<repo>/firm/``;
* an installed wheel (``pip install .``): ``experiments/`` is package data, ``<site-packages>/firm/experiments/``.

A shipped YAML names such a file by its path in the source tree, through the ``shipped`` resolver, so that it runs
from any working directory in either layout::

    pretrained: "${shipped:firm/synthetic/checkpoints/shapes_edit}"
    path: "${shipped:experiments/rl/data/shapes_gen/prompts.jsonl}"

Other relative paths in a YAML are relative to the working directory, as usual.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

PACKAGE = Path(__file__).resolve().parent  # .../firm
CHECKOUT = PACKAGE.parent  # the repository root when FIRM runs from a source checkout


def is_checkout() -> bool:
    """True when FIRM runs from its source tree (the ``experiments/`` folder and ``setup.py`` lie beside ``firm/``)."""
    return (CHECKOUT / "setup.py").is_file() and (CHECKOUT / "experiments").is_dir()


def experiments_root() -> Path:
    """The shipped ``experiments/`` folder of this checkout or installation.

    Raises:
        FileNotFoundError: neither layout has it (a broken install).
    """
    if is_checkout():
        return CHECKOUT / "experiments"
    packaged = PACKAGE / "experiments"
    if packaged.is_dir():
        return packaged
    raise FileNotFoundError(
        f"FIRM's experiments/ folder is missing: neither {CHECKOUT / 'experiments'} (a source checkout) nor {packaged} "
        "(an installed wheel) exists; reinstall FIRM"
    )


def shipped(relative: str) -> Path:
    """The absolute path of a file or folder that ships with FIRM, given its path in the source tree.

    Args:
        relative: a POSIX path that starts with ``experiments/`` or ``firm/``, e.g.
            ``firm/synthetic/checkpoints/shapes_edit``.

    Raises:
        ValueError: ``relative`` is absolute, climbs with ``..`` or starts elsewhere.
        FileNotFoundError: nothing ships under that path.
    """
    parts = PurePosixPath(str(relative).strip()).parts
    if not parts or parts[0] not in ("experiments", "firm") or ".." in parts:
        raise ValueError(
            f"${{shipped:{relative}}}: give a path inside FIRM's source tree that starts with experiments/ or firm/ "
            "(e.g. firm/synthetic/checkpoints/shapes_edit)"
        )
    base = experiments_root() if parts[0] == "experiments" else PACKAGE
    path = base.joinpath(*parts[1:])
    if not path.exists():
        raise FileNotFoundError(f"${{shipped:{relative}}}: FIRM ships nothing at {path}")
    return path


def find_experiment(spec: str) -> str:
    """An experiment YAML: ``spec`` as given when that path exists, else the shipped experiment of that name
    (relative to ``experiments/``, with or without ``.yaml`` and the ``experiments/`` prefix: ``demo/shapes_edit_cme``
    or ``experiments/demo/shapes_edit_cme.yaml`` from any directory). An unknown name comes back unchanged, for the
    loader to report as a missing file."""
    if Path(spec).exists():
        return spec
    root = experiments_root()
    name = spec.removeprefix("experiments/")
    for candidate in (root / name, root / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return spec


# The checkpoint every run directory keeps under checkpoints/: the newest state (what --resume and the exports read).
LAST_CKPT = "last.ckpt"
