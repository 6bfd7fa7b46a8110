"""The CUDA build of vLLM installed by the vllm role from a wheelhouse (no GPU, no index)."""

from __future__ import annotations

import re
from pathlib import Path

PINNED = re.search(
    r"else '([0-9.]+)'",
    (Path(__file__).resolve().parents[3] / "roles/vllm/defaults/main.yml").read_text(),
)


def test_the_pinned_cuda_build_is_installed(host):
    version = host.check_output(
        "/opt/vllm/venv/bin/python -c 'import importlib.metadata as m; print(m.version(\"vllm\"))'"
    )
    assert PINNED is not None
    assert version.strip() == PINNED.group(1)
    torch = host.check_output(
        "/opt/vllm/venv/bin/python -c 'import torch; print(torch.__version__)'"
    )
    assert "+cpu" not in torch, torch


def test_the_cuda_build_is_there(host):
    # cumem_allocator (CUDA memory for sleep mode) ships only in the CUDA build.
    origin = host.check_output(
        "/opt/vllm/venv/bin/python -c "
        "'import importlib.util as u; print(u.find_spec(\"vllm.cumem_allocator\").origin)'"
    )
    assert origin.endswith(".so"), origin


def test_vllm_serve_help_runs(host):
    # vLLM's CLI picks its platform before it parses arguments, and finds CUDA through
    # NVML: with no GPU driver here it would stop at "Failed to infer device type". The
    # check names a device so that the CLI of the CUDA build runs all the same.
    result = host.run("VLLM_TARGET_DEVICE=cpu /opt/vllm/venv/bin/vllm serve --help=ParallelConfig")
    assert result.rc == 0, result.stderr[-3000:]
    assert "--tensor-parallel-size" in result.stdout
