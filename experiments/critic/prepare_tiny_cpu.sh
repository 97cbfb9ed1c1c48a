#!/usr/bin/env bash
# HISTORY: the first CPU critic recipe, superseded by `firm shapes critic-proof` (docs/bench.md, section 4). Kept as
# the record of the numbers measured with it (docs/bench.md: History); not the recipe to follow.
# Inputs of the tiny CPU critic experiments (tiny_*_cpu.yaml): a tiny random Qwen3-VL critic, and critic SFT
# shards curated from the shapes world's *train* split by the curation pipelines with the rule teacher
# (difference-first for edits, plan-then-score for generations). The benchmark of docs/bench.md uses the held-out
# *test* split, so no task is shared. About 3 minutes on 2 CPU cores.
set -euo pipefail
FIRM=${FIRM:-firm}
COMMON="source.size=64 source.split=train output.max_count=256 progress=false"

$FIRM shapes tiny-critic runs/tiny-critic
# training data: balanced selections (about 1200 edits -> Execution + Consistency examples; 1600 generations)
$FIRM curate experiments/curation/shapes_edit_tiny.yaml name=shapes_edit_sft source.count=2400 $COMMON
$FIRM curate experiments/curation/shapes_gen_tiny.yaml name=shapes_gen_sft source.count=1500 quality=false $COMMON
# validation data: other train-split tasks, as scored (no balancing)
$FIRM curate experiments/curation/shapes_edit_tiny.yaml name=shapes_edit_val source.count=80 \
  source.start=3000000 balance.enabled=false $COMMON
$FIRM curate experiments/curation/shapes_gen_tiny.yaml name=shapes_gen_val source.count=80 \
  source.start=3000000 balance.enabled=false quality=false $COMMON
