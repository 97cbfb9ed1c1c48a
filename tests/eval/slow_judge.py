"""A test plugin (``imports:``): the shapes rule judge, slowed down so that a test can kill the score stage midway."""

import time
from dataclasses import dataclass, field
from typing import Any

from firm.registry import register
from firm.synthetic.evaluate import ShapesRuleJudge


@register("judges", "test_slow_shapes")
class SlowShapesJudge(ShapesRuleJudge):
    @dataclass
    class Config:
        name: str = "test_slow_shapes"
        critic: dict[str, Any] = field(default_factory=lambda: {"name": "shapes_rule"})
        reward: dict[str, Any] | None = None
        use_expected: bool = False
        sleep_s: float = 0.3  # per answer() call

    def answer(self, queries):
        time.sleep(self.config.sleep_s)
        return super().answer(queries)
