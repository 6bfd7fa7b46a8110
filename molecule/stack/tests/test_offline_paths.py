"""Production paths the test bed cannot reach for real, run as far as they go here, on
the probe host (offline_paths.yml):

- conda from an installer on the controller (`conda_installer_src`): a stand-in installer
  made by files/stand-in-conda-installer.sh, sha256 checked on the controller before it is
  copied, run once, a second run changes nothing, its .condarc and environment spec as the
  inventory says; a wrong sha256 stops before anything is copied; an installer the host
  downloads (`conda_installer_url`) is checked on the host, and one that does not match
  never runs. What this does not prove: that the real Miniforge installer and `conda env create`
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
import yaml

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


# A mirror, as an offline site sets one: written to .condarc and the environment's spec.
MIRROR = "https://conda-mirror.example.internal"


def _conda_vars(sha256: str, prefix: str = PREFIX) -> dict:
    return {
        "offline_path": "conda",
        "conda_installer_src": str(INSTALLER),
        "conda_installer_sha256": sha256,
        "conda_prefix": prefix,
        "conda_env_name": "offline-py312",
        "conda_channel_alias": MIRROR,
        "conda_custom_channels": {"internal": f"{MIRROR}/internal"},
        "conda_env_pip_packages": ["vllm==0.32.0"],
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
    # The channel settings and the environment's spec, as the role writes them.
    condarc = yaml.safe_load(host.file(f"{PREFIX}/.condarc").content_string)
    assert condarc["channels"] == ["conda-forge"]
    assert condarc["channel_alias"] == MIRROR
    assert condarc["custom_channels"] == {"internal": f"{MIRROR}/internal"}
    assert condarc["auto_update_conda"] is False and condarc["ssl_verify"] is True
    spec = yaml.safe_load(host.file(f"{PREFIX}/env-specs/offline-py312.yml").content_string)
    assert spec["name"] == "offline-py312"
    assert spec["dependencies"][:2] == ["python=3.12", "pip"]
    assert spec["dependencies"][2] == {"pip": ["vllm==0.32.0"]}
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


def test_an_installer_downloaded_on_the_host_is_checked_there(host, clean_conda):
    """The download path (`conda_installer_url`, fetched by the host itself): the host checks
    the sha256 of what it got and runs nothing that does not match. Here the URL is a file on
    the host that is not the installer whose sha256 the inventory gives."""
    host.run("printf 'echo not the installer' > /root/not-the-installer.sh")
    expected = hashlib.sha256(INSTALLER.read_bytes()).hexdigest()
    run = _play(
        {
            **_conda_vars(expected),
            "conda_installer_src": "",
            "conda_installer_url": "file:///root/not-the-installer.sh",
        }
    )
    host.run("rm -f /root/not-the-installer.sh")
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Download the installer" in output and "checksum" in output.lower(), output[-3000:]
    assert not host.file(f"{PREFIX}/bin/conda").exists
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
