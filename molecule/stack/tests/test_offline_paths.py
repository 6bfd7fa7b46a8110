"""Production paths the test bed cannot reach for real, run as far as they go here, on
the probe host (offline_paths.yml):

- conda from an installer on the controller (`conda_installer_src`): a stand-in installer
  made by files/stand-in-conda-installer.sh, sha256 checked on the controller before it is
  copied, run once, a second run changes nothing; a wrong sha256 stops before anything is
  copied. What this does not prove: that the real Miniforge installer and `conda env create`
  against real channels work (neither is reachable here).
- Grafana from its apt repository: `deb822_repository` works (its python3-debian is
  installed first); the package download itself fails here, at the next task.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

SCENARIO = Path(__file__).resolve().parent.parent
INSTALLER = SCENARIO / "files" / "stand-in-conda-installer.sh"
PREFIX = "/opt/conda-offline-test"
testinfra_hosts = ["ansible://llmhost-probe"]


def _play(extra_vars: dict) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(extra_vars, f)
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            str(SCENARIO / "offline_paths.yml"),
            "-e",
            f"@{f.name}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _recap_changed(output: str) -> int:
    line = next(line for line in output.splitlines() if line.startswith("llmhost-probe "))
    return int(line.split("changed=")[1].split()[0])


def _conda_vars(sha256: str, prefix: str = PREFIX) -> dict:
    return {
        "offline_path": "conda",
        "conda_installer_src": str(INSTALLER),
        "conda_installer_sha256": sha256,
        "conda_prefix": prefix,
        "conda_env_name": "offline-py312",
    }


@pytest.fixture
def clean_conda(host):
    yield
    host.run(f"rm -rf {PREFIX} {PREFIX}-wrong /root/stand-in-conda-installer.runs")


def test_conda_from_a_controller_installer_runs_it_once(host, clean_conda):
    sha256 = hashlib.sha256(INSTALLER.read_bytes()).hexdigest()
    first = _play(_conda_vars(sha256))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert _recap_changed(first.stdout) > 0
    assert host.file(f"{PREFIX}/envs/offline-py312/bin/python").exists
    assert "env create" in host.file(f"{PREFIX}/stand-in-conda.log").content_string
    assert not host.file("/var/cache/miniforge-installer.sh").exists  # removed after use
    again = _play(_conda_vars(sha256))
    assert again.returncode == 0, again.stdout[-3000:]
    assert _recap_changed(again.stdout) == 0, again.stdout[-3000:]
    runs = host.file("/root/stand-in-conda-installer.runs").content_string.splitlines()
    assert len(runs) == 1, runs


def test_a_wrong_installer_checksum_stops_before_anything_is_copied(host, clean_conda):
    wrong = hashlib.sha256(b"not the installer").hexdigest()
    run = _play(_conda_vars(wrong, prefix=f"{PREFIX}-wrong"))
    assert run.returncode != 0
    assert f"conda_installer_sha256 is {wrong}" in run.stdout + run.stderr, run.stdout[-3000:]
    assert not host.file("/var/cache/miniforge-installer.sh").exists
    assert not host.file(f"{PREFIX}-wrong").exists
    assert not host.file("/root/stand-in-conda-installer.runs").exists


@pytest.fixture
def grafana_source_removed(host):
    yield
    # The failed update wrote no lists for the source: removing it is all there is to undo.
    host.run("rm -f /etc/apt/sources.list.d/grafana.sources")


def test_grafana_repository_is_added_then_only_the_download_fails(host, grafana_source_removed):
    run = _play(
        {
            "offline_path": "grafana",
            "grafana_install_source": "repository",
            "grafana_admin_password": "not-used-by-the-install-phase",
            # Nothing answers there: the repository is added, the package cannot come.
            "grafana_apt_repository_url": "http://127.0.0.1:9/grafana",
            "grafana_apt_key_url": "/usr/share/keyrings/debian-archive-keyring.gpg",
        }
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert host.package("python3-debian").is_installed
    assert host.file("/etc/apt/sources.list.d/grafana.sources").contains("127.0.0.1:9/grafana")
    failed = [line for line in output.splitlines() if line.startswith("fatal:")]
    assert failed, output[-3000:]
    # The failing task is the package install, not the repository module.
    assert "Install Grafana" in output.split(failed[0])[0].rsplit("TASK [", 1)[1], output[-3000:]
