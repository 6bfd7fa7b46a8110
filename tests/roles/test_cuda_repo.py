"""NVIDIA's CUDA repository name per release, as the nvidia_driver role computes it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

PLUGIN = Path(__file__).parents[2] / "roles/nvidia_driver/filter_plugins/cuda_repo.py"
spec = importlib.util.spec_from_file_location("cuda_repo", PLUGIN)
assert spec is not None and spec.loader is not None
cuda_repo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_repo)


@pytest.mark.parametrize(
    ("distribution", "version", "expected"),
    [
        # Debian's facts carry the point release: the repository is named by the major.
        ("Debian", "12.11", "debian12"),
        ("Debian", "12", "debian12"),
        ("Ubuntu", "22.04", "ubuntu2204"),
        ("Ubuntu", "24.04", "ubuntu2404"),
    ],
)
def test_supported_releases_map_to_nvidias_repository_names(
    distribution: str, version: str, expected: str
) -> None:
    assert cuda_repo.cuda_repo_distro(distribution, version) == expected


@pytest.mark.parametrize(("distribution", "version"), [("Debian", "11.9"), ("Rocky", "9.4")])
def test_other_releases_are_refused_with_the_way_out(distribution: str, version: str) -> None:
    with pytest.raises(AnsibleFilterError, match="nvidia_driver_source: distribution"):
        cuda_repo.cuda_repo_distro(distribution, version)


@pytest.mark.parametrize(
    ("distribution", "version", "path"),
    [("Debian", "12.11", "debian12"), ("Ubuntu", "22.04", "ubuntu2204")],
)
def test_the_roles_keyring_url_uses_it(distribution: str, version: str, path: str) -> None:
    """The URL the role downloads, rendered by Ansible itself from the role's defaults."""
    facts = {"ansible_facts": {"distribution": distribution, "distribution_version": version}}
    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            str(Path(__file__).with_name("cuda_keyring_url.yml")),
            "-e",
            json.dumps(facts),
        ],
        env={**os.environ, "ANSIBLE_FILTER_PLUGINS": str(PLUGIN.parent)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    url = f"https://developer.download.nvidia.com/compute/cuda/repos/{path}/x86_64/"
    assert f"URL={url}cuda-keyring_1.1-1_all.deb" in out
