"""The JPEG-compressibility scorer equals Flow-GRPO's; it is the docs' "adding a scorer" example."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from firm.critics.types import EditRequest, GenRequest
from firm.rewards.scorers.base import build_scorer

REPO = Path(__file__).resolve().parents[3]


def flow_grpo_jpeg_compressibility(images: np.ndarray) -> np.ndarray:
    """flow_grpo/rewards.py jpeg_incompressibility + jpeg_compressibility (yifan123/flow_grpo@ac4c86e), transcribed:
    NHWC uint8 images -> each saved as JPEG at quality 95 -> -(bytes / 1000) / 500."""
    sizes = []
    for arr in images:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return -np.array(sizes) / 500


def test_equals_flow_grpo_and_sees_a_wrong_quality():
    rng = np.random.default_rng(0)
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    arrays = np.stack([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), smooth])
    reqs = [GenRequest(Image.fromarray(a), "p") for a in arrays]
    out = build_scorer({"name": "jpeg_compressibility"})(reqs)
    ref = flow_grpo_jpeg_compressibility(arrays)
    assert out.values["jpeg_compressibility"].tolist() == pytest.approx(ref.tolist(), abs=1e-7)
    assert out.values["jpeg_compressibility"][1] > out.values["jpeg_compressibility"][0]  # noise compresses worse
    wrong = build_scorer({"name": "jpeg_compressibility", "quality": 75})(reqs)
    assert abs(float(wrong.values["jpeg_kb"][0]) - float(out.values["jpeg_kb"][0])) > 0.1
    edit = build_scorer({"name": "jpeg_compressibility"})([EditRequest(reqs[0].image, reqs[1].image, "x")])
    assert edit.values["jpeg_compressibility"].tolist() == pytest.approx([ref[1]], abs=1e-7)  # the edited image


def test_the_docs_show_this_file():
    doc = (REPO / "docs" / "rewards.md").read_text()
    src = (REPO / "firm" / "rewards" / "scorers" / "jpeg.py").read_text()
    body = src[src.index("class JPEGCompressibilityScorer") :].strip()
    assert body in doc, "docs/rewards.md must show firm/rewards/scorers/jpeg.py's class verbatim"
