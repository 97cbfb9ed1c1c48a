"""Listed in a bench YAML's `imports:` by the subprocess tests: registers the scripted critic."""

from firm.registry import register
from tests.bench.helpers import ScriptedCritic

register("critics", "test_scripted", ScriptedCritic, overwrite=True)
