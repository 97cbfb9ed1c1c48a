"""The shapes curation sources: degraded outputs are drawn on top of the same simulated outputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from firm.synthetic.curation import ShapesEditSource, ShapesGenSource


@pytest.mark.parametrize("cls", [ShapesEditSource, ShapesGenSource])
def test_degrade_prob_degrades_a_share_of_the_same_outputs(cls):
    image = "edited" if cls is ShapesEditSource else "image"
    clean = list(itertools.islice(cls(cls.Config(count=40, size=32)), 40))
    noisy = list(itertools.islice(cls(cls.Config(count=40, size=32, degrade_prob=0.5)), 40))
    assert [c["provenance"]["mode"] for c in clean] == [n["provenance"]["mode"] for n in noisy]
    assert all(c["provenance"]["degradation"] is None for c in clean)
    hit = [n["provenance"]["degradation"] is not None for n in noisy]
    assert 8 <= sum(hit) <= 32
    for c, n, h in zip(clean, noisy, hit):
        same = np.array_equal(np.asarray(c[image]), np.asarray(n[image]))
        assert same != h or n["provenance"]["degradation"].startswith("blur")  # a faint blur may round to no change
    with pytest.raises(ValueError, match="degrade_prob"):
        cls(cls.Config(degrade_prob=1.5))
