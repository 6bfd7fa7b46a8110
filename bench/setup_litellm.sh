#!/usr/bin/env bash
# Create the venv holding LiteLLM's proxy for the benchmark's comparison column.
# Usage: bench/setup_litellm.sh [VENV_DIR]   (default: .cache/bench-litellm)
# Idempotent: does nothing when the pinned version is already there.
set -euo pipefail
VENV_DIR="${1:-.cache/bench-litellm}"
PYTHON="${PYTHON:-python3}"
# Newer releases need litellm-proxy / litellm-proxy-extras versions the registry reachable
# here does not carry; 1.106.12 resolves.
LITELLM_VERSION="${LITELLM_VERSION:-1.106.12}"
if [[ -x "$VENV_DIR/bin/python" ]] &&
    [[ "$("$VENV_DIR/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null)" == "$LITELLM_VERSION" ]]; then
    echo "[setup_litellm] $VENV_DIR already holds litellm $LITELLM_VERSION" >&2
    exit 0
fi
"$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/python" -m pip install --disable-pip-version-check -q "litellm[proxy]==$LITELLM_VERSION"
echo "[setup_litellm] done: $VENV_DIR" >&2
