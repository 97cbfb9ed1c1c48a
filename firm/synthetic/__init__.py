"""The shapes world: a procedural task family where the whole FIRM loop runs on a CPU.

Scenes of a few coloured shapes on a 3x3 grid (:mod:`.world`), prompts and edit instructions written from templates
and parsed back (:mod:`.language`), seeded tasks with leak-free train/test splits (:mod:`.tasks`), a rule critic that
scores images from their pixels on FIRM's 1..5 rubrics (:mod:`.perception`, :mod:`.scoring`, :mod:`.critic`),
simulated imperfect outputs (:mod:`.simulate`) and datasets (:mod:`.data`). See docs/new-task.md.

A plugin: nothing else in firm/ imports this package (tests/test_layering.py). Its parts of the library's pipelines
are registered by name in firm/registry.py: the curation teacher and sources (:mod:`.curation`), the rule critic,
eval sets and judge; its commands (`firm shapes ...`, among them `export-bench` with :mod:`.bench` and `tiny-critic`
with :mod:`.tiny_critic`) are a provider of firm/cli.py (:mod:`.cli`).

The studies that run the library on this world (pretraining the tiny base models, the RL demo and its report, the
reward ablation, critic faithfulness, the critic proof) are recipes on top of it, in :mod:`firm.synthetic.recipes`;
nothing outside recipes/ imports them (tests/test_layering.py).

Importing this package does not import torch; :mod:`.data` does.
"""

from firm.synthetic.critic import GroundTruthScorer, ShapesRuleCritic, task_request, tasks_to_requests
from firm.synthetic.language import (
    EDIT_KINDS,
    Edit,
    GenSpec,
    ParseError,
    format_checklist,
    format_instruction,
    format_prompt,
    parse_checklist,
    parse_instruction,
    parse_prompt,
)
from firm.synthetic.perception import Perception, SeenObject, perceive
from firm.synthetic.simulate import EDIT_MODES, GEN_MODES, degrade, simulate_edit, simulate_generation
from firm.synthetic.tasks import (
    EditTask,
    GenTask,
    SplitConfig,
    apply_edit,
    edit_tasks,
    gen_tasks,
    make_edit_task,
    make_gen_task,
    split_of,
)
from firm.synthetic.world import (
    CELL_NAMES,
    PALETTE,
    SHAPES,
    Scene,
    ShapeObject,
    WorldConfig,
    render,
    render_array,
)

__all__ = [
    "CELL_NAMES",
    "EDIT_KINDS",
    "EDIT_MODES",
    "GEN_MODES",
    "PALETTE",
    "SHAPES",
    "Edit",
    "EditTask",
    "GenSpec",
    "GenTask",
    "GroundTruthScorer",
    "ParseError",
    "Perception",
    "Scene",
    "SeenObject",
    "ShapeObject",
    "ShapesRuleCritic",
    "SplitConfig",
    "WorldConfig",
    "apply_edit",
    "degrade",
    "edit_tasks",
    "format_checklist",
    "format_instruction",
    "format_prompt",
    "gen_tasks",
    "make_edit_task",
    "make_gen_task",
    "parse_checklist",
    "parse_instruction",
    "parse_prompt",
    "perceive",
    "render",
    "render_array",
    "simulate_edit",
    "simulate_generation",
    "split_of",
    "task_request",
    "tasks_to_requests",
]
