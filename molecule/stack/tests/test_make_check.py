"""`make check` against this scenario's hosts: passes as deployed, and fails
with a clear message when a unit is stopped or a file mode is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from load import demo_key_text

ROOT = Path(__file__).resolve().parents[3]
testinfra_hosts = ["ansible://llmhost-stack"]


def _check(*pytest_args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOLECULE_SCENARIO")}
    env.update(extra_env)
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "check_hosts.py"),
            "--inventory",
            os.environ["MOLECULE_INVENTORY_FILE"],
            *pytest_args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def _table_row(output: str, host: str) -> str:
    section = output.split("llmhost host checks", 1)[1]
    return next(line for line in section.splitlines() if line.startswith(host))


def test_check_passes_on_the_deployed_hosts():
    run = _check()
    assert run.returncode == 0, run.stdout[-4000:]
    row = _table_row(run.stdout, "llmhost-stack")
    assert row.split()[1] == "gpu"  # groups column
    assert int(row.split()[3]) == 0  # failed column
    assert "Molecule only" in run.stdout  # tests needing a probe host are skipped, saying why


@pytest.fixture
def nginx_stopped(host):
    host.run("systemctl stop nginx")
    yield
    host.run("systemctl start nginx")


def test_check_fails_when_a_unit_is_stopped(nginx_stopped):
    run = _check("-k", "nginx")
    assert run.returncode != 0
    row = _table_row(run.stdout, "llmhost-stack")
    assert int(row.split()[3]) > 0, row  # failed column
    # The failure names the unit and what to look at.
    assert "nginx is not running (systemctl status nginx)" in run.stdout, run.stdout[-3000:]


@pytest.fixture
def keys_file_world_readable(host):
    host.run("chmod 0644 /etc/llm-proxy/keys.json")
    yield
    host.run("chmod 0640 /etc/llm-proxy/keys.json")


def test_check_fails_when_a_file_mode_is_wrong(keys_file_world_readable):
    run = _check("-k", "private")
    assert run.returncode != 0
    assert "test_config_and_keys_files_are_private" in _table_row(run.stdout, "llmhost-stack")
    assert "has mode 0o644, expected 0o640" in run.stdout


def test_the_check_key_is_on_no_command_line_sudo_logs(host):
    """Under become (sudo, as on a real host), sudo logs every command it runs: the checks
    that use the check key must hand it over another way (stdin), never on a command line."""
    key = demo_key_text("demo-key")
    since = host.run("date +%s").stdout.strip()
    run = _check("-k", "real_answer or plaintext", ANSIBLE_BECOME="true")
    assert run.returncode == 0, run.stdout[-4000:]
    journal = host.run(f"journalctl --no-pager -o cat --since @{since}").stdout
    # Not vacuous: the checks did run their commands through sudo, and sudo logged them.
    assert "COMMAND=" in journal, journal[-2000:]
    assert key not in journal, "the check key is in the host's journal (a command line sudo logged)"
    assert key[3:] not in journal
