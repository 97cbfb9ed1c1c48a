"""Recipes of the shapes world: multi-run drivers and experiments built on top of the task plugin.

The plugin (firm/synthetic/: world, language, tasks, perception, rule critic, simulated outputs, datasets, curation,
evaluation, benchmark) is what a task is; the recipes use it, and the library, to run studies:

- :mod:`.pretrain` - the tiny base models the RL demo starts from (``experiments/demo/pretrain_{edit,gen}.yaml``);
- :mod:`.demo` - the RL demo's prompts and its held-out base-vs-trained report (``make demo``);
- :mod:`.report` - the demo's plots and report tables;
- :mod:`.ablation` - the reward ablation (``firm shapes ablate``);
- :mod:`.faithfulness` - the same RL under three critics (``firm shapes faithfulness``);
- :mod:`.critic_proof` - a tiny critic trained from nothing on curated data and benchmarked (``firm shapes
  critic-proof``).

Recipes import the plugin; the plugin never imports a recipe (tests/test_layering.py). Their commands are registered
by :mod:`.cli`, and their modules, data modules and callbacks by name in firm/registry.py.
"""
