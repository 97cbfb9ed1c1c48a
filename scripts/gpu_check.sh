#!/usr/bin/env bash
# The prepared GPU check (one H100 / H200, about 13 minutes; STEPS="..." runs some). Whoever next has a GPU runs it and copies the tables it
# prints into docs/benchmarks.md with the device name. Results (text, CSV, JSON) go to $OUT (default gpu_results/).
#   bash scripts/gpu_check.sh            # uses $PY (default: python3) with torch (CUDA), triton, diffusers, peft
#   STEPS="3 4" bash scripts/gpu_check.sh  # only some steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
PY=${PY:-python3}
mkdir -p "$OUT"
step() { echo; echo "=== $* ==="; }
want() { [[ " ${STEPS:-1 2 3 4 5} " == *" $1 "* ]]; }
if ! $PY -c "import firm" 2>/dev/null; then
  $PY -m pip install -q --no-deps -e . || { echo "firm is not importable and could not be installed" >&2; exit 1; }
fi
$PY - <<'PY' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PY

if want 1; then
step "1. GPU tests (bf16 kernels vs float64, compiled Triton path)"
timeout 120 $PY -m pytest -m gpu -q -p no:cacheprovider tests/kernels 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"

fi
if want 2; then
step "2. kernels at the paper's shapes: eager vs torch.compile vs Triton, % of copy bandwidth"
timeout 120 $PY -m firm.kernels.bench bench --dtype bf16 --out "$OUT/kernels" 2>&1 | tee "$OUT/kernels.txt"

fi
if want 3; then
step "3. profile step: random-weight SD3.5-M-sized DiffusionNFT at 512 px (no critic latency), with and without activation checkpointing"
timeout 180 $PY -m firm profile step experiments/rl/bench_sd35m_random.yaml --steps 2 --warmup 1 \
  --compare "module.policy.gradient_checkpointing=false" --out "$OUT/bench_step" 2>&1 | grep -v Warning | tee "$OUT/bench_step.txt"
R=$($PY - "$OUT/bench_step" <<'PY'
import glob, json, sys
runs = json.load(open(sorted(glob.glob(sys.argv[1] + "/*.json"))[-1]))["runs"]
s = runs[0]["seconds"]
print(round(s["rollout_fwd"] + s["other"] / 2, 2))  # rollout time, roughly: its forwards plus decoding
PY
)
fi
if want 4 && [ -z "${R:-}" ]; then
  echo "step 4 skipped: it needs step 3's rollout time" >&2
elif want 4; then
step "4. profile step with a critic as slow as the rollout (${R}s per step): sync vs async"
timeout 240 $PY -m firm profile step experiments/rl/bench_sd35m_random.yaml module.rollout_chunk=16 \
  "module.critic.seconds=${R}" --steps 2 --warmup 2 --compare "module.async_rollout=true" \
  --out "$OUT/bench_step_async" 2>&1 | grep -v Warning | tee "$OUT/bench_step_async.txt"
fi
if want 5; then
step "5. random-weight Qwen-Image-Edit-sized DiffusionNFT under FSDP2 (1 GPU, 512 px): firm plan's prediction, then the measured step"
timeout 150 $PY -m firm plan experiments/rl/bench_qwen_edit_random.yaml --quiet --out "$OUT/plan_qwen_edit.json" \
  2>&1 | tail -16 | tee "$OUT/plan_qwen_edit.txt"
timeout 400 $PY -m firm profile step experiments/rl/bench_qwen_edit_random.yaml --steps 1 --warmup 1 \
  --out "$OUT/bench_qwen_edit" 2>&1 | grep -v Warning | tee "$OUT/bench_qwen_edit.txt"
$PY - "$OUT/plan_qwen_edit.json" "$OUT/bench_qwen_edit" <<'PY' | tee -a "$OUT/bench_qwen_edit.txt"
import glob, json, sys
plan = json.load(open(sys.argv[1]))
run = json.load(open(sorted(glob.glob(sys.argv[2] + "/*.json"))[-1]))["runs"][0]
measured = run["peak_memory_mib"] / 1024
print(f"peak per GPU: firm plan {plan['peak_gib']:.2f} GiB, measured {measured:.2f} GiB "
      f"({measured / plan['peak_gib']:.2f}x); step {run['seconds']['step']:.1f} s on {run['device']}")
PY
fi
echo; echo "done: $OUT"
