"""Test teachers for curation: the shapes rule teacher that can be killed mid-run, and one that writes junk.

Importing this module registers them in the "teachers" registry (curation YAMLs list it under ``imports:``).

- ``shapes_rule_killable``: answers like ``shapes_rule``; appends the key of every request it answers to the file
  named by ``$FIRM_TEST_TEACHER_LOG``; after ``$FIRM_TEST_KILL_AFTER`` generate() calls it SIGKILLs its own process
  (no cleanup runs: the hardest kind of interruption).
- ``junk``: answers every request with text no parser accepts (every sample fails).
- ``shapes_rule_flaky``: answers like ``shapes_rule``, except that it writes junk for the evaluation of the keys in
  :data:`FLAKY_KEYS` (tests fill and empty that set between launches).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from firm.registry import TEACHERS, register
from firm.synthetic.curation import ShapesRuleTeacher

_calls = 0
_lock = threading.Lock()


class KillableShapesTeacher(ShapesRuleTeacher):
    @dataclass
    class Config(ShapesRuleTeacher.Config):
        name: str = "shapes_rule_killable"

    teacher_id = "shapes_rule_killable"

    def generate(self, requests):
        global _calls
        with _lock:
            _calls += 1
            kill_after = int(os.environ.get("FIRM_TEST_KILL_AFTER", "0") or 0)
            if kill_after and _calls > kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        answers = super().generate(requests)
        log = os.environ.get("FIRM_TEST_TEACHER_LOG")
        if log:
            with _lock, open(log, "a") as f:
                f.writelines(f"{r.task} {r.key}\n" for r in requests)
        return answers


FLAKY_KEYS: set[str] = set()


class FlakyShapesTeacher(ShapesRuleTeacher):
    @dataclass
    class Config(ShapesRuleTeacher.Config):
        name: str = "shapes_rule_flaky"

    teacher_id = "shapes_rule_flaky"

    def generate(self, requests):
        answers = super().generate(requests)
        return [
            "I would rather not say." if r.task == "edit_evaluation" and r.key in FLAKY_KEYS else a
            for r, a in zip(requests, answers)
        ]


class JunkTeacher:
    @dataclass
    class Config:
        name: str = "junk"

    teacher_id = "junk"

    def __init__(self, config=None):
        self.config = config or self.Config()

    def generate(self, requests):
        return ["I would rather not say." for _ in requests]


for _name, _cls in (
    ("shapes_rule_killable", KillableShapesTeacher),
    ("shapes_rule_flaky", FlakyShapesTeacher),
    ("junk", JunkTeacher),
):
    if TEACHERS.get(_name) is not _cls:
        register("teachers", _name, _cls, overwrite=True)
