#!/usr/bin/env bash
# Create (once) a separate virtual environment for an official-package reward scorer, to serve it with
# `firm reward serve` (firm/rewards/serve.py) and score through it with the `remote` scorer.
#   scripts/reward_venv.sh hpsv2|image_reward [VENV_DIR]      (default build/reward-venv-NAME; about 1.5 GB on CPU)
#   FIRM_HPSV2_VENV=VENV_DIR / FIRM_IMAGEREWARD_VENV=VENV_DIR then run the parity tests of
#   tests/rewards/scorers/test_remote.py against the package's own scoring code.
#
# What goes in (pinned; built and tested on CPU with these exact versions, Python 3.11; every package not named below
# is held by scripts/reward-venv-NAME.txt, frozen from a venv whose parity test passed):
#   torch + torchvision first (TORCH_SPEC, TORCHVISION_SPEC: a matching pair; CPU torch 2.13.0 by default), then the
#   package held to that torch by a constraint (unpinned, the packages would pull the newest CUDA torch, GBs);
#   FIRM itself without its dependencies (`pip install -e . --no-deps`) plus the few the server imports (LitServe,
#   FastAPI, uvicorn, httpx, OmegaConf, PyYAML; Pillow and numpy come with torch).
#   hpsv2 1.2.0: its wheel lacks the CLIP BPE vocabulary (hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz; importing
#     hpsv2.img_score fails with FileNotFoundError): the same file is copied from open-clip-torch.
#   image-reward 1.5: its BLIP text encoder (ImageReward/models/BLIP/med.py) imports apply_chunking_to_forward from
#     transformers.modeling_utils, gone in newer transformers: transformers 4.45.2 (as UniRL pins), with
#     huggingface-hub 0.36.2, datasets 3.6.0 and diffusers 0.35.2 (the newest releases that work with that hub; the
#     package imports both). It also imports OpenAI's `clip` (not among its requirements): openai-clip 1.0.1, which
#     needs ftfy and pkg_resources (setuptools < 81). BLIP fetches the bert-base-uncased tokenizer from the hub at
#     load time: on a machine offline, fill the Hugging Face cache first and serve with HF_HUB_OFFLINE=1.
#
# torchvision: a registry whose only torchvision is a CUDA build (its C++ ops link libc10_cuda.so, absent beside a
# CPU torch) makes `import torchvision` fail with "RuntimeError: operator torchvision::nms does not exist". When the
# ops do not load, the fake-kernel registrations of torchvision/_meta_registrations.py are skipped (as
# scripts/vllm_venv.sh does); the scorers use only torchvision's transforms. Where torch and torchvision are a
# matching pair (a GPU machine), nothing is patched.
# Scores depend on the torchvision release: HPSv2 resizes the image tensor, and torchvision 0.17+ antialiases tensor
# resizes by default where the releases of 2023 did not; pin TORCHVISION_SPEC to the release of the experiment you
# compare with.
set -euo pipefail
NAME="${1:-}"
case "$NAME" in
  hpsv2 | image_reward) ;;
  *) echo "usage: scripts/reward_venv.sh hpsv2|image_reward [VENV_DIR]" >&2; exit 2 ;;
esac
VENV="${2:-build/reward-venv-$NAME}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.28.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -f "$VENV/.firm-ready" ]; then
  exit 0
fi
start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "$TORCH_SPEC" "$TORCHVISION_SPEC"
PINS="$VENV/firm-constraints.txt"  # keep the torch pair installed above
LOCK="$ROOT/scripts/reward-venv-$NAME.txt"  # every other package at the version this script was tested with
"$VENV/bin/python" -c "import importlib.metadata as m; print(f\"torch=={m.version('torch')}\"); print(f\"torchvision=={m.version('torchvision')}\")" > "$PINS"
# what `firm reward serve` imports (the versions FIRM's lock file has)
"${PIP[@]}" -c "$PINS" -c "$LOCK" litserve==0.2.19 fastapi==0.165.0 uvicorn==0.55.0 httpx==0.29.0 omegaconf==2.4.0 pyyaml==6.0.4
"${PIP[@]}" --no-deps -e "$ROOT"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

if [ "$NAME" = hpsv2 ]; then
  "${PIP[@]}" -c "$PINS" -c "$LOCK" hpsv2==1.2.0
  "${PIP[@]}" -c "$LOCK" --no-deps open-clip-torch==3.3.0
  cp -n "$SITE/open_clip/bpe_simple_vocab_16e6.txt.gz" "$SITE/hpsv2/src/open_clip/"
  CHECK="import hpsv2.img_score"
else
  "${PIP[@]}" -c "$PINS" -c "$LOCK" image-reward==1.5 transformers==4.45.2 huggingface-hub==0.36.2 datasets==3.6.0 \
    diffusers==0.35.2 ftfy "setuptools>=77,<81"
  "${PIP[@]}" -c "$LOCK" --no-deps openai-clip==1.0.1
  CHECK="import ImageReward"
fi

# torchvision's fake-kernel registrations only when its C++ ops loaded
"$VENV/bin/python" - "$SITE/torchvision/_meta_registrations.py" <<'EOF'
import sys
from pathlib import Path

path = Path(sys.argv[1])
marker = "# firm scripts/reward_venv.sh"
text = path.read_text()
if marker not in text:
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text:
        sys.exit(f"{path}: unexpected layout; cannot patch")
    helper = (
        f"\n\ndef _fake_if_ops(name):  {marker}: skip when the C++ ops did not load\n"
        "    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda fn: fn)\n"
    )
    text = text.replace(anchor, anchor + helper, 1).replace("@torch.library.register_fake(", "@_fake_if_ops(")
    path.write_text(text)
EOF

"$VENV/bin/python" -W ignore -c "$CHECK; import torchvision.transforms; import firm.rewards.serve, firm.rewards.scorers.official"
touch "$VENV/.firm-ready"
echo "$NAME venv ready in $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)); serve with:"
echo "  $VENV/bin/python -m firm reward serve $NAME --config checkpoint=... --port 8101"
