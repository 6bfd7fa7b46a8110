"""The CUDA vLLM unit, rendered on a test host with no GPU and checked as systemd reads it.

No test host has a GPU: the unit is rendered on the probe host by molecule/stack/cuda_unit.yml
(the vllm and nvidia_driver roles' own definitions), read by systemd, and removed again.
What this does not prove: that vLLM starts on a GPU with these settings, or that the device
node unit's commands create the nodes (stand-ins take nvidia-modprobe's and nvidia-smi's
place here, so that `systemd-analyze verify` finds them).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import testinfra

SCENARIO = Path(__file__).resolve().parents[1]
PROBE = "llmhost-probe"
NVIDIA_DEVICES = {
    "char-nvidia-frontend rw",
    "char-nvidia rw",
    "char-nvidiactl rw",
    "char-nvidia-uvm rw",
    "char-nvidia-caps rw",
    "char-nvidia-nvswitch rw",
}
STAND_INS = ["/usr/bin/nvidia-modprobe", "/usr/bin/nvidia-smi", "/opt/vllm/venv/bin/python"]
UNITS = ["/etc/systemd/system/vllm.service", "/etc/systemd/system/llmhost-nvidia-devices.service"]


@pytest.fixture(scope="module")
def cuda_host() -> Iterator[testinfra.host.Host]:
    host = testinfra.get_host(
        f"ansible://{PROBE}", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"]
    )
    run = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            str(SCENARIO / "cuda_unit.yml"),
            "-e",
            f"target={PROBE}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    for path in STAND_INS:
        host.run_expect([0], f"mkdir -p {os.path.dirname(path)} && test ! -e {path}")
        host.run_expect([0], f"printf '#!/bin/sh\\nexit 0\\n' > {path} && chmod 755 {path}")
    host.run_expect([0], "systemctl daemon-reload")
    yield host
    host.run(f"rm -f {' '.join(STAND_INS + UNITS)}")
    host.run("rm -f /etc/systemd/system/multi-user.target.wants/llmhost-nvidia-devices.service")
    host.run("systemctl daemon-reload")


def _show(host: testinfra.host.Host, unit: str, prop: str) -> list[str]:
    out = host.check_output(f"systemctl show {unit} -p {prop}")
    return [line.split("=", 1)[1] for line in out.splitlines() if line.startswith(f"{prop}=")]


def test_systemd_accepts_both_units(cuda_host: testinfra.host.Host) -> None:
    result = cuda_host.run("systemd-analyze verify vllm.service llmhost-nvidia-devices.service")
    assert result.rc == 0, result.stdout + result.stderr


def test_the_cuda_unit_is_hardened(cuda_host: testinfra.host.Host) -> None:
    out = cuda_host.check_output("systemd-analyze security --no-pager vllm.service")
    last = out.strip().splitlines()[-1]
    print(last)
    exposure = float(last.split("exposure level for vllm.service:")[1].split()[0])
    assert exposure <= 3.0, last


def test_the_cuda_unit_reaches_exactly_the_nvidia_devices(cuda_host: testinfra.host.Host) -> None:
    assert _show(cuda_host, "vllm.service", "DevicePolicy") == ["closed"]
    assert _show(cuda_host, "vllm.service", "PrivateDevices") == ["no"]
    # systemd adds read access to the clock device itself for ProtectClock=yes.
    assert set(_show(cuda_host, "vllm.service", "DeviceAllow")) == NVIDIA_DEVICES | {"char-rtc r"}


def test_vllm_starts_only_after_the_nvidia_device_nodes_exist(
    cuda_host: testinfra.host.Host,
) -> None:
    requires = _show(cuda_host, "vllm.service", "Requires")[0].split()
    after = _show(cuda_host, "vllm.service", "After")[0].split()
    assert "llmhost-nvidia-devices.service" in requires
    assert {"llmhost-nvidia-devices.service", "nvidia-persistenced.service"} <= set(after)
    # The node unit runs as root, once, and stays "active" for the units that need it.
    assert _show(cuda_host, "llmhost-nvidia-devices.service", "Type") == ["oneshot"]
    assert _show(cuda_host, "llmhost-nvidia-devices.service", "RemainAfterExit") == ["yes"]
    assert _show(cuda_host, "llmhost-nvidia-devices.service", "UnitFileState") == ["enabled"]
    exec_start = _show(cuda_host, "llmhost-nvidia-devices.service", "ExecStart")
    assert any("argv[]=/usr/bin/nvidia-modprobe -u" in e for e in exec_start)
