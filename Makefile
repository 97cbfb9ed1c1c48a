# FIRM — the two commands of the README, and a few helpers.
#   make demo     create .venv, install FIRM from the lock (CPU torch), run the embedded default experiment
#   make test     same setup, run the test suite
#   make test-fast  the suite without the tests marked slow (subprocess runs, full fits, servers): under 3 minutes
#   make upgrade  re-resolve to the newest releases in a separate venv, run the suite there, rewrite the lock if it passes
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The exact versions (torch 2.13.0, the CPU build, included) that the suite last passed with; see scripts/lock.sh.
LOCK   ?= requirements-lock.txt
DEMO   ?= experiments/demo/shapes_edit_cme.yaml
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2

.PHONY: demo test test-fast lint format clean upgrade

# Everything comes from the lock, never from whatever is newest: pip itself, the build backend, torch, the rest.
# FIRM is installed on top without resolving again (--no-deps) and `pip check` proves the lock meets setup.py.
$(BIN)/.installed: setup.py pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$$(grep -E '^pip==' $(LOCK))"
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

demo: $(BIN)/.installed
	$(BIN)/firm run $(DEMO)

# Two pytest-xdist workers, one thread each (tests/conftest.py): 558 s against 1171 s on one worker, 2 cores (README).
# Work stealing: an idle worker takes tests queued on the other, so the suite does not end on one worker's tail of
# 20-50 s tests (the full-size plans, the two-process runs).
test: $(BIN)/.installed
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The fast lane for the edit-test loop: the same workers, without `slow` (which `make test` and CI still run).
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# The demo RL under the rule, the trained and the hallucinating critic, 2 training seeds (docs/faithfulness.md). The
# trained critic is the export of the critic proof run; FAITH_ARGS adds options (e.g. --steps 30) or overrides.
PROOF_OUT    ?= runs/critic-proof
PROOF_ARGS   ?=
# The critic half (docs/bench.md, section 4): bench, curation (curated + uncurated), SFT of the committed tiny base,
# export, firm critic bench. The base itself: make critic-base (firm shapes pretrain-critic-base).
.PHONY: critic-proof
critic-proof: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/firm shapes critic-proof --out $(PROOF_OUT) $(PROOF_ARGS)

BASE_OUT     ?= runs/critic-base
.PHONY: critic-base
critic-base: $(BIN)/.installed
	OMP_NUM_THREADS=2 $(BIN)/firm shapes pretrain-critic-base --out $(BASE_OUT)

PROOF_PROMPTS = $(foreach t,edit_execution edit_consistency gen_instruction,--critic-prompts $(t)=experiments/critic/prompts/proof_$(t).txt)
CRITIC_MODEL ?= $(PROOF_OUT)/critic-curated
FAITH_OUT    ?= runs/faithfulness
FAITH_ARGS   ?=
.PHONY: faithfulness
faithfulness: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/firm shapes faithfulness --critic-model $(CRITIC_MODEL) $(PROOF_PROMPTS) --seeds 0 1 \
	  --out $(FAITH_OUT) $(FAITH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info

# The newest releases setup.py allows, in build/upgrade-venv; the lock is rewritten only when the whole suite passes
# there (README: Reproducible installs). TORCH_SPEC (default torch==2.13.0) holds torch at the CPU build.
upgrade:
	PYTHON=$(PYTHON) LOCK=$(LOCK) PYTEST_WORKERS=$(PYTEST_WORKERS) PYTEST_ARGS="$(PYTEST_ARGS)" bash scripts/lock.sh upgrade

# Opt-in, not part of `make test`: FIRM against a real vLLM (CPU) serving the tiny critic. Creates the vLLM venv
# (scripts/vllm_venv.sh; about 3.5 GB, a few minutes, once), then runs tests/critics/test_vllm.py; the timings and
# parse rates land in build/test-vllm/report.json (docs/critics.md shows a run).
VLLM_VENV ?= build/vllm-venv
.PHONY: test-vllm
test-vllm: $(BIN)/.installed
	bash scripts/vllm_venv.sh $(VLLM_VENV)
	FIRM_VLLM=$(abspath $(VLLM_VENV))/bin/vllm OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/critics/test_vllm.py -v -s -rA $(PYTEST_ARGS)

# Opt-in, not part of `make test`: the official HPSv2 and ImageReward packages, each in its own venv
# (scripts/reward_venv.sh; about 1.6 GB and a minute each, once), scored through `firm reward serve` and pinned to the
# packages' own scoring code on tiny random checkpoints (tests/rewards/scorers/test_remote.py; docs/rewards.md).
REWARD_VENVS ?= build
.PHONY: test-reward-venvs
test-reward-venvs: $(BIN)/.installed
	bash scripts/reward_venv.sh hpsv2 $(REWARD_VENVS)/reward-venv-hpsv2
	bash scripts/reward_venv.sh image_reward $(REWARD_VENVS)/reward-venv-image_reward
	FIRM_HPSV2_VENV=$(abspath $(REWARD_VENVS))/reward-venv-hpsv2 \
	FIRM_IMAGEREWARD_VENV=$(abspath $(REWARD_VENVS))/reward-venv-image_reward \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/rewards/scorers/test_remote.py -v -rA $(PYTEST_ARGS)
